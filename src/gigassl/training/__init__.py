"""Stage 2 training (``gigassl train``): the cohort index and two-view data, the NT-Xent loss, the
epoch loop with its run state, label-free monitors, the choice of initial weights, torchrun support
and the checkpoint payload. The run-state type and the learning-rate schedule it shares with MoCo
pre-training are :mod:`extract.training`'s.
"""
