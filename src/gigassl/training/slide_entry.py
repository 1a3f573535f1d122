"""One usable slide of a training cohort, and its record in the features folder's manifest.

Scanning a slide file for training (open it, read its bank's attributes, locate the chunk of each
augmentation) costs a few milliseconds: a minute at 12,000 slides. The scan's result is recorded
in the folder's manifest (:mod:`extract.features.manifest`, field ``train_entry``) for the file's identity
(inode, size, mtime), so a later run rebuilds the :class:`SlideEntry` with one ``stat`` and
opens the file only when it changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from extract.encoders.tile_encoder import EncoderInfo
from extract.features.bank_chunks import BankChunks

ENTRY_VERSION = 1


@dataclass(frozen=True)
class SlideEntry:
    """One usable slide: where its file is and what its bank holds."""

    path: Path
    slide_id: str
    n_augmentations: int
    bank_size: int
    tile_step_level0: float
    encoder: EncoderInfo
    grid: tuple[int | None, float | None] = (None, None)  # (tile size px, µm/px of the tiles)
    # Byte offsets of the bank's chunks for direct reads; None when the file's bank is stored
    # otherwise (then views are read through h5py).
    chunks: BankChunks | None = field(default=None, compare=False, repr=False)


def entry_record(entry: SlideEntry) -> dict[str, Any]:
    """``entry`` as plain JSON data (its path left out: the manifest is keyed by file name)."""
    chunks = entry.chunks
    encoder = entry.encoder.to_dict()
    return {
        "version": ENTRY_VERSION,
        "slide_id": entry.slide_id,
        "n_augmentations": entry.n_augmentations,
        "bank_size": entry.bank_size,
        "tile_step_level0": entry.tile_step_level0,
        "encoder": encoder,
        "grid": list(entry.grid),
        "chunks": None
        if chunks is None
        else {
            "feature_offsets": chunks.feature_offsets.tolist(),
            "feature_sizes": chunks.feature_sizes.tolist(),
            "coord_offsets": chunks.coord_offsets.tolist(),
            "coord_sizes": chunks.coord_sizes.tolist(),
            "identity": list(chunks.identity),
            "n_features": chunks.n_features,
        },
    }


def entry_from_record(path: Path, record: dict[str, Any]) -> SlideEntry | None:
    """The entry of ``path`` rebuilt from :func:`entry_record`'s data; None when it is of another version."""
    if record.get("version") != ENTRY_VERSION:
        return None
    encoder = dict(record["encoder"])
    encoder.update({k: tuple(encoder[k]) for k in ("mean", "std") if k in encoder})
    stored = record["chunks"]
    chunks = None
    if stored is not None:
        offsets = {
            k: np.asarray(stored[k], dtype=np.int64) for k in ("feature_offsets", "feature_sizes", "coord_offsets", "coord_sizes")
        }
        ino, size_bytes, mtime_ns = (int(v) for v in stored["identity"])
        chunks = BankChunks(
            path,
            int(record["bank_size"]),
            offsets["feature_offsets"],
            offsets["feature_sizes"],
            offsets["coord_offsets"],
            offsets["coord_sizes"],
            identity=(ino, size_bytes, mtime_ns),
            n_features=int(stored["n_features"]),
        )
    size, mpp = record["grid"]
    return SlideEntry(
        path,
        str(record["slide_id"]),
        int(record["n_augmentations"]),
        int(record["bank_size"]),
        float(record["tile_step_level0"]),
        EncoderInfo(**encoder),
        (size, mpp),
        chunks,
    )
