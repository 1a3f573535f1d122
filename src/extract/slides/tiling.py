"""The tile grid of a slide at a target µm/px, restricted to tissue.

A tile of ``tile_size_px`` pixels at ``target_mpp`` covers ``tile_size_px * target_mpp / level0_mpp``
level-0 pixels (``size_level0``, a float). Grid cells sit at multiples of that side (rounded to
integer level-0 pixels), so ``coords / size_level0`` are near-integers and neighbouring tiles
are neighbouring cells — the invariant stage 2's sparse maps rely on. Only tiles that lie
wholly inside the slide and whose tissue fraction reaches the threshold are kept.

Before anything is read, :func:`check_grid` refuses a slide whose level-0 µm/px is implausible,
whose level 0 would be enlarged too much, or whose grid would have too many positions
(:class:`extract.config.GridLimits`): a wrong resolution tag must cost one line, not a node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from extract.config import ExtractConfig, GridLimits
from extract.errors import UserError
from extract.slides.reader import SlideReader, SlideReadError
from extract.slides.tissue import pen_ink_mask, tile_tissue_fraction, tissue_mask

# Longest thumbnail side used for the tissue mask (and the QC image, which must be large
# enough to judge pen marks and borders: 1,536 px unless the slide is smaller), and how many
# thumbnail pixels a tile should span at least (bounded by the maximum).
MAX_THUMBNAIL_SIDE = 4096
MIN_THUMBNAIL_SIDE = 1536
MASK_PX_PER_TILE = 8
# Tiles with more pen ink than this (a share of the tile) are left out (--max-ink-fraction).
MAX_INK_FRACTION = ExtractConfig.max_ink_fraction


class NoTissueError(SlideReadError):
    """No tile of the slide holds enough tissue."""


class SlideTooSmallError(SlideReadError):
    """The slide is smaller than one tile at the requested resolution."""


class ImplausibleGridError(SlideReadError):
    """The slide's µm/px or its grid size is outside :class:`GridLimits`."""


@dataclass(frozen=True)
class TissueMap:
    """The thumbnail, its tissue mask and pen-ink mask (H, W) bool, and level-0 px per thumbnail px."""

    thumbnail: np.ndarray
    mask: np.ndarray
    downsample: float
    ink: np.ndarray | None = None


@dataclass(frozen=True)
class TileGrid:
    """Kept tiles of one slide.

    ``coords`` (N, 2) int64 level-0 top-left x, y; ``tissue_fraction`` (N,) float;
    ``size_level0`` the tile side in level-0 px (float); ``target_mpp`` the tiles' µm/px and
    ``level0_mpp`` the slide's (stored as the ``mpp`` attribute of ``coords``, as TRIDENT names it).
    """

    coords: np.ndarray
    tissue_fraction: np.ndarray
    size_level0: float
    tile_size_px: int
    target_mpp: float
    level0_mpp: float
    level0_width: int
    level0_height: int
    magnification: float | None
    tissue_threshold: float
    tissue: TissueMap | None  # None once the QC image is written (see extract.batch.slide_plan)

    def __len__(self) -> int:
        return len(self.coords)

    def attrs(self) -> dict[str, Any]:
        """Attributes of the HDF5 ``coords`` dataset (TRIDENT / CLAM names plus ours)."""
        attrs: dict[str, Any] = {
            "patch_size": int(self.tile_size_px),
            "patch_size_level0": int(round(self.size_level0)),
            "patch_size_level0_exact": float(self.size_level0),
            "mpp": float(self.level0_mpp),
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


# Level-0 µm/px of the resolution tags image software writes by default (72 and 96 dpi).
_SOFTWARE_DPI_MPP = {72: 25400 / 72, 96: 25400 / 96}


def _how_to_fix_mpp(reader: SlideReader) -> str:
    source = reader.mpp_source
    if source == "--mpp-csv":
        return f"correct the line slide={reader.slide_id} of --mpp-csv"
    if source == "--default-mpp":
        return f"correct --default-mpp, or give this slide its own line in --mpp-csv (slide={reader.slide_id})"
    return f"give its true µm/px with --mpp-csv (columns slide,mpp; slide={reader.slide_id})"


def check_grid(reader: SlideReader, target_mpp: float, tile_size_px: int, limits: GridLimits = GridLimits()) -> None:
    """Refuse, before anything is read, a slide outside ``limits`` (see :class:`GridLimits`).

    Raises :class:`ImplausibleGridError` naming the file, the value, its source and the fix.
    """
    level0_mpp, source = reader.level0_mpp, reader.mpp_source
    if not limits.min_level0_mpp <= level0_mpp <= limits.max_level0_mpp:
        dpi = [
            f" ({dpi} dpi, image software's default, not a scanner's resolution)"
            for dpi, value in _SOFTWARE_DPI_MPP.items()
            if abs(level0_mpp / value - 1) < 1e-3
        ]
        raise ImplausibleGridError(
            f"{reader.path}: level-0 resolution {level0_mpp:g} µm/px from {source}{''.join(dpi)} is outside the plausible "
            f"range for microscopy ({limits.min_level0_mpp:g}–{limits.max_level0_mpp:g} µm/px); "
            f"{_how_to_fix_mpp(reader)}, or widen --min-level0-mpp/--max-level0-mpp if it is right"
        )
    if level0_mpp / target_mpp > limits.max_upscale * (1 + 1e-9):
        raise ImplausibleGridError(
            f"{reader.path}: tiles at {target_mpp:g} µm/px from a level 0 at {level0_mpp:g} µm/px (from {source}) would "
            f"enlarge the slide {level0_mpp / target_mpp:.1f}× (more than --max-upscale {limits.max_upscale:g}); use a "
            f"coarser --target-mpp, {_how_to_fix_mpp(reader)}, or raise --max-upscale"
        )
    size_level0 = tile_size_px * target_mpp / level0_mpp
    width, height = reader.dimensions
    n_positions = math.floor(width / size_level0 + 1e-9) * math.floor(height / size_level0 + 1e-9)
    if n_positions > limits.max_tiles_per_slide:
        raise ImplausibleGridError(
            f"{reader.path}: {width}×{height} px at {level0_mpp:g} µm/px (from {source}) makes a grid of {n_positions:,} "
            f"tiles of {tile_size_px} px at {target_mpp:g} µm/px, more than --max-tiles-per-slide "
            f"{limits.max_tiles_per_slide:,}; check the slide's µm/px ({_how_to_fix_mpp(reader)}), use a larger "
            "--tile-size-px or a coarser --target-mpp, or raise --max-tiles-per-slide"
        )


def tile_grid(
    reader: SlideReader,
    target_mpp: float,
    tile_size_px: int,
    tissue_threshold: float,
    limits: GridLimits = GridLimits(),
    max_ink_fraction: float = MAX_INK_FRACTION,
) -> TileGrid:
    """Tissue tiles of ``reader``'s slide at ``target_mpp`` µm/px and ``tile_size_px`` px, with
    at most ``max_ink_fraction`` of pen ink.

    Raises :class:`ImplausibleGridError` (before reading anything), :class:`SlideTooSmallError`
    or :class:`NoTissueError` naming the slide.
    """
    if target_mpp <= 0 or tile_size_px <= 0:
        raise UserError(f"target µm/px ({target_mpp}) and tile size ({tile_size_px} px) must be positive")
    if not 0.0 <= tissue_threshold <= 1.0:
        raise UserError(f"tissue threshold {tissue_threshold} must lie in [0, 1]")
    check_grid(reader, target_mpp, tile_size_px, limits)
    size_level0 = tile_size_px * target_mpp / reader.level0_mpp
    width, height = reader.dimensions
    # The thumbnail is read first: it proves the file decodes before any size judgement.
    thumbnail, downsample = reader.thumbnail(thumbnail_side(reader.dimensions, size_level0))
    xs, ys = grid_positions(width, size_level0), grid_positions(height, size_level0)
    if len(xs) == 0 or len(ys) == 0:
        raise SlideTooSmallError(
            f"{reader.path}: {width}×{height} px at {reader.level0_mpp:g} µm/px is smaller than one tile "
            f"({tile_size_px} px at {target_mpp:g} µm/px = {size_level0:.1f} level-0 px); "
            "use a smaller --tile-size-px or a finer --target-mpp"
        )
    ink = pen_ink_mask(thumbnail, reader.level0_mpp * downsample)
    mask = tissue_mask(thumbnail, ink=ink)
    grid_x, grid_y = np.meshgrid(xs, ys)  # row-major: y then x, reading order
    all_coords = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1).astype(np.int64)
    fraction = tile_tissue_fraction(mask, downsample, all_coords, size_level0)
    keep = fraction >= tissue_threshold if tissue_threshold > 0 else np.ones(len(fraction), dtype=bool)
    if ink.any():  # a tile half tissue, half marker has enough tissue, but its features show the ink
        keep &= tile_tissue_fraction(ink, downsample, all_coords, size_level0) <= max_ink_fraction
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
        level0_mpp=float(reader.level0_mpp),
        level0_width=int(width),
        level0_height=int(height),
        magnification=reader.magnification,
        tissue_threshold=float(tissue_threshold),
        tissue=TissueMap(thumbnail, mask, float(downsample), ink),
    )
