"""Sparse maps of tiles: grid cells, slide-level augmentation, batching for the sparse convs.

Conventions (one place for them):

- Coordinates read from the feature files are level-0 pixels in **(x, y)** order (TRIDENT/CLAM).
- Cells returned by :func:`tile_cells` and :func:`augment_cells` keep the **(x, y)** column order,
  as int64, shifted so that each axis starts at 0.
- sparse-conv indices are **(batch, y, x)** int32; :func:`collate_views` does the swap. It also places
  every map one cell away from the origin (``MAP_MARGIN``), so that the strided 3×3 convolution
  of the sparse layer4 (stride 2, no padding) sees the cells before the map as the zero padding
  of the dense ResNet18 layer4, and it leaves two empty cells after the last one on each axis,
  so that every stride-2 window holding a tile fits in the output: a map's output never depends
  on the size of the batch's grid (with less room, a strided conv drops the windows that hang
  past the grid's end).

Neighbouring tiles are neighbouring cells: coords are divided by the tile's size in level-0
pixels (``tile_step_level0``, the features file's attribute), the same factor for training and
inference (the original code used different factors; see docs/design.md §2.3).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

MAP_MARGIN = 1  # cells between the origin and a map; see the module docstring
ROTATIONS = ("any", "quarter", "none")


def _check_cells(cells: np.ndarray, name: str = "cells") -> np.ndarray:
    cells = np.asarray(cells)
    if cells.ndim != 2 or cells.shape[1] != 2:
        raise ValueError(f"{name} must have shape (T, 2) in (x, y) order, got {cells.shape}")
    return cells


def shift_to_origin(cells: np.ndarray) -> np.ndarray:
    """(T, 2) cells → the same cells translated so that each axis's minimum is 0 (int64)."""
    cells = _check_cells(cells).astype(np.int64)
    if len(cells) == 0:
        return cells.reshape(0, 2)
    return cells - cells.min(axis=0, keepdims=True)


def tile_cells(coords: np.ndarray, tile_step_level0: float) -> np.ndarray:
    """Level-0 (x, y) coords (T, 2) → grid cells (T, 2) int64, (x, y) order, starting at 0.

    ``tile_step_level0`` is the distance between neighbouring tiles in level-0 pixels, so that
    neighbouring tiles land on neighbouring cells.
    """
    coords = _check_cells(coords, "coords")
    if not np.isfinite(tile_step_level0) or tile_step_level0 <= 0:
        raise ValueError(
            f"tile_step_level0 must be a positive number of level-0 pixels, got {tile_step_level0}; "
            "read it from the features file (SlideFeatures.tile_step_level0)"
        )
    return shift_to_origin(np.rint(coords.astype(np.float64) / tile_step_level0))


def flip_cells(cells: np.ndarray, flip_x: bool, flip_y: bool) -> np.ndarray:
    """Mirror the map along x and/or y; (T, 2) → (T, 2) int64 starting at 0. Self-inverse."""
    cells = shift_to_origin(cells)
    if flip_x:
        cells[:, 0] = cells[:, 0].max(initial=0) - cells[:, 0]
    if flip_y:
        cells[:, 1] = cells[:, 1].max(initial=0) - cells[:, 1]
    return cells


def augment_cells(
    cells: np.ndarray,
    generator: np.random.Generator,
    scale_range: tuple[float, float] = (0.5, 2.0),
    rotation: str = "any",
) -> np.ndarray:
    """Slide-level augmentation of a map: (T, 2) cells → (T, 2) int64 cells, row order kept.

    In order: a flip of each axis with probability 1/2; a rotation about the map's centre
    (``"any"``: angle uniform in [0, 2π) as in the paper; ``"quarter"``: a multiple of 90°, which
    never merges tiles; ``"none"``); an independent scale per axis drawn from U[lo, hi]; then
    rounding to the grid and a shift to start at 0. Rounding may put two tiles on one cell
    (shrinking, or rotating by a non-right angle); :func:`merge_duplicates` averages them.
    """
    cells = shift_to_origin(cells)
    lo, hi = scale_range
    if not (0 < lo <= hi):
        raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {scale_range}")
    if rotation not in ROTATIONS:
        raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
    flip_x, flip_y = generator.random(2) < 0.5
    points = flip_cells(cells, bool(flip_x), bool(flip_y)).astype(np.float64)
    if rotation == "any":
        angle = generator.uniform(0.0, 2.0 * np.pi)
    elif rotation == "quarter":
        angle = 0.5 * np.pi * generator.integers(0, 4)
    else:
        angle = 0.0
    cos, sin = np.cos(angle), np.sin(angle)
    centred = points - points.mean(axis=0, keepdims=True) if len(points) else points
    rotated = centred @ np.array([[cos, sin], [-sin, cos]])  # row vectors: p @ R.T
    scaled = rotated * generator.uniform(lo, hi, size=2)
    return shift_to_origin(np.rint(scaled))


def merge_duplicates(cells: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average the features of tiles on the same cell.

    (T, 2) cells, (T, D) features → (U, 2) unique cells (sorted by x then y), (U, D) float32 means.
    """
    cells = _check_cells(cells).astype(np.int64)
    features = np.asarray(features)
    if features.ndim != 2 or len(features) != len(cells):
        raise ValueError(f"features must have shape (T, D) with T = {len(cells)} cells, got {features.shape}")
    if len(cells) == 0:
        return cells.reshape(0, 2), features.astype(np.float32)
    shifted = cells - cells.min(axis=0)
    representatives, means = _mean_per_key(shifted[:, 0] * (int(shifted[:, 1].max()) + 1) + shifted[:, 1], features)
    return cells[representatives], means


def _mean_per_key(keys: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sharing a key averaged: (N,) int keys, (N, D) features → one row index per distinct
    key, in key order, and the (U, D) float32 means (summed in float64 when keys repeat)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    first = np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))
    features = np.asarray(features)[order]
    if len(first) < len(features):
        counts = np.diff(np.append(first, len(features)))
        features = np.add.reduceat(features.astype(np.float64), first, axis=0) / counts[:, None]
    return order[first], np.ascontiguousarray(features, dtype=np.float32)


class SparseBatch(NamedTuple):
    """A batch of sparse maps, (batch, y, x) layout (plain tensors, on the CPU until moved).

    features: (N, D) float32, N = active sites of all maps; indices: (N, 3) int32 (batch, y, x);
    spatial_shape: [H, W] (≥ last cell + 3 on each axis); batch_size: number of maps.
    """

    features: torch.Tensor
    indices: torch.Tensor
    spatial_shape: list[int]
    batch_size: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SparseBatch":
        """The same batch with its tensors on ``device``."""
        return SparseBatch(
            self.features.to(device, non_blocking=non_blocking),
            self.indices.to(device, non_blocking=non_blocking),
            list(self.spatial_shape),
            self.batch_size,
        )

    def pin_memory(self) -> "SparseBatch":
        """Pinned copies (DataLoader calls this when ``pin_memory=True``)."""
        return SparseBatch(self.features.pin_memory(), self.indices.pin_memory(), list(self.spatial_shape), self.batch_size)


def _grid_side(extent: int) -> int:
    """Grid side for cells 0 … extent − 1 (margin included): the unpadded 3×3 stride-2 conv has
    ⌊(side − 3) / 2⌋ + 1 outputs, which with side = extent + 2 covers every window that holds
    a cell (the last cell, at extent − 1, starts a window when it is even)."""
    return extent + 2


def _checked_views(views: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The views' (t_i, D) features and (t_i, 2) cells, refused when empty or inconsistent."""
    if len(views) == 0:
        raise ValueError("collate_views needs at least one view")
    all_features: list[np.ndarray] = []
    all_cells: list[np.ndarray] = []
    for i, (features, cells) in enumerate(views):
        features, cells = np.asarray(features), np.asarray(cells)
        if features.ndim != 2 or len(features) == 0:
            raise ValueError(f"view {i}: features must have shape (t, D) with t ≥ 1, got {features.shape}")
        if len(cells) != len(features):
            raise ValueError(f"view {i}: {len(features)} feature rows for {len(cells)} cells")
        if all_features and features.shape[1] != all_features[0].shape[1]:
            raise ValueError(
                f"view {i}: feature size {features.shape[1]} differs from the first view's {all_features[0].shape[1]}"
            )
        all_features.append(features)
        all_cells.append(_check_cells(cells))
    return all_features, all_cells


def collate_views(views: Sequence[tuple[np.ndarray, np.ndarray]]) -> SparseBatch:
    """Stack maps into one :class:`SparseBatch`; map ``i`` becomes batch index ``i``.

    ``views``: a sequence of (features (t_i, D) float, cells (t_i, 2) int in (x, y) order).
    Each map is shifted to start at ``MAP_MARGIN``; tiles sharing a cell are averaged (as
    :func:`merge_duplicates`); sites come out sorted by (batch, y, x). Vectorised over the
    batch: embedding collates thousands of views at a time.
    """
    all_features, all_cells = _checked_views(views)
    lengths = np.array([len(f) for f in all_features])
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    view_of = np.repeat(np.arange(len(views)), lengths)
    cells = np.concatenate(all_cells).astype(np.int64)
    cells = cells - np.minimum.reduceat(cells, starts, axis=0)[view_of] + MAP_MARGIN
    extent_x, extent_y = (int(cells[:, axis].max()) + 1 for axis in (0, 1))
    keys = (view_of * extent_y + cells[:, 1]) * extent_x + cells[:, 0]
    sites, features = _mean_per_key(keys, np.concatenate(all_features))  # tiles on one cell averaged
    index = np.stack((view_of[sites], cells[sites, 1], cells[sites, 0]), axis=1).astype(np.int32)
    return SparseBatch(
        torch.from_numpy(features),
        torch.from_numpy(index),
        [_grid_side(extent_y), _grid_side(extent_x)],
        len(views),
    )
