"""How much pen ink the tissue mask keeps: marker strokes painted over real tissue.

Three strokes of each marker colour (150 µm wide, a fine tip) are painted over the thumbnail
the tile grid uses (longest side 1,536 px) of CMU-1-Small-Region and of a few BACH images (its
µm/px, 0.42, given), and the tissue mask is computed with and without the pen-ink rule of
:mod:`extract.slides.tissue`. Printed per image and marker: the share of inked tissue pixels kept as
tissue, and how many of the kept 224-px tiles at 0.5 µm/px are ≥ 10 % ink (the tile grid also
leaves out tiles with more than ``MAX_INK_FRACTION`` of detected ink).

    python benchmarks/pen_ink.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from extract.slides.formats import open_slide  # noqa: E402
from extract.slides.tiling import MAX_INK_FRACTION, grid_positions  # noqa: E402
from extract.slides.tissue import pen_ink_mask, tile_tissue_fraction, tissue_mask  # noqa: E402
from fixtures.make_slides import MARKERS, paint_marker  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
IMAGES = [(DATA / "slides" / "CMU-1-Small-Region.svs", None)] + [
    (DATA / "bach-dev" / f"{name}.jpg", 0.42) for name in ("iv009", "is015", "n023", "b029")
]


def inked_tiles(
    mask: np.ndarray,
    stroke: np.ndarray,
    downsample: float,
    size_level0: float,
    shape: tuple[int, int],
    ink: np.ndarray | None = None,
) -> tuple[int, int]:
    """(kept tiles, kept tiles ≥ 10 % painted ink) for a tissue threshold of 0.5; with ``ink``
    (the detected ink) tiles with more than MAX_INK_FRACTION of it are left out, as tile_grid does."""
    xs, ys = grid_positions(shape[0], size_level0), grid_positions(shape[1], size_level0)
    grid_x, grid_y = np.meshgrid(xs, ys)
    coords = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)
    kept = tile_tissue_fraction(mask, downsample, coords, size_level0) >= 0.5
    if ink is not None:
        kept &= tile_tissue_fraction(ink, downsample, coords, size_level0) <= MAX_INK_FRACTION
    ink = tile_tissue_fraction(stroke, downsample, coords, size_level0) >= 0.1
    return int(kept.sum()), int((kept & ink).sum())


def main() -> None:
    print("| image | marker | inked tissue kept: before → after | kept tiles ≥ 10 % ink: before → after |")
    print("|---|---|---|---|")
    for path, default_mpp in IMAGES:
        with open_slide(path, default_mpp=default_mpp) as reader:
            thumb, downsample = reader.thumbnail(1536)
            mpp, dimensions = reader.level0_mpp * downsample, reader.dimensions
        size_level0 = 224 * 0.5 / (mpp / downsample)
        no_ink = np.zeros(thumb.shape[:2], dtype=bool)
        clean = tissue_mask(thumb, ink=no_ink)
        for marker, colour in MARKERS.items():
            kept_before, kept_after, tiles_before, tiles_after = [], [], [0, 0], [0, 0]
            for seed in (1, 2, 3):
                inked, stroke = paint_marker(thumb, colour, round(150 / mpp), seed)
                before = tissue_mask(inked, ink=no_ink)
                ink = pen_ink_mask(inked, mpp)
                after = tissue_mask(inked, ink=ink)
                under = stroke & clean
                kept_before.append(before[under].mean())
                kept_after.append(after[under].mean())
                for total, mask, detected in ((tiles_before, before, None), (tiles_after, after, ink)):
                    n, n_ink = inked_tiles(mask, stroke, downsample, size_level0, dimensions, detected)
                    total[0], total[1] = total[0] + n, total[1] + n_ink
            print(
                f"| {path.name} | {marker} | {np.mean(kept_before):.0%} → {np.mean(kept_after):.1%} | "
                f"{tiles_before[1]}/{tiles_before[0]} → {tiles_after[1]}/{tiles_after[0]} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
