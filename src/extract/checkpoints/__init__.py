"""Checkpoint files: the sealed format every training job writes (atomic write, content hash,
finite check on load) and MoCo's resumable training state and exported encoder. Stage 2's
payload (:mod:`gigassl.training.checkpoint`) is written and verified through the same seal.
"""
