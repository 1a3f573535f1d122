"""The tiles of a job's slides, one slide after another, as one stream read by DataLoader workers.

A DataLoader per slide forks its reading workers per slide and starts each slide with an
empty pipeline; on a cohort of small slides (a biopsy has a few dozen tiles) that costs as
much as reading. Here one DataLoader pass covers every slide of the job: the batch sampler
walks the slides in order, asking for each slide's tile grid when it gets there (from the
planner, which computes grids in the background), and the workers read ahead across slide
boundaries, so the next slide's first tiles are ready when the encoder finishes a slide.

Each batch holds tiles of one slide and carries the slide's position in the job; a tile
that cannot be read turns its batch into an error for that slide only. The encoding loop
takes the slides in order with :meth:`TileStream.tiles`; batches of a slide it gave up on
are dropped. A worker killed by a slide library (a segfault) ends the pass with
:class:`ReadingWorkerDied`; since the workers read ahead, the slide being encoded is not
necessarily the culprit, so the caller reads it again alone (:meth:`TileStream.isolate`) and
fails it only if a worker dies again. The workers die with the job, even one killed with
SIGKILL (:mod:`extract.child_process`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, Generator, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from extract.batch.slide_list import SlideQueue
from extract.child_process import die_with_parent_worker
from extract.slides.formats import open_slide
from extract.slides.reader import SlideReader, SlideReadError
from extract.slides.tiling import TileGrid

# Tiles in a slide's first batch: the encoder can start on a slide as soon as a few of its
# tiles are read (its speed per tile hardly depends on the batch size on a CPU; a GPU gets
# full batches after the first).
FIRST_BATCH_SIZE = 4


class ReadingWorkerDied(SlideReadError):
    """A tile-reading worker process died (e.g. a segfault in the slide library)."""


def is_worker_death(error: BaseException) -> bool:
    """A reading worker died: DataLoader's SIGCHLD handler raises this RuntimeError wherever the
    main thread happens to be."""
    return isinstance(error, RuntimeError) and "DataLoader worker" in str(error) and "exited unexpectedly" in str(error)


class TileKey(NamedTuple):
    """One tile to read: the slide (its position in the job, path, level-0 µm/px), its row in the
    slide's grid, and its level-0 square and output size."""

    slide: int
    row: int
    path: str
    level0_mpp: float
    x0: int
    y0: int
    size_level0: float
    out_px: int


class TileBatch(NamedTuple):
    """Consecutive tiles of one slide: ``tiles`` (B, H, W, 3) uint8 from grid row ``row``, or
    ``error`` (a one-line reason naming the file) when one of them could not be read."""

    slide: int
    row: int
    tiles: torch.Tensor | None
    error: str | None


class TileReads(Dataset):
    """``dataset[key]`` → ``(key, tile or None, error or None)``; one open slide per process."""

    def __init__(self) -> None:
        self._reader: SlideReader | None = None

    def __getitem__(self, key: TileKey) -> tuple[TileKey, torch.Tensor | None, str | None]:
        try:
            if self._reader is None or str(self._reader.path) != key.path:
                self.close()
                self._reader = open_slide(Path(key.path), mpp_override=key.level0_mpp)
            tile = self._reader.read_tile(key.x0, key.y0, key.size_level0, key.out_px)
        except Exception as error:  # noqa: BLE001 - reported for this slide only, by the consumer
            reason = str(error) if isinstance(error, SlideReadError) else f"{key.path}: {type(error).__name__}: {error}"
            return key, None, " ".join(reason.split())
        return key, torch.from_numpy(tile), None

    def __getstate__(self) -> dict:
        return {"_reader": None}  # file handles do not cross process boundaries

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def collate_tiles(items: Sequence[tuple[TileKey, torch.Tensor | None, str | None]]) -> TileBatch:
    """``collate_fn``: tiles of one slide → a :class:`TileBatch` (the first error wins)."""
    first = items[0][0]
    errors = [error for _, _, error in items if error is not None]
    if errors:
        return TileBatch(first.slide, first.row, None, errors[0])
    tiles = [tile for _, tile, _ in items if tile is not None]
    if len(tiles) != len(items):
        raise RuntimeError(f"slide {first.slide}, row {first.row}: a tile read gave neither tiles nor an error")
    return TileBatch(first.slide, first.row, torch.stack(tiles), None)


def slide_keys(position: int, path: Path, grid: TileGrid) -> list[TileKey]:
    """The keys of every tile of ``grid``, in grid order."""
    return [
        TileKey(position, row, str(path), float(grid.level0_mpp), int(x), int(y), float(grid.size_level0), int(grid.tile_size_px))
        for row, (x, y) in enumerate(np.asarray(grid.coords, dtype=np.int64))
    ]


def batch_bounds(n_tiles: int, batch_size: int, first_batch_size: int = FIRST_BATCH_SIZE) -> list[tuple[int, int]]:
    """(start, end) rows of a slide's batches: a first batch of ``first_batch_size``, then ``batch_size``."""
    first = min(batch_size, first_batch_size)
    starts = [0] + list(range(first, n_tiles, batch_size)) if n_tiles else []
    return list(zip(starts, starts[1:] + [n_tiles]))


class CohortTileBatches(Sampler[list[TileKey]]):
    """Batches of keys of ``slides[start:]`` in order; a slide whose grid raises is passed over
    (its error reaches the encoding loop from the planner)."""

    def __init__(
        self,
        slides: SlideQueue,
        grid_of: Callable[[Path], TileGrid],
        batch_size: int,
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        self.slides, self.grid_of, self.batch_size = slides, grid_of, batch_size
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[list[TileKey]]:
        position = self.start - 1
        while self.stop is None or position + 1 < self.stop:
            position += 1
            path = self.slides.get(position)
            if path is None:
                return
            try:
                grid = self.grid_of(path)
            except Exception as error:  # noqa: BLE001 - the slide fails in the encoding loop, not here
                if is_worker_death(error):
                    raise  # a reading worker died while the grid was awaited: the pass is over
                continue
            keys = slide_keys(position, path, grid)
            for start, end in batch_bounds(len(keys), self.batch_size):
                yield keys[start:end]


class TileStream:
    """Yields, slide after slide, the (B, H, W, 3) uint8 tile batches of a job's slides.

    ``slides`` in the order they will be asked for; ``grid_of(path)`` gives a slide's grid (it
    may block, and must give the same answer when asked again). The slides must be asked for
    in order; one may be left out (its batches are dropped).
    """

    def __init__(
        self,
        slides: Sequence[Path] | SlideQueue,
        grid_of: Callable[[Path], TileGrid],
        batch_size: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int = 4,
    ) -> None:
        self.slides = slides if isinstance(slides, SlideQueue) else SlideQueue(slides)
        self.grid_of = grid_of
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self._next = 0  # position of the next slide to hand out
        self._batches: Iterator[TileBatch] | None = None
        self._pending: TileBatch | None = None  # a batch read ahead of the slide it belongs to
        self._dataset: TileReads | None = None
        self._isolated: int | None = None  # position of a slide to read in a pass of its own

    def isolate(self, path: Path) -> None:
        """Read ``path`` next in a pass of its own (nothing read ahead), then go on as before."""
        self.close()
        self._next = self._position_of(path, start=max(0, self._next - 1))  # the slide just begun, or a later one
        self._isolated = self._next

    def _start(self, position: int) -> Iterator[TileBatch]:
        self._dataset = TileReads()
        workers = self.num_workers > 0
        stop = position + 1 if self._isolated == position else None
        loader = DataLoader(
            self._dataset,
            batch_sampler=CohortTileBatches(self.slides, self.grid_of, self.batch_size, position, stop),
            collate_fn=collate_tiles,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if workers else None,
            worker_init_fn=functools.partial(die_with_parent_worker, os.getpid()) if workers else None,
        )
        return iter(loader)

    def _position_of(self, path: Path, start: int | None = None) -> int:
        try:
            position = self.slides.position(path)
        except KeyError:
            position = -1
        if position >= (self._next if start is None else start):
            return position
        raise ValueError(f"{path} is not one of the slides still to come in this job")

    def _take(self) -> TileBatch | None:
        if self._pending is not None:
            batch, self._pending = self._pending, None
            return batch
        assert self._batches is not None
        return next(self._batches, None)

    def tiles(self, path: Path, grid: TileGrid) -> Generator[torch.Tensor, None, None]:
        """Yield the tile batches of ``path`` (whose grid is ``grid``) in grid order.

        Raises :class:`SlideReadError` naming the file when a tile cannot be read, and
        :class:`ReadingWorkerDied` when a reading worker dies meanwhile (see :meth:`isolate`).
        """
        position = self._position_of(path)
        self._next = position + 1
        if self._batches is None:
            self._batches = self._start(position)
        bounds = batch_bounds(len(grid), self.batch_size)
        received = 0
        while received < len(bounds):
            try:
                batch = self._take()
            except RuntimeError as error:  # a worker died: this pass is over
                self.close()
                raise ReadingWorkerDied(f"{path}: a tile-reading worker died while this slide was read ({error})") from None
            if batch is None:
                raise RuntimeError(f"{path}: the tile stream ended {len(bounds) - received} batches early")
            if batch.slide < position:
                continue  # left over from a slide the caller gave up on
            tiles = self._checked_tiles(path, position, bounds[received][0], batch)
            received += 1
            yield tiles
        if self._isolated == position:  # read alone: the next slides get a pass with read-ahead again
            self._isolated = None
            self.close()
        if self.num_workers == 0 and self._dataset is not None:
            self._dataset.close()  # read in this process: release the slide now

    def _checked_tiles(self, path: Path, position: int, row: int, batch: TileBatch) -> torch.Tensor:
        """The tiles of ``batch``, which must be the batch of the slide at ``position`` starting at grid
        row ``row``; raises naming ``path`` otherwise (a batch of a later slide is kept for it)."""
        if batch.slide > position:
            self._pending = batch
            raise RuntimeError(f"{path}: the tile stream skipped this slide (its grid failed?)")
        if batch.error is not None:
            raise SlideReadError(batch.error)
        if batch.row != row:
            raise RuntimeError(f"{path}: tiles out of order (row {batch.row}, expected {row})")
        if batch.tiles is None:
            raise RuntimeError(f"{path}: a tile batch without tiles or error (row {batch.row})")
        return batch.tiles

    def close(self) -> None:
        """End the pass (stops the workers); a later :meth:`tiles` starts a new one."""
        if self._dataset is not None:
            self._dataset.close()
        self._batches, self._pending, self._dataset = None, None, None
