"""Grid cells, slide-level augmentation invariants, duplicate merging and batching for sparse convs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gigassl.sparse.conv import make_sparse_tensor, strided_conv3x3
from gigassl.sparse.maps import (
    MAP_MARGIN,
    SparseBatch,
    augment_cells,
    collate_views,
    flip_cells,
    merge_duplicates,
    tile_cells,
)


def _random_cells(rng: np.random.Generator, n: int = 40, extent: int = 30) -> np.ndarray:
    cells = rng.choice(extent * extent, size=n, replace=False)
    return np.stack([cells % extent, cells // extent], axis=1).astype(np.int64)


def test_tile_cells_makes_neighbouring_tiles_neighbouring_cells() -> None:
    step = 448.0  # a 224-px tile read at level 0 with downsample 2
    coords = np.array([[10_000, 5_000], [10_448, 5_000], [10_000, 5_448], [11_344, 6_344]], dtype=np.int64)
    cells = tile_cells(coords, step)
    assert cells.dtype == np.int64
    np.testing.assert_array_equal(cells, [[0, 0], [1, 0], [0, 1], [3, 3]])


def test_tile_cells_rounds_off_grid_coords_and_rejects_bad_steps() -> None:
    np.testing.assert_array_equal(tile_cells(np.array([[0, 0], [510, 1]]), 512), [[0, 0], [1, 0]])
    with pytest.raises(ValueError, match="tile_step_level0"):
        tile_cells(np.zeros((2, 2)), 0.0)
    with pytest.raises(ValueError, match=r"\(T, 2\)"):
        tile_cells(np.zeros((2, 3)), 1.0)


@pytest.mark.parametrize("flip_x, flip_y", [(True, False), (False, True), (True, True)])
def test_two_flips_are_the_identity(flip_x: bool, flip_y: bool) -> None:
    cells = _random_cells(np.random.default_rng(1))
    once = flip_cells(cells, flip_x, flip_y)
    assert not np.array_equal(once, cells)
    np.testing.assert_array_equal(flip_cells(once, flip_x, flip_y), cells - cells.min(axis=0))


def test_flip_mirrors_the_axis_it_names() -> None:
    cells = np.array([[0, 0], [2, 0], [0, 1]])
    np.testing.assert_array_equal(flip_cells(cells, True, False), [[2, 0], [0, 0], [2, 1]])
    np.testing.assert_array_equal(flip_cells(cells, False, True), [[0, 1], [2, 1], [0, 0]])


def test_augment_keeps_one_row_per_tile_starting_at_zero() -> None:
    rng = np.random.default_rng(2)
    cells = _random_cells(rng)
    for _ in range(20):
        out = augment_cells(cells, rng)
        assert out.shape == cells.shape and out.dtype == np.int64
        np.testing.assert_array_equal(out.min(axis=0), [0, 0])
        assert 1 <= len(np.unique(out, axis=0)) <= len(cells)


def test_right_angle_rotations_at_unit_scale_never_merge_tiles() -> None:
    rng = np.random.default_rng(3)
    cells = _random_cells(rng)
    for _ in range(20):
        out = augment_cells(cells, rng, scale_range=(1.0, 1.0), rotation="quarter")
        assert len(np.unique(out, axis=0)) == len(cells)
        # a rigid motion of the grid keeps every pairwise distance
        before = np.linalg.norm(cells[:, None] - cells[None], axis=-1)
        after = np.linalg.norm(out[:, None] - out[None], axis=-1)
        np.testing.assert_allclose(after, before)


def test_any_rotation_with_scale_two_keeps_every_tile_apart() -> None:
    # cells ≥ 1 apart scaled by 2 are ≥ 2 apart; rounding moves each by ≤ √2/2, so none merge
    rng = np.random.default_rng(4)
    cells = _random_cells(rng)
    for _ in range(20):
        out = augment_cells(cells, rng, scale_range=(2.0, 2.0), rotation="any")
        assert len(np.unique(out, axis=0)) == len(cells)


def test_shrinking_merges_tiles_but_keeps_rows() -> None:
    rng = np.random.default_rng(5)
    cells = np.stack(np.meshgrid(np.arange(6), np.arange(6)), -1).reshape(-1, 2)
    out = augment_cells(cells, rng, scale_range=(0.5, 0.5), rotation="none")
    assert len(out) == len(cells)
    assert len(np.unique(out, axis=0)) < len(cells)
    np.testing.assert_array_equal(out.max(axis=0), [2, 2])  # centred −2.5 … 2.5, halved, rounds to −1 … 1


def test_scale_is_drawn_per_axis_within_the_range() -> None:
    rng = np.random.default_rng(6)
    line = np.stack([np.arange(101), np.arange(101)], 1)  # extent 100 on both axes
    extents = np.array([augment_cells(line, rng, (0.5, 2.0), rotation="none").max(axis=0) for _ in range(200)])
    assert extents.min() >= 50 and extents.max() <= 200
    assert (extents[:, 0] != extents[:, 1]).mean() > 0.9  # independent axes


def test_augmentation_is_reproducible_from_the_generator() -> None:
    cells = _random_cells(np.random.default_rng(7))
    a = augment_cells(cells, np.random.default_rng(11))
    b = augment_cells(cells, np.random.default_rng(11))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="scale_range"):
        augment_cells(cells, np.random.default_rng(0), scale_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="rotation"):
        augment_cells(cells, np.random.default_rng(0), rotation="sideways")


def test_merge_duplicates_averages_tiles_on_one_cell() -> None:
    cells = np.array([[1, 0], [0, 0], [1, 0], [2, 2]])
    features = np.array([[1.0, 2.0], [5.0, 5.0], [3.0, 4.0], [7.0, 8.0]], dtype=np.float32)
    unique, merged = merge_duplicates(cells, features)
    np.testing.assert_array_equal(unique, [[0, 0], [1, 0], [2, 2]])
    np.testing.assert_allclose(merged, [[5.0, 5.0], [2.0, 3.0], [7.0, 8.0]])


def test_merge_without_duplicates_keeps_each_feature_on_its_cell() -> None:
    rng = np.random.default_rng(8)
    cells = _random_cells(rng, n=10)
    features = rng.standard_normal((10, 3)).astype(np.float32)
    unique, merged = merge_duplicates(cells, features)
    lookup = {tuple(c): f for c, f in zip(cells, features)}
    for c, f in zip(unique, merged):
        np.testing.assert_array_equal(f, lookup[tuple(c)])


def test_collate_swaps_to_batch_y_x_with_margin_and_room_for_the_strided_conv() -> None:
    f0 = np.arange(2 * 4, dtype=np.float32).reshape(2, 4)
    f1 = np.ones((3, 4), dtype=np.float32)
    batch = collate_views([(f0, np.array([[5, 0], [0, 2]])), (f1, np.array([[0, 0], [1, 0], [1, 0]]))])
    assert isinstance(batch, SparseBatch) and batch.batch_size == 2
    assert batch.indices.dtype == torch.int32 and batch.features.dtype == torch.float32
    m = MAP_MARGIN
    rows = {tuple(i): f for i, f in zip(batch.indices.tolist(), batch.features)}
    assert len(rows) == 4  # the duplicate of view 1 is merged
    torch.testing.assert_close(rows[(0, 0 + m, 5 + m)], torch.from_numpy(f0[0]))
    torch.testing.assert_close(rows[(0, 2 + m, 0 + m)], torch.from_numpy(f0[1]))
    assert (1, 0 + m, 1 + m) in rows
    assert batch.spatial_shape == [2 + m + 3, 5 + m + 3]


@pytest.mark.parametrize("backend", ["torch", pytest.param("spconv", marks=pytest.mark.spconv)])
def test_a_maps_strided_conv_output_does_not_depend_on_the_batch_grid(backend: str) -> None:
    conv = strided_conv3x3(1, 1, backend)
    small = (np.ones((2, 1), np.float32), np.array([[0, 0], [0, 7]]))  # last cell on an even row
    large = (np.ones((2, 1), np.float32), np.array([[0, 0], [0, 30]]))
    alone = conv(_tensor(collate_views([small]), backend)).indices
    together = conv(_tensor(collate_views([small, large]), backend)).indices
    assert sorted(alone.tolist()) == sorted(i for i in together.tolist() if i[0] == 0)


def test_collate_rejects_empty_and_mismatched_views() -> None:
    with pytest.raises(ValueError, match="at least one"):
        collate_views([])
    with pytest.raises(ValueError, match="feature size"):
        collate_views([(np.zeros((1, 4)), np.zeros((1, 2))), (np.zeros((1, 5)), np.zeros((1, 2)))])
    with pytest.raises(ValueError, match="t ≥ 1"):
        collate_views([(np.zeros((0, 4)), np.zeros((0, 2)))])


@pytest.mark.parametrize("backend", ["torch", pytest.param("spconv", marks=pytest.mark.spconv)])
def test_sparse_tensor_places_features_on_their_cells(backend: str) -> None:
    features = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    cells = np.array([[3, 0], [0, 1]])  # (x, y)
    tensor = _tensor(collate_views([(features, cells)]), backend)
    dense = tensor.dense()  # (B, C, H, W)
    m = MAP_MARGIN
    torch.testing.assert_close(dense[0, :, 0 + m, 3 + m], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(dense[0, :, 1 + m, 0 + m], torch.tensor([0.0, 2.0]))
    assert dense.abs().sum().item() == pytest.approx(3.0)


def _tensor(batch, backend: str):
    return make_sparse_tensor(batch.features, batch.indices, batch.spatial_shape, batch.batch_size, backend)
