import gc
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from extract.slides.formats import open_slide
from extract.slides.reader import SlideReader, SlideReadError
from extract.slides.tiling import NoTissueError, tile_grid
from extract.tile_loader import FIRST_BATCH_SIZE, ReadingWorkerDied, TileStream, batch_bounds
from fixtures.make_slides import write_tissue_slide


@pytest.fixture()
def slides(tmp_path: Path) -> list[Path]:
    return [
        write_tissue_slide(tmp_path / "a.tif", mpp=0.5, seed=1),
        write_tissue_slide(tmp_path / "b.tif", width=1024, height=512, mpp=0.25, seed=2),
        write_tissue_slide(tmp_path / "c.tif", mpp=0.5, seed=3),
    ]


def _grid(path: Path):
    with open_slide(path) as reader:
        return tile_grid(reader, 1.0, 32, 0.5)


def _expected(path: Path, grid) -> np.ndarray:
    with open_slide(path) as reader:
        return np.stack([reader.read_tile(int(x), int(y), grid.size_level0, 32) for x, y in grid.coords])


def _read(stream: TileStream, path: Path, grid) -> np.ndarray:
    return np.concatenate([b.numpy() for b in stream.tiles(path, grid)])


def test_batch_bounds_start_small():
    assert FIRST_BATCH_SIZE == 4
    assert batch_bounds(40, 16) == [(0, 4), (4, 20), (20, 36), (36, 40)]
    assert batch_bounds(3, 16) == [(0, 3)]
    assert batch_bounds(0, 16) == []
    assert batch_bounds(5, 2) == [(0, 2), (2, 4), (4, 5)]


@pytest.mark.parametrize("workers", [0, 2])
def test_one_pass_reads_every_slide_in_grid_order(slides, workers):
    grids = {path: _grid(path) for path in slides}
    stream = TileStream(slides, grids.__getitem__, batch_size=5, num_workers=workers)
    for path in slides:
        np.testing.assert_array_equal(_read(stream, path, grids[path]), _expected(path, grids[path]))
    stream.close()


def test_workers_serve_every_slide_and_stop_on_close(slides):
    grids = {path: _grid(path) for path in slides}
    before = {p.pid for p in multiprocessing.active_children()}
    stream = TileStream(slides, grids.__getitem__, batch_size=4, num_workers=2)
    _read(stream, slides[0], grids[slides[0]])
    workers = {p.pid for p in multiprocessing.active_children()} - before
    assert len(workers) == 2
    _read(stream, slides[1], grids[slides[1]])
    assert workers <= {p.pid for p in multiprocessing.active_children()}  # the same processes
    stream.close()
    gc.collect()
    assert not workers & {p.pid for p in multiprocessing.active_children()}


def test_a_slide_left_out_or_given_up_on_does_not_disturb_the_next(slides):
    grids = {path: _grid(path) for path in slides}
    stream = TileStream(slides, grids.__getitem__, batch_size=4, num_workers=2)
    first = stream.tiles(slides[0], grids[slides[0]])
    next(first)
    first.close()  # given up after one batch
    # slides[1] is left out entirely (its extraction failed before reading)
    np.testing.assert_array_equal(_read(stream, slides[2], grids[slides[2]]), _expected(slides[2], grids[slides[2]]))
    stream.close()


def test_a_slide_whose_grid_fails_is_passed_over(slides):
    grids = {path: _grid(path) for path in slides}

    def grid_of(path):
        if path.name == "b.tif":
            raise NoTissueError(f"{path}: no tissue")
        return grids[path]

    stream = TileStream(slides, grid_of, batch_size=4, num_workers=2)
    for path in (slides[0], slides[2]):
        np.testing.assert_array_equal(_read(stream, path, grids[path]), _expected(path, grids[path]))
    stream.close()


@pytest.mark.parametrize("failure", ["error", "crash"])
def test_a_slide_that_fails_to_read_does_not_stop_the_next(slides, monkeypatch, failure):
    """A tile that cannot be read fails its slide; a segfault in the slide library (a killed
    reading worker) ends the pass with ReadingWorkerDied; either way the next slide reads."""
    original = SlideReader.read_tile

    def broken_for_a(self, x0, y0, size_level0, out_px):
        if self.path.name == "a.tif":
            if failure == "crash":
                os._exit(11)
            raise SlideReadError(f"{self.path}: cannot read a tile at ({x0}, {y0}): boom")
        return original(self, x0, y0, size_level0, out_px)

    monkeypatch.setattr(SlideReader, "read_tile", broken_for_a)  # forked workers inherit it
    grids = {path: _grid(path) for path in slides}
    stream = TileStream(slides, grids.__getitem__, batch_size=4, num_workers=2)
    expected_error, match = {
        "error": (SlideReadError, r"a\.tif: cannot read a tile at .*boom"),
        "crash": (ReadingWorkerDied, r"a\.tif: a tile-reading worker died"),
    }[failure]
    with pytest.raises(expected_error, match=match):
        _read(stream, slides[0], grids[slides[0]])
    np.testing.assert_array_equal(_read(stream, slides[1], grids[slides[1]]), _expected(slides[1], grids[slides[1]]))
    stream.close()
