"""What the two training jobs share at run time: MoCo pre-training of the tile encoder
(:mod:`extract.moco`) and Giga-SSL training of the slide encoder (:mod:`gigassl.training`) both step
through one run-state type (:class:`extract.training.run_state.TrainingRun`: where the run stands
under torchrun, what it trains, what steps the weights, how far it has got, where it writes) and
one learning-rate schedule (:mod:`extract.training.schedule`: linear warm-up, then cosine decay).
The distributed check itself is :func:`extract.device.rank` / :func:`extract.device.world_size`;
the checkpoint files are :mod:`extract.checkpoints`.
"""
