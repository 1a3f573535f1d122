"""Planning the next slides while the current one is encoded.

Before its tiles can be read, a slide is opened, its thumbnail read, its tissue mask and tile
grid computed and its QC image written: tens of milliseconds of CPU per slide, which on a
cohort of biopsies (a few dozen tiles each) is a tenth of the slide's time. A
:class:`SlidePlanner` does that work in one background process, up to ``ahead`` slides in
advance, so the encoding loop only collects the grids.

A slide the planner cannot handle raises its own error (missing µm/px, no tissue, unreadable
file …) when its plan is collected; a slide that crashes the planner process (a segfault in
a slide library) fails with a message saying so, and the planner restarts for the others.
"""

from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path

from extract.reader import SlideReadError, open_slide
from extract.tiling import TileGrid, tile_grid
from extract.tissue import save_qc_image


@dataclass(frozen=True)
class PlanSettings:
    """What a plan depends on besides the slide."""

    mpp: float
    tile_size: int
    tissue_threshold: float
    default_mpp: float | None = None
    qc_dir: Path | None = None  # write {stem}.png there when set


def plan_slide(path: Path, mpp_override: float | None, settings: PlanSettings) -> TileGrid:
    """Open ``path``, compute its tile grid, write its QC image; the grid comes back without the thumbnail."""
    with open_slide(path, mpp_override, default_mpp=settings.default_mpp) as reader:
        grid = tile_grid(reader, settings.mpp, settings.tile_size, settings.tissue_threshold)
    if settings.qc_dir is not None:
        tissue = grid.tissue
        save_qc_image(settings.qc_dir / f"{path.stem}.png", tissue.thumbnail, tissue.mask, tissue.downsample,
                      grid.coords, grid.size_level0)
    return replace(grid, tissue=None)  # the thumbnail is not needed past this point


class SlidePlanner:
    """Plans ``slides`` in order in one background process, up to ``ahead`` slides in advance."""

    def __init__(
        self,
        slides: list[Path],
        mpp_overrides: dict[str, float],
        settings: PlanSettings,
        ahead: int = 2,
    ) -> None:
        self.slides, self.mpp_overrides, self.settings = list(slides), mpp_overrides, settings
        self.ahead = max(1, ahead)
        self._position = {path: i for i, path in enumerate(self.slides)}
        self._futures: dict[Path, Future] = {}
        self._results: dict[Path, tuple[bool, object]] = {}  # path → (ok, grid or error) until forgotten
        self._next = 0  # index of the first slide not yet submitted
        self._pool: ProcessPoolExecutor | None = None

    def _start_pool(self) -> ProcessPoolExecutor:
        # fork starts at once on Linux (the planner never touches torch); spawn elsewhere
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        return ProcessPoolExecutor(1, mp_context=context)

    def _submit(self, path: Path) -> Future:
        if self._pool is None:
            self._pool = self._start_pool()
        future = self._pool.submit(plan_slide, path, self.mpp_overrides.get(path.stem), self.settings)
        self._futures[path] = future
        return future

    def _submit_through(self, index: int) -> None:
        while self._next <= index:
            self._submit(self.slides[self._next])
            self._next += 1

    def plan(self, path: Path) -> TileGrid:
        """The grid of ``path`` (one of ``slides``); raises the slide's error if it has none.

        The answer is kept until :meth:`forget`, so the tile stream and the encoding loop,
        which both ask, get the same one.
        """
        if path not in self._results:
            self._results[path] = self._wait(path)
        ok, value = self._results[path]
        if not ok:
            raise value  # type: ignore[misc]
        return value  # type: ignore[return-value]

    def _wait(self, path: Path) -> tuple[bool, object]:
        index = self._position[path]
        self._submit_through(min(index + self.ahead, len(self.slides) - 1))
        future = self._futures.pop(path, None)
        if future is None:  # forgotten, then asked again: plan it anew
            future = self._submit(path)
            del self._futures[path]
        try:
            return True, future.result()
        except BrokenProcessPool:
            self._restart()
            return False, SlideReadError(
                f"{path}: reading the slide crashed the process (a fault in the slide library); "
                "check that the file opens in another viewer, or move it out of the folder"
            )
        except Exception as error:  # noqa: BLE001 - the slide's own error, raised to each asker
            return False, error

    def forget(self, path: Path) -> None:
        """Drop the kept answer for ``path`` (its slide is finished)."""
        self._results.pop(path, None)

    def _restart(self) -> None:
        """Replace a broken pool and submit again what it had not finished."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None
        pending = sorted(self._futures, key=self._position.__getitem__)
        self._futures.clear()
        for path in pending:
            self._submit(path)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None
        self._futures.clear()
        self._results.clear()
