"""Tiles for MoCo pre-training, sampled online from each slide's tissue grid (nothing on disk).

Each slide is opened once up front to build its tissue tile grid at the target µm/px
(:func:`index_slides`). Every epoch then draws a fresh plan of ``tiles_per_epoch``
(slide, tile) pairs (:func:`epoch_plan`): slides uniformly, so a huge slide does not drown
small ones, and ``tiles_per_visit`` random tiles of a slide in a row, so a DataLoader worker
opens (or, for a jpg, decodes) a slide once per run of tiles instead of once per tile.
:class:`EpochTileBatches` cuts the plan into batches, hands batch ``b`` to worker
``b mod n_workers`` and to each torchrun rank its slice of every batch, and yields raw uint8
tiles; the two augmented views are made by the trainer on the device, from one explicit
generator, so that a run is reproducible and resumable whatever the number of workers.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from extract.errors import UserError
from extract.progress import progress as progress_bar
from extract.slides.formats import open_slide
from extract.slides.reader import SlideReader, SlideReadError, load_mpp_overrides
from extract.slides.tiling import tile_grid

logger = logging.getLogger(__name__)

# Open readers each worker keeps; a plain image is held decoded in memory (~10 MB for BACH).
READER_CACHE_SIZE = 8


@dataclass(frozen=True)
class IndexedSlide:
    """One slide's tissue tiles, as :func:`index_slides` found them: ``coords`` (N, 2) int64 level-0 top-left x, y."""

    path: Path
    level0_mpp: float  # as resolved at indexing (metadata, CSV or default)
    coords: np.ndarray
    size_level0: float

    def __len__(self) -> int:
        return len(self.coords)


def index_slides(
    paths: list[Path],
    target_mpp: float,
    tile_size_px: int,
    tissue_threshold: float,
    mpp_csv: Path | None = None,
    default_mpp: float | None = None,
    progress: bool = True,
) -> tuple[list[IndexedSlide], list[tuple[Path, str]]]:
    """Tissue tile grids of ``paths``; returns (usable slides, [(path, reason) skipped])."""
    overrides = load_mpp_overrides(mpp_csv) if mpp_csv is not None else {}
    slides: list[IndexedSlide] = []
    skipped: list[tuple[Path, str]] = []
    for path in progress_bar(paths, desc="tissue grids", unit="slide", disable=not progress):
        try:
            with open_slide(path, mpp_override=overrides.get(path.stem), default_mpp=default_mpp) as reader:
                grid = tile_grid(reader, target_mpp, tile_size_px, tissue_threshold)
                slides.append(IndexedSlide(path, float(reader.level0_mpp), grid.coords, grid.size_level0))
        except SlideReadError as error:
            logger.warning("skipping %s", error)
            skipped.append((path, str(error)))
    return slides, skipped


def epoch_plan(tiles_per_slide: list[int], n_tiles: int, tiles_per_visit: int, seed: int, epoch: int) -> np.ndarray:
    """(n_tiles, 2) int64 (slide index, tile index) for one epoch, a function of (seed, epoch).

    Slides are drawn uniformly; each visit takes ``tiles_per_visit`` tiles of its slide
    (without replacement when the slide has enough).
    """
    rng = np.random.default_rng([seed, epoch])
    n_visits = math.ceil(n_tiles / tiles_per_visit)
    visited = rng.integers(0, len(tiles_per_slide), size=n_visits)
    rows = []
    for slide in visited:
        available = tiles_per_slide[slide]
        picks = rng.choice(available, size=tiles_per_visit, replace=available < tiles_per_visit)
        rows.append(np.stack([np.full(tiles_per_visit, slide), picks], axis=1))
    return np.concatenate(rows)[:n_tiles].astype(np.int64)


class TileReaders:
    """A small LRU of open slide readers (one per process; handles never cross processes)."""

    def __init__(self, slides: list[IndexedSlide], capacity: int = READER_CACHE_SIZE) -> None:
        self.slides, self.capacity = slides, capacity
        self._open: OrderedDict[int, SlideReader] = OrderedDict()

    def read(self, slide: int, tile: int, tile_size_px: int) -> np.ndarray:
        """(tile_size_px, tile_size_px, 3) uint8 tile ``tile`` of slide ``slide``."""
        reader = self._open.pop(slide, None)
        if reader is None:
            entry = self.slides[slide]
            reader = open_slide(entry.path, mpp_override=entry.level0_mpp)
        self._open[slide] = reader
        while len(self._open) > self.capacity:
            self._open.popitem(last=False)[1].close()
        entry = self.slides[slide]
        x0, y0 = entry.coords[tile]
        return reader.read_tile(int(x0), int(y0), entry.size_level0, tile_size_px)

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


def read_tiles(readers: TileReaders, pairs: np.ndarray, tile_size_px: int) -> torch.Tensor:
    """(n, 2) (slide, tile) pairs → (n, 3, px, px) uint8 tiles."""
    tiles = np.stack([readers.read(int(s), int(t), tile_size_px) for s, t in pairs])
    return torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()


class EpochTileBatches(IterableDataset):
    """One epoch of this rank's batches, (batch_size // world_size, 3, px, px) uint8 each.

    Use with ``DataLoader(dataset, batch_size=None, num_workers=W)``: the loader returns the
    workers' batches round-robin, i.e. in plan order, so the stream does not depend on W.
    """

    def __init__(
        self,
        slides: list[IndexedSlide],
        plan: np.ndarray,
        batch_size: int,
        tile_size_px: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise UserError(f"--batch-size {batch_size} must be a multiple of the {world_size} processes")
        self.slides, self.plan, self.tile_size_px = slides, plan, tile_size_px
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.local_batch = batch_size // world_size

    def __len__(self) -> int:
        return len(self.plan) // self.batch_size  # the incomplete last batch is dropped

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        readers = TileReaders(self.slides)
        try:
            for batch in range(worker, len(self), n_workers):
                start = batch * self.batch_size + self.rank * self.local_batch
                yield read_tiles(readers, self.plan[start : start + self.local_batch], self.tile_size_px)
        finally:
            readers.close()


def fixed_tiles(slides: list[IndexedSlide], n_tiles: int, tile_size_px: int, seed: int) -> torch.Tensor:
    """(n_tiles, 3, px, px) uint8: the same tiles every epoch, for the label-free monitors."""
    rng = np.random.default_rng([seed, 7919])  # a stream apart from the epochs' plans
    slide_of = rng.integers(0, len(slides), size=n_tiles)
    pairs = np.stack([slide_of, [rng.integers(0, len(slides[s])) for s in slide_of]], axis=1)
    order = np.argsort(pairs[:, 0], kind="stable")  # read slide by slide
    readers = TileReaders(slides)
    try:
        tiles = read_tiles(readers, pairs[order], tile_size_px)
    finally:
        readers.close()
    return tiles[torch.from_numpy(np.argsort(order))]
