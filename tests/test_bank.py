"""The shared-augmentation bank: sampling, sharing, reproducibility, reads saved, storage."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from extract.augment import AugmentationParams, TileAugmentation
from extract.bank import build_bank, sample_tile_indices
from extract.config import ExtractConfig
from extract.encoders.tile_encoder import IMAGE_MEAN, IMAGE_STD, EncoderInfo, ResNet18, TileTrunk
from extract.features.slide_file import SlideFeatures, SlideFileWriter

TILE_PX = 32
CPU = torch.device("cpu")


class FakeReader:
    """Tiles of random pixels determined by their position; counts reads."""

    def __init__(self, slide_id: str = "fake-slide") -> None:
        self.slide_id = slide_id
        self.reads: list[tuple[int, int]] = []

    def read_tile(self, x0: int, y0: int, size_level0: float, out_px: int) -> np.ndarray:
        self.reads.append((x0, y0))
        rng = np.random.default_rng([x0, y0])
        return rng.integers(0, 256, size=(out_px, out_px, 3), dtype=np.uint8)


def _grid(n_tiles: int, size_level0: float = 64.0) -> SimpleNamespace:
    coords = np.array([[int(i % 7 * size_level0), int(i // 7 * size_level0)] for i in range(n_tiles)], dtype=np.int64)
    return SimpleNamespace(coords=coords.reshape(-1, 2), size_level0=size_level0)


def _config(tmp_path: Path, **changes) -> ExtractConfig:
    settings = dict(
        slides=tmp_path,
        out=tmp_path,
        tile_size_px=TILE_PX,
        n_augmentations=4,
        n_tiles_per_augmentation=8,
        batch_size=5,
        mixed_precision=False,
        device="cpu",
    )
    settings.update(changes)
    return ExtractConfig(**settings)


@pytest.fixture(scope="module")
def trunk() -> TileTrunk:
    torch.manual_seed(0)
    return TileTrunk(ResNet18()).eval().to(memory_format=torch.channels_last)  # as run.py prepares it


def test_bank_shapes_coords_and_attrs(tmp_path: Path, trunk: TileTrunk) -> None:
    grid = _grid(20)
    result = build_bank(FakeReader(), grid, trunk, _config(tmp_path), CPU)
    assert result.features.shape == (4, 8, 256) and result.features.dtype == np.float16
    assert result.coords.shape == (4, 8, 2) and result.coords.dtype == np.int64
    assert np.array_equal(result.coords, grid.coords[result.indices])
    assert all(len(set(row)) == 8 for row in result.indices.tolist()), "N ≥ K: no tile twice in one augmentation"
    assert np.isfinite(result.features.astype(np.float32)).all()
    attrs = json.loads(json.dumps(result.attrs))  # plain JSON
    assert attrs["n_augmentations"] == 4 and attrs["n_tiles"] == 8 and attrs["seed"] == 0
    assert attrs["sampled_with_replacement"] is False and attrs["n_tissue_tiles"] == 20
    assert len(attrs["augmentation"]["draws"]) == 4
    assert attrs["augmentation"]["settings"]["crop_scale"] == [0.5, 1.0]
    # Different augmentations of the bank differ (they are not one draw repeated).
    assert len({json.dumps(d, sort_keys=True) for d in attrs["augmentation"]["draws"]}) == 4


def test_every_row_is_its_tile_under_the_recorded_shared_augmentation(tmp_path: Path, trunk: TileTrunk) -> None:
    reader, grid = FakeReader(), _grid(20)
    result = build_bank(reader, grid, trunk, _config(tmp_path), CPU)
    augmentation = TileAugmentation()
    for a, draw in enumerate(result.attrs["augmentation"]["draws"]):
        tiles = np.stack([reader.read_tile(int(x), int(y), grid.size_level0, TILE_PX) for x, y in result.coords[a]])
        images = torch.from_numpy(tiles).permute(0, 3, 1, 2)
        images = augmentation.apply(images, AugmentationParams.from_json([draw]), normalize=(IMAGE_MEAN, IMAGE_STD))
        with torch.inference_mode():
            expected = trunk(images).numpy()
        assert np.allclose(result.features[a].astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def test_same_seed_same_bank_other_seed_or_slide_other_bank(tmp_path: Path, trunk: TileTrunk) -> None:
    grid, config = _grid(30), _config(tmp_path, mixed_precision=True, n_augmentations=3, n_tiles_per_augmentation=6)
    first = build_bank(FakeReader(), grid, trunk, config, CPU)
    second = build_bank(FakeReader(), grid, trunk, config, CPU)
    assert np.array_equal(first.features, second.features)
    assert np.array_equal(first.coords, second.coords)
    assert first.attrs == second.attrs
    for other_seed, other_slide in ((1, "fake-slide"), (0, "another-slide")):
        other = build_bank(FakeReader(other_slide), grid, trunk, replace(config, seed=other_seed, n_augmentations=1), CPU)
        assert not np.array_equal(first.indices[:1], other.indices)
        assert first.attrs["augmentation"]["draws"][:1] != other.attrs["augmentation"]["draws"]


class BrokenReader(FakeReader):
    def read_tile(self, x0: int, y0: int, size_level0: float, out_px: int) -> np.ndarray:
        if (x0, y0) == (128, 64):
            raise OSError(f"cannot decode the tile at ({x0}, {y0})")
        return super().read_tile(x0, y0, size_level0, out_px)


def test_a_tile_that_cannot_be_read_fails_the_bank(tmp_path: Path, trunk: TileTrunk) -> None:
    with pytest.raises(OSError, match=r"\(128, 64\)"):
        build_bank(BrokenReader(), _grid(10), trunk, _config(tmp_path, n_tiles_per_augmentation=10), CPU)


def test_a_smaller_bank_is_a_prefix_of_a_larger_one(tmp_path: Path, trunk: TileTrunk) -> None:
    grid = _grid(30)
    large = build_bank(FakeReader(), grid, trunk, _config(tmp_path, n_augmentations=4), CPU)
    small = build_bank(FakeReader(), grid, trunk, _config(tmp_path, n_augmentations=2), CPU)
    assert np.array_equal(small.indices, large.indices[:2])
    assert np.array_equal(small.features, large.features[:2])


def test_fewer_tiles_than_k_sampled_with_replacement_each_tile_read_once(tmp_path: Path, trunk: TileTrunk) -> None:
    reader, grid = FakeReader(), _grid(6)
    result = build_bank(reader, grid, trunk, _config(tmp_path, n_augmentations=5, n_tiles_per_augmentation=16), CPU)
    assert result.attrs["sampled_with_replacement"] is True
    assert len(reader.reads) == len(set(reader.reads)) == len(np.unique(result.indices)), "decoded once per slide"
    # A tile drawn twice in one augmentation has the same row (embedded once, copied).
    for a in range(5):
        for row in np.unique(result.indices[a]):
            same = result.features[a][result.indices[a] == row]
            assert (same == same[0]).all()
    assert result.timings["n_encoded"] < 5 * 16


def test_cache_budget_changes_reads_not_values(tmp_path: Path, trunk: TileTrunk) -> None:
    grid, config = _grid(6), _config(tmp_path, n_tiles_per_augmentation=16)
    cached_reader, uncached_reader = FakeReader(), FakeReader()
    cached = build_bank(cached_reader, grid, trunk, config, CPU)
    uncached = build_bank(uncached_reader, grid, trunk, config, CPU, cache_budget_bytes=0)
    assert np.array_equal(cached.features, uncached.features)
    assert len(uncached_reader.reads) > len(cached_reader.reads)


def test_slide_with_fewer_than_five_tiles_still_gets_a_bank(tmp_path: Path, trunk: TileTrunk) -> None:
    result = build_bank(FakeReader(), _grid(2), trunk, _config(tmp_path), CPU)
    assert result.features.shape == (4, 8, 256)
    assert result.attrs["sampled_with_replacement"] is True and result.attrs["n_tissue_tiles"] == 2
    assert set(np.unique(result.indices)) <= {0, 1}


def test_refuses_no_tiles_training_trunk_and_empty_bank(tmp_path: Path, trunk: TileTrunk) -> None:
    with pytest.raises(ValueError, match="no tissue tiles"):
        build_bank(FakeReader(), _grid(0), trunk, _config(tmp_path), CPU)
    with pytest.raises(ValueError, match="must be ≥ 1"):
        build_bank(FakeReader(), _grid(5), trunk, _config(tmp_path, n_augmentations=0), CPU)
    training = TileTrunk(ResNet18()).train()
    with pytest.raises(ValueError, match=r"trunk.eval\(\)"):
        build_bank(FakeReader(), _grid(5), training, _config(tmp_path), CPU)


def test_sample_tile_indices_without_and_with_replacement() -> None:
    rng = np.random.default_rng(0)
    rows, replaced = sample_tile_indices(300, 50, 256, rng)
    assert rows.shape == (50, 256) and not replaced
    assert all(len(np.unique(r)) == 256 for r in rows) and rows.max() < 300
    rows, replaced = sample_tile_indices(10, 3, 256, rng)
    assert replaced and set(np.unique(rows)) == set(range(10))


def test_bank_written_and_read_back_one_augmentation_at_a_time(tmp_path: Path, trunk: TileTrunk) -> None:
    result = build_bank(FakeReader(), _grid(12), trunk, _config(tmp_path, mixed_precision=True), CPU)
    path = tmp_path / "fake-slide.h5"
    encoder = EncoderInfo(name="random", sha256="0" * 64, source="random")
    with SlideFileWriter(path, slide_id="fake-slide", source="fake", settings={}, encoder=encoder) as writer:
        writer.create_bank(4, 8, result.attrs)
        for a in range(4):
            writer.write_augmentation(a, result.features[a], result.coords[a])
    with SlideFeatures(path, require_bank=True) as slide:
        assert slide.n_augmentations == 4 and slide.bank_size == 8
        assert slide.bank_attrs["sampled_with_replacement"] == False  # noqa: E712 - numpy bool
        assert json.loads(slide.bank_attrs["augmentation"])["draws"] == result.attrs["augmentation"]["draws"]
        for a in range(4):
            features, coords = slide.augmentation(a)
            order = np.lexsort((result.coords[a][:, 1], result.coords[a][:, 0]))  # stored by position
            assert np.array_equal(features, result.features[a][order].astype(np.float32))
            assert np.array_equal(coords, result.coords[a][order])


def test_real_slide_bank(slides_dir: Path, trunk: TileTrunk, tmp_path: Path) -> None:
    from extract.slides.formats import open_slide
    from extract.slides.tiling import tile_grid

    config = _config(
        tmp_path, tile_size_px=224, n_augmentations=2, n_tiles_per_augmentation=6, batch_size=6, mixed_precision=True
    )
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as reader:
        grid = tile_grid(reader, target_mpp=0.5, tile_size_px=224, tissue_threshold=0.5)
        result = build_bank(reader, grid, trunk, config, CPU)
    assert result.features.shape == (2, 6, 256)
    assert np.isfinite(result.features.astype(np.float32)).all()
    assert np.array_equal(result.coords, grid.coords[result.indices])
    assert result.attrs["n_tissue_tiles"] == len(grid) and result.attrs["sampled_with_replacement"] is False
