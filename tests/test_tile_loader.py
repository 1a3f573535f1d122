import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from extract.reader import SlideReader, SlideReadError, open_slide
from extract.tile_loader import TileLoader
from extract.tiling import tile_grid
from fixtures.make_slides import write_tissue_slide


@pytest.fixture()
def two_slides(tmp_path: Path) -> list[Path]:
    return [write_tissue_slide(tmp_path / "a.tif", mpp=0.5, seed=1),
            write_tissue_slide(tmp_path / "b.tif", width=1024, height=512, mpp=0.25, seed=2)]


def _grid_and_expected(path: Path):
    with open_slide(path) as reader:
        grid = tile_grid(reader, 1.0, 32, 0.5)
        expected = np.stack([reader.read_tile(int(x), int(y), grid.size_level0, 32) for x, y in grid.coords])
    return grid, expected


def _read(loader: TileLoader, path: Path, grid) -> np.ndarray:
    return np.concatenate([b.numpy() for b in loader.tiles(path, grid.mpp, grid.coords, grid.size_level0, 32)])


@pytest.mark.parametrize("workers", [0, 2])
def test_one_loader_reads_every_slide_in_grid_order(two_slides, workers):
    loader = TileLoader(batch_size=5, num_workers=workers)
    for path in two_slides + two_slides[:1]:
        grid, expected = _grid_and_expected(path)
        np.testing.assert_array_equal(_read(loader, path, grid), expected)
    loader.close()


def test_a_slide_starts_with_a_small_batch():
    from extract.tile_loader import SlideTileBatches

    batches = SlideTileBatches(batch_size=16, first_batch_size=4)
    batches.set_slide(Path("s.svs"), 0.5, np.arange(2 * 40).reshape(40, 2), 224.0, 224)
    sizes = [len(batch) for batch in batches]
    assert sizes == [4, 16, 16, 4] and len(batches) == 4
    assert [key.x0 for batch in batches for key in batch] == list(range(0, 80, 2))
    batches.set_slide(Path("s.svs"), 0.5, np.zeros((3, 2)), 224.0, 224)
    assert [len(batch) for batch in batches] == [3]
    batches.set_slide(Path("s.svs"), 0.5, np.zeros((0, 2)), 224.0, 224)
    assert list(batches) == [] and len(batches) == 0


def test_workers_serve_every_slide_and_stop_on_close(two_slides):
    before = {p.pid for p in multiprocessing.active_children()}
    loader = TileLoader(batch_size=4, num_workers=2)
    grids = [_grid_and_expected(path)[0] for path in two_slides]
    _read(loader, two_slides[0], grids[0])
    workers = {p.pid for p in multiprocessing.active_children()} - before
    assert len(workers) == 2
    _read(loader, two_slides[1], grids[1])
    assert workers <= {p.pid for p in multiprocessing.active_children()}  # the same processes
    loader.close()
    import gc
    gc.collect()
    assert not workers & {p.pid for p in multiprocessing.active_children()}


def test_a_slide_that_fails_to_read_does_not_break_the_next(two_slides, monkeypatch):
    original = SlideReader.read_tile

    def broken_for_a(self, x0, y0, size_level0, out_px):
        if self.path.name == "a.tif":
            raise SlideReadError(f"{self.path}: boom")
        return original(self, x0, y0, size_level0, out_px)

    monkeypatch.setattr(SlideReader, "read_tile", broken_for_a)  # forked workers inherit it
    loader = TileLoader(batch_size=4, num_workers=2)
    with open_slide(two_slides[0]) as reader:
        grid_a = tile_grid(reader, 1.0, 32, 0.5)
    with pytest.raises(Exception, match="boom"):
        _read(loader, two_slides[0], grid_a)
    grid_b, expected_b = _grid_and_expected(two_slides[1])
    np.testing.assert_array_equal(_read(loader, two_slides[1], grid_b), expected_b)
    loader.close()


def test_a_worker_killed_by_a_slide_is_replaced(two_slides, monkeypatch):
    """A segfault in the slide library kills the reading worker: that slide fails, the next reads."""
    import os

    original = SlideReader.read_tile

    def crash_on_a(self, x0, y0, size_level0, out_px):
        if self.path.name == "a.tif":
            os._exit(11)
        return original(self, x0, y0, size_level0, out_px)

    monkeypatch.setattr(SlideReader, "read_tile", crash_on_a)  # forked workers inherit it
    loader = TileLoader(batch_size=4, num_workers=2)
    with open_slide(two_slides[0]) as reader:
        grid_a = tile_grid(reader, 1.0, 32, 0.5)
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        _read(loader, two_slides[0], grid_a)
    grid_b, expected_b = _grid_and_expected(two_slides[1])
    np.testing.assert_array_equal(_read(loader, two_slides[1], grid_b), expected_b)
    loader.close()
