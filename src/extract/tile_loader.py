"""Tiles of one slide after another, read by DataLoader workers that live for the whole job.

A DataLoader per slide forks its reading workers per slide; on a cohort of small slides (a
biopsy has a few dozen tiles) that start-up and the empty pipeline behind it cost as much as
reading. Here the dataset is keyed by the tile itself (slide path, µm/px, level-0 x, y) and
the batch sampler is told which slide comes next, so one set of persistent workers serves
every slide; each worker keeps the slide it is reading open until the next one arrives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from extract.reader import SlideReader, open_slide


# Tiles in a slide's first batch (see SlideTileBatches).
FIRST_BATCH_SIZE = 4


class TileKey(NamedTuple):
    """One tile to read: the slide, its µm/px, and the tile's level-0 square and output size."""

    path: str
    mpp: float
    x0: int
    y0: int
    size_level0: float
    out_px: int


class TileReads(Dataset):
    """``dataset[key]`` → the tile ``key`` names, (out_px, out_px, 3) uint8; one open slide per process."""

    def __init__(self) -> None:
        self._reader: SlideReader | None = None

    def __getitem__(self, key: TileKey) -> torch.Tensor:
        if self._reader is None or str(self._reader.path) != key.path:
            self.close()
            self._reader = open_slide(Path(key.path), mpp_override=key.mpp)
        return torch.from_numpy(self._reader.read_tile(key.x0, key.y0, key.size_level0, key.out_px))

    def __getstate__(self) -> dict:
        return {"_reader": None}  # file handles do not cross process boundaries

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


class SlideTileBatches(Sampler[list[TileKey]]):
    """Batches of the keys of the slide named by :meth:`set_slide`, in the grid's order.

    A slide's first batch holds ``first_batch_size`` tiles, so the encoder can start as soon as
    a few tiles are read instead of waiting for a whole batch (the encoder's speed per tile
    hardly depends on the batch size on a CPU, and a GPU gets full batches after the first).
    """

    def __init__(self, batch_size: int, first_batch_size: int | None = None) -> None:
        self.batch_size = batch_size
        self.first_batch_size = min(batch_size, first_batch_size or batch_size)
        self._keys: list[TileKey] = []

    def set_slide(self, path: Path, mpp: float, coords: np.ndarray, size_level0: float, out_px: int) -> None:
        self._keys = [TileKey(str(path), float(mpp), int(x), int(y), float(size_level0), int(out_px))
                      for x, y in np.asarray(coords, dtype=np.int64)]

    def _starts(self) -> list[int]:
        first = self.first_batch_size
        return ([0] + list(range(first, len(self._keys), self.batch_size))) if self._keys else []

    def __len__(self) -> int:
        return len(self._starts())

    def __iter__(self) -> Iterator[list[TileKey]]:
        starts = self._starts()
        for start, end in zip(starts, starts[1:] + [len(self._keys)]):
            yield self._keys[start:end]


class TileLoader:
    """Reads the tiles of one slide after another in batches of (B, H, W, 3) uint8 tensors.

    With ``num_workers`` > 0 the workers start on the first slide and are kept for the next
    ones; after a slide whose reading failed (an unreadable tile, a worker killed by a broken
    file) they are replaced, so one bad slide cannot break the others.
    """

    def __init__(self, batch_size: int, num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 4) -> None:
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self._loader: DataLoader | None = None
        self._sampler: SlideTileBatches | None = None
        self._dataset: TileReads | None = None

    def _start(self) -> DataLoader:
        self._dataset, self._sampler = TileReads(), SlideTileBatches(self.batch_size, FIRST_BATCH_SIZE)
        workers = self.num_workers > 0
        return DataLoader(
            self._dataset, batch_sampler=self._sampler, num_workers=self.num_workers, pin_memory=self.pin_memory,
            persistent_workers=workers, prefetch_factor=self.prefetch_factor if workers else None,
        )

    def tiles(self, path: Path, mpp: float, coords: np.ndarray, size_level0: float, out_px: int) -> Iterator[torch.Tensor]:
        """Yield the tiles at ``coords`` (level-0 top-left) of the slide ``path`` batch by batch."""
        if self._loader is None:
            self._loader = self._start()
        assert self._sampler is not None and self._dataset is not None
        self._sampler.set_slide(path, mpp, coords, size_level0, out_px)
        finished = False
        try:
            yield from self._loader
            finished = True
        finally:
            if self.num_workers == 0:
                self._dataset.close()  # read in this process: release the slide now
            if not finished:  # an error, or the caller stopped early: start afresh next time
                self.close()

    def close(self) -> None:
        """Stop the workers (and close any slide read in this process)."""
        if self._dataset is not None:
            self._dataset.close()
        self._loader = self._sampler = self._dataset = None  # dropping the loader shuts its workers down
