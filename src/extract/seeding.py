"""Per-slide randomness: one seed sequence from (seed, slide id), stable across runs and machines.

The slide id is hashed (sha256, first 8 bytes) rather than taken from the slide's position, so a
slide gets the same draws whatever the folder, the shard or the batch it is processed in. The
bank (:mod:`extract.bank`) and the embedding views (:mod:`gigassl.embed`) both start here.
"""

from __future__ import annotations

import hashlib

import numpy as np


def slide_seed_sequence(seed: int, slide_id: str) -> np.random.SeedSequence:
    """The root of one slide's randomness; ``numpy.random.default_rng`` of it is the slide's generator."""
    digest = hashlib.sha256(slide_id.encode("utf-8")).digest()
    return np.random.SeedSequence([int(seed), int.from_bytes(digest[:8], "little")])
