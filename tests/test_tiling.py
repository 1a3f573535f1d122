"""The tile grid: cells at multiples of the tile's level-0 side, tissue filter, attributes."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.config import ExtractConfig, GridLimits
from extract.slides.formats import open_slide
from extract.slides.tiling import ImplausibleGridError, NoTissueError, SlideTooSmallError, grid_positions, tile_grid
from fixtures.make_slides import write_blank_slide, write_tissue_slide


def test_grid_on_a_real_slide(slides_dir: Path) -> None:
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as reader:
        grid = tile_grid(reader, target_mpp=0.5, tile_size_px=224, tissue_threshold=0.5)
    assert grid.size_level0 == pytest.approx(224 * 0.5 / 0.499)
    assert grid.coords.dtype == np.int64 and grid.coords.shape == (len(grid), 2)
    assert 20 < len(grid) < 120  # 9 × 13 cells, about 40 % tissue
    cells = grid.coords / grid.size_level0
    assert np.abs(cells - np.round(cells)).max() < 0.01
    assert (grid.coords >= 0).all()
    assert (grid.coords[:, 0] + grid.size_level0 <= 2220 + 1e-6).all()
    assert (grid.coords[:, 1] + grid.size_level0 <= 2967 + 1e-6).all()
    assert (grid.tissue_fraction >= 0.5).all()
    assert len(np.unique(grid.coords, axis=0)) == len(grid)
    assert grid.attrs() == {
        "patch_size": 224,
        "patch_size_level0": 224,
        "patch_size_level0_exact": pytest.approx(224.449, abs=1e-3),
        "mpp": pytest.approx(0.499),
        "target_mpp": 0.5,
        "level0_width": 2220,
        "level0_height": 2967,
        "level0_magnification": 20.0,
        "tissue_threshold": 0.5,
    }


def test_kept_tiles_are_exactly_the_tissue_cells(tmp_path: Path) -> None:
    with open_slide(write_tissue_slide(tmp_path / "tissue.tif")) as reader:
        grid = tile_grid(reader, target_mpp=0.5, tile_size_px=64, tissue_threshold=0.5)
    # Boxes (64..448)² and (512..704)×(128..384) on a 64-px grid: 6 × 6 + 3 × 4 cells.
    expected = {(x, y) for x in range(64, 448, 64) for y in range(64, 448, 64)}
    expected |= {(x, y) for x in range(512, 704, 64) for y in range(128, 384, 64)}
    assert {tuple(c) for c in grid.coords.tolist()} == expected
    assert grid.size_level0 == 64.0 and "level0_magnification" not in grid.attrs()


def test_target_mpp_scales_the_level0_footprint(tmp_path: Path) -> None:
    with open_slide(write_tissue_slide(tmp_path / "tissue.tif")) as reader:
        grid = tile_grid(reader, target_mpp=1.0, tile_size_px=64, tissue_threshold=0.0)
    assert grid.size_level0 == 128.0
    assert len(grid) == (768 // 128) * (512 // 128)
    assert set(np.unique(grid.coords[:, 0]).tolist()) == {0, 128, 256, 384, 512, 640}


def test_grid_positions_round_fractional_steps() -> None:
    starts = grid_positions(1000, 224.4489)
    assert starts.tolist() == [0, 224, 449, 673]
    assert grid_positions(100, 224.0).size == 0


def test_blank_slide_is_a_clear_error(tmp_path: Path) -> None:
    with open_slide(write_blank_slide(tmp_path / "blank.tif")) as reader:
        with pytest.raises(NoTissueError, match="blank.tif.*tissue"):
            tile_grid(reader, target_mpp=0.5, tile_size_px=64, tissue_threshold=0.5)


def test_slide_smaller_than_a_tile_is_a_clear_error(slides_dir: Path) -> None:
    with open_slide(slides_dir / "openslide" / "small.svs") as reader:
        with pytest.raises(SlideTooSmallError, match="small.svs.*smaller than one tile.*--tile-size"):
            tile_grid(reader, target_mpp=0.5, tile_size_px=224, tissue_threshold=0.5)


def _refused_quickly(path: Path, limits: GridLimits = GridLimits(), **open_kwargs) -> str:
    """tile_grid's refusal of ``path``: within a second and 20 MB of Python/numpy allocations."""
    started = time.perf_counter()
    tracemalloc.start()
    try:
        with open_slide(path, **open_kwargs) as reader:
            with pytest.raises(ImplausibleGridError) as refusal:
                tile_grid(reader, target_mpp=0.5, tile_size_px=224, tissue_threshold=0.5, limits=limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0 and peak < 20e6
    message = str(refusal.value)
    assert "\n" not in message and str(path) in message
    return message


def test_absurd_resolution_tag_is_refused_before_planning(slides_dir: Path) -> None:
    # boxes.tiff says 72 dpi (352.8 µm/px): today's planner made 366,397 tiles of it.
    message = _refused_quickly(slides_dir / "openslide" / "boxes.tiff")
    assert "352.778 µm/px from the TIFF resolution tag (72 dpi" in message
    assert "--mpp-csv" in message and "slide=boxes" in message and "--max-level0-mpp" in message


def test_absurd_default_mpp_and_csv_are_refused_naming_their_source(tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    Image.new("RGB", (1000, 1000), (200, 110, 170)).save(image)  # --default-mpp 500 wrote 339 MB of tiles
    message = _refused_quickly(image, default_mpp=500.0)
    assert "500 µm/px from --default-mpp" in message and "correct --default-mpp" in message
    message = _refused_quickly(image, mpp_override=0.001)
    assert "0.001 µm/px from --mpp-csv" in message and "slide=photo of --mpp-csv" in message


def test_up_scaling_and_tile_count_are_bounded(tmp_path: Path, slides_dir: Path) -> None:
    image = tmp_path / "coarse.png"
    Image.new("RGB", (1000, 1000), (200, 110, 170)).save(image)
    message = _refused_quickly(image, default_mpp=10.0)  # plausible, but tiles would be 20× enlarged
    assert "enlarge the slide 20.0×" in message and "--max-upscale 4" in message
    message = _refused_quickly(slides_dir / "CMU-1-Small-Region.svs", GridLimits(max_tiles_per_slide=100))
    assert "grid of 117 tiles" in message and "--max-tiles-per-slide 100" in message
    with open_slide(image, default_mpp=10.0) as reader:  # the bounds are settings
        assert len(tile_grid(reader, 0.5, 224, 0.5, GridLimits(max_upscale=20.0))) > 0


def test_grid_limits_are_extract_settings() -> None:
    assert ExtractConfig(slides=Path("s"), out=Path("o")).grid_limits() == GridLimits()
    with pytest.raises(ValueError, match="--max-upscale 0.5"):
        ExtractConfig(slides=Path("s"), out=Path("o"), max_upscale=0.5)
    with pytest.raises(ValueError, match="--min-level0-mpp 30"):
        ExtractConfig(slides=Path("s"), out=Path("o"), min_level0_mpp=30.0)
