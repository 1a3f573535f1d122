"""The tile grid of a slide at a target µm/px, restricted to tissue.

A tile of ``tile_size_px`` pixels at ``target_mpp`` covers ``tile_size_px * target_mpp / mpp``
level-0 pixels (``size_level0``, a float). Grid cells sit at multiples of that side (rounded to
integer level-0 pixels), so ``coords / size_level0`` are near-integers and neighbouring tiles
are neighbouring cells — the invariant stage 2's sparse maps rely on. Only tiles that lie
wholly inside the slide and whose tissue fraction reaches the threshold are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from extract.reader import SlideReader, SlideReadError
from extract.tissue import tile_tissue_fraction, tissue_mask

# Longest thumbnail side used for the tissue mask, and how many thumbnail pixels a tile
# should span at least (bounded by the maximum).
MAX_THUMBNAIL_SIDE = 4096
MIN_THUMBNAIL_SIDE = 512
MASK_PX_PER_TILE = 8


class NoTissueError(SlideReadError):
    """No tile of the slide holds enough tissue."""


class SlideTooSmallError(SlideReadError):
    """The slide is smaller than one tile at the requested resolution."""


@dataclass(frozen=True)
class TissueMap:
    """The thumbnail, its tissue mask (H, W) bool, and level-0 px per thumbnail px."""

    thumbnail: np.ndarray
    mask: np.ndarray
    downsample: float


@dataclass(frozen=True)
class TileGrid:
    """Kept tiles of one slide.

    ``coords`` (N, 2) int64 level-0 top-left x, y; ``tissue_fraction`` (N,) float;
    ``size_level0`` the tile side in level-0 px (float).
    """

    coords: np.ndarray
    tissue_fraction: np.ndarray
    size_level0: float
    tile_size_px: int
    target_mpp: float
    mpp: float
    level0_width: int
    level0_height: int
    magnification: float | None
    tissue_threshold: float
    tissue: TissueMap | None  # None once the QC image is written (see extract.slide_plan)

    def __len__(self) -> int:
        return len(self.coords)

    def attrs(self) -> dict[str, Any]:
        """Attributes of the HDF5 ``coords`` dataset (TRIDENT / CLAM names plus ours)."""
        attrs: dict[str, Any] = {
            "patch_size": int(self.tile_size_px),
            "patch_size_level0": int(round(self.size_level0)),
            "patch_size_level0_exact": float(self.size_level0),
            "mpp": float(self.mpp),
            "target_mpp": float(self.target_mpp),
            "level0_width": int(self.level0_width),
            "level0_height": int(self.level0_height),
            "tissue_threshold": float(self.tissue_threshold),
        }
        if self.magnification is not None:
            attrs["level0_magnification"] = float(self.magnification)
        return attrs


def thumbnail_side(dimensions: tuple[int, int], size_level0: float) -> int:
    """Longest thumbnail side giving each tile about ``MASK_PX_PER_TILE`` mask pixels."""
    wanted = math.ceil(max(dimensions) * MASK_PX_PER_TILE / size_level0)
    return int(min(MAX_THUMBNAIL_SIDE, max(MIN_THUMBNAIL_SIDE, wanted)))


def grid_positions(length_level0: int, size_level0: float) -> np.ndarray:
    """Level-0 starts of the whole tiles along one axis: round(i * size_level0)."""
    count = int(math.floor(length_level0 / size_level0 + 1e-9))
    starts = np.round(np.arange(count) * size_level0).astype(np.int64)
    return starts[starts + size_level0 <= length_level0 + 1e-6]


def tile_grid(reader: SlideReader, target_mpp: float, tile_size_px: int, tissue_threshold: float) -> TileGrid:
    """Tissue tiles of ``reader``'s slide at ``target_mpp`` µm/px and ``tile_size_px`` px.

    Raises :class:`SlideTooSmallError` or :class:`NoTissueError` naming the slide.
    """
    if target_mpp <= 0 or tile_size_px <= 0:
        raise ValueError(f"target µm/px ({target_mpp}) and tile size ({tile_size_px} px) must be positive")
    if not 0.0 <= tissue_threshold <= 1.0:
        raise ValueError(f"tissue threshold {tissue_threshold} must lie in [0, 1]")
    size_level0 = tile_size_px * target_mpp / reader.mpp
    width, height = reader.dimensions
    # The thumbnail is read first: it proves the file decodes before any size judgement.
    thumbnail, downsample = reader.thumbnail(thumbnail_side(reader.dimensions, size_level0))
    xs, ys = grid_positions(width, size_level0), grid_positions(height, size_level0)
    if len(xs) == 0 or len(ys) == 0:
        raise SlideTooSmallError(
            f"{reader.path}: {width}×{height} px at {reader.mpp:g} µm/px is smaller than one tile "
            f"({tile_size_px} px at {target_mpp:g} µm/px = {size_level0:.1f} level-0 px); "
            "use a smaller --tile-size or a finer --mpp"
        )
    mask = tissue_mask(thumbnail)
    grid_x, grid_y = np.meshgrid(xs, ys)  # row-major: y then x, reading order
    all_coords = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1).astype(np.int64)
    fraction = tile_tissue_fraction(mask, downsample, all_coords, size_level0)
    keep = fraction >= tissue_threshold if tissue_threshold > 0 else np.ones(len(fraction), dtype=bool)
    if not keep.any():
        raise NoTissueError(
            f"{reader.path}: no tile has tissue fraction ≥ {tissue_threshold:g} "
            f"(tissue found on {mask.mean():.1%} of the thumbnail); blank slide, or lower --tissue-threshold"
        )
    return TileGrid(
        coords=all_coords[keep],
        tissue_fraction=fraction[keep],
        size_level0=float(size_level0),
        tile_size_px=int(tile_size_px),
        target_mpp=float(target_mpp),
        mpp=float(reader.mpp),
        level0_width=int(width),
        level0_height=int(height),
        magnification=reader.magnification,
        tissue_threshold=float(tissue_threshold),
        tissue=TissueMap(thumbnail, mask, float(downsample)),
    )
