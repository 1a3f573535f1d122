"""MoCo v2 pre-training of the tile encoder (``gigassl pretrain-tiles``): tiles sampled online
from slides, the query/key model with its queue, the run set-up, the epoch loop, and its label-free
and linear-probe monitors. Its run state and schedule are :mod:`extract.training`'s; its
checkpoints are written through :mod:`extract.checkpoints`.
"""
