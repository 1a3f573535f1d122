"""Planning the next slides while the current one is encoded.

Before its tiles can be read, a slide is opened, its thumbnail read, its tissue mask and tile
grid computed and its QC image written: tens of milliseconds of CPU per slide, which on a
cohort of biopsies (a few dozen tiles each) is a tenth of the slide's time. A
:class:`SlidePlanner` does that work in one background process, up to ``ahead`` slides in
advance, so the encoding loop only collects the grids.

A slide the planner cannot handle raises its own error (missing µm/px, no tissue, unreadable
file …) when its plan is collected; a slide that crashes the planner process (a segfault in
a slide library) fails with a message saying so, and the planner restarts for the others.

The QC image is written under a temporary name (:func:`extract.partial_files.temporary_path`);
the job publishes it with :meth:`SlidePlanner.publish_qc` once the slide's features are
complete, so a slide that fails or is interrupted leaves no QC image that looks finished.
The planner process dies with the job (:mod:`extract.child_process`).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path

from extract.batch.slide_list import SlideQueue
from extract.child_process import die_with_parent
from extract.config import GridLimits
from extract.partial_files import temporary_path
from extract.slides.formats import open_slide
from extract.slides.reader import SlideReadError
from extract.slides.tiling import MAX_INK_FRACTION, TileGrid, tile_grid
from extract.slides.tissue import save_qc_image


@dataclass(frozen=True)
class PlanSettings:
    """What a plan depends on besides the slide."""

    target_mpp: float
    tile_size_px: int
    tissue_threshold: float
    default_mpp: float | None = None
    qc_dir: Path | None = None  # write {stem}.png there when set
    limits: GridLimits = GridLimits()
    max_ink_fraction: float = MAX_INK_FRACTION


def plan_slide(path: Path, mpp_override: float | None, settings: PlanSettings) -> tuple[TileGrid, Path | None]:
    """Open ``path``, compute its tile grid, write its QC image under a temporary name.

    Returns the grid without the thumbnail, and the temporary QC image (None without ``qc_dir``).
    """
    with open_slide(path, mpp_override, default_mpp=settings.default_mpp) as reader:
        grid = tile_grid(
            reader,
            settings.target_mpp,
            settings.tile_size_px,
            settings.tissue_threshold,
            settings.limits,
            settings.max_ink_fraction,
        )
    qc_partial = None
    if settings.qc_dir is not None:
        tissue = grid.tissue
        if tissue is None:
            raise RuntimeError(f"{path}: the new grid carries no tissue map for the QC image")
        qc_partial = temporary_path(settings.qc_dir / f"{path.stem}.png")
        save_qc_image(qc_partial, tissue.thumbnail, tissue.mask, tissue.downsample, grid.coords, grid.size_level0, ink=tissue.ink)
    return replace(grid, tissue=None), qc_partial  # the thumbnail is not needed past this point


class SlidePlanner:
    """Plans ``slides`` in order in one background process, up to ``ahead`` slides in advance
    (a :class:`SlideQueue` claims each slide when the planner first reaches it)."""

    def __init__(
        self,
        slides: list[Path] | SlideQueue,
        mpp_overrides: dict[str, float],
        settings: PlanSettings,
        ahead: int = 2,
    ) -> None:
        self.slides = slides if isinstance(slides, SlideQueue) else SlideQueue(slides)
        self.mpp_overrides, self.settings = mpp_overrides, settings
        self.ahead = max(1, ahead)
        self._futures: dict[Path, Future] = {}
        self._results: dict[Path, tuple[bool, object]] = {}  # path → (ok, grid or error) until forgotten
        self._qc: dict[Path, Path] = {}  # path → its temporary QC image, until published or discarded
        self._next = 0  # index of the first slide not yet submitted
        self._pool: ProcessPoolExecutor | None = None

    def _start_pool(self) -> ProcessPoolExecutor:
        # fork starts at once on Linux (the planner never touches torch); spawn elsewhere
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        # Started from the main thread, which lives as long as the job (see extract.child_process).
        return ProcessPoolExecutor(1, mp_context=context, initializer=die_with_parent, initargs=(os.getpid(),))

    def _submit(self, path: Path) -> Future:
        if self._pool is None:
            self._pool = self._start_pool()
        future = self._pool.submit(plan_slide, path, self.mpp_overrides.get(path.stem), self.settings)
        self._futures[path] = future
        return future

    def _submit_through(self, index: int) -> None:
        while self._next <= index:
            path = self.slides.get(self._next)
            if path is None:
                return
            self._submit(path)
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
        self._submit_through(self.slides.position(path) + self.ahead)
        future = self._futures.pop(path, None)
        if future is None:  # forgotten, then asked again: plan it anew
            future = self._submit(path)
            del self._futures[path]
        try:
            grid, qc_partial = future.result()
        except BrokenProcessPool:
            self._restart()
            return False, SlideReadError(
                f"{path}: reading the slide crashed the process (a fault in the slide library); "
                "check that the file opens in another viewer, or move it out of the folder"
            )
        except Exception as error:  # noqa: BLE001 - the slide's own error, raised to each asker
            if not future.done() or future.exception() is not error:
                # Raised while waiting by a signal handler (DataLoader's, when a reading worker
                # dies): not this slide's answer, which is still to come.
                self._futures[path] = future
                raise
            return False, error
        if qc_partial is not None:
            self._qc[path] = qc_partial
        return True, grid

    def publish_qc(self, path: Path) -> None:
        """Give the QC image of ``path`` (whose output is complete) its final name."""
        partial = self._qc.pop(path, None)
        if partial is not None and self.settings.qc_dir is not None:
            os.replace(partial, self.settings.qc_dir / f"{path.stem}.png")

    def forget(self, path: Path) -> None:
        """Drop the kept answer for ``path`` (its slide is finished); an unpublished QC image is deleted."""
        self._results.pop(path, None)
        partial = self._qc.pop(path, None)
        if partial is not None:
            partial.unlink(missing_ok=True)

    def _restart(self) -> None:
        """Replace a broken pool and submit again what it had not finished."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None
        pending = sorted(self._futures, key=self.slides.position)
        self._futures.clear()
        for path in pending:
            self._submit(path)

    def close(self) -> None:
        """Stop the planner; QC images of slides planned but not published are deleted."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None
        for future in self._futures.values():
            if future.done() and not future.cancelled() and future.exception() is None:
                partial = future.result()[1]  # planned ahead, never collected
                if partial is not None:
                    partial.unlink(missing_ok=True)
        for partial in self._qc.values():
            partial.unlink(missing_ok=True)
        self._futures.clear()
        self._results.clear()
        self._qc.clear()
