"""MoCo v2 pre-training of the tile encoder (``gigassl pretrain-tiles``): tiles sampled online
from slides, the query/key model with its queue, the epoch loop, and its label-free and
linear-probe monitors. Its checkpoints are written through :mod:`extract.checkpoints`.
"""
