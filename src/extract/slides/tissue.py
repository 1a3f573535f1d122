"""Tissue detection at thumbnail scale, tissue fraction per tile, and the QC picture.

Stained tissue is saturated, glass and background are not: the mask is an Otsu threshold on
the HSV saturation of a thumbnail, clipped to a band — the floor keeps a blank slide free of
tissue instead of thresholding its noise; the ceiling keeps an image that is all tissue (a
microscopy field, a dense section) from being split into "more" and "less" stained tissue —
then cleaned by a morphological closing and opening, holes filled and specks removed.

Pen marks (blue, green, black marker) are saturated too, so they are found separately and cut
out of the cleaned mask (:func:`pen_ink_mask`). H&E cannot make a pixel whose green exceeds
its red (eosin and haematoxylin both absorb green at least as much as red), nor a blue more
than twice the red with green close to the red; blue and green inks do both. Black ink is
the darkest pixels. Dense nuclei can look like ink pixel by pixel, so only wide regions
count as ink: at least ``INK_DENSITY`` of a window ``INK_MIN_WIDTH_UM`` wide, judged on the
thumbnail blurred to ``INK_BLUR_UM`` (so that single nuclei average out with their
surroundings). Measured with ``benchmarks/pen_ink.py`` (150-µm strokes of four marker colours
painted over CMU-1-Small-Region and four BACH images): the share of inked tissue kept falls
from 100 % to 0–4 %, and of the kept 224-px tiles none but 2 (of 1,400) is ≥ 10 % ink (before:
up to 87 of 202); no clean tissue of 100 BACH images nor of the 24 Kather tiles is cut.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from extract.partial_files import temporary_path

# Band (saturation 0–255) the Otsu threshold is clipped to. Glass, dust and JPEG noise stay
# below the floor (background measures 0–5 on the test slides); the palest stained tissue
# (~25–40 on BACH stroma) stays above the ceiling.
MIN_SATURATION = 20
MAX_SATURATION = 40
# Very dark pixels (pen marks' cores, scanner black borders) are not tissue.
MAX_DARKNESS_VALUE = 25
# Pen ink: see the module docstring. Green above red by this much is never H&E.
INK_GREEN_OVER_RED = 12
INK_BLACK_MAX_VALUE = 55  # brightest channel of a black-ink pixel
INK_MIN_WIDTH_UM = 80.0
INK_DENSITY = 0.6
INK_BLUR_UM = 8.0
INK_WINDOW_PX = 5  # window when the thumbnail's µm/px is unknown


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values (the level maximising the between-class variance)."""
    histogram = np.bincount(values.ravel().astype(np.uint8), minlength=256).astype(np.float64)
    total = histogram.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256, dtype=np.float64)
    weight_low = np.cumsum(histogram)
    weight_high = total - weight_low
    cumulative_mean = np.cumsum(histogram * levels)
    mean_low = cumulative_mean / np.maximum(weight_low, 1e-12)
    mean_high = (cumulative_mean[-1] - cumulative_mean) / np.maximum(weight_high, 1e-12)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    # Every level in an empty gap between the modes scores the same: take the gap's middle.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float(best.mean())


def pen_ink_mask(thumbnail: np.ndarray, mpp: float | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB thumbnail at ``mpp`` µm/px (None: unknown) → (H, W) bool pen-ink mask."""
    rgb = thumbnail
    window = INK_WINDOW_PX if mpp is None else max(3, round(INK_MIN_WIDTH_UM / mpp))
    if mpp is not None and INK_BLUR_UM / mpp >= 2:
        rgb = ndimage.uniform_filter(thumbnail.astype(np.float32), (round(INK_BLUR_UM / mpp),) * 2 + (1,), mode="nearest")
    red, green, blue = (rgb[..., channel].astype(np.int16) for channel in range(3))
    coloured = (green - red > INK_GREEN_OVER_RED) | ((blue > 2 * red) & (10 * green >= 6 * red))
    candidate = coloured | (rgb.max(axis=2) < INK_BLACK_MAX_VALUE)
    share = ndimage.uniform_filter(candidate.astype(np.float32), window, mode="nearest")
    core = share >= INK_DENSITY  # the window around this pixel is mostly ink-coloured
    ink = ndimage.maximum_filter(core, window, mode="nearest") & (candidate | core)
    return ndimage.binary_dilation(ink, iterations=2)  # and the blended rim of each stroke


def tissue_mask(
    thumbnail: np.ndarray,
    min_saturation: int = MIN_SATURATION,
    max_saturation: int = MAX_SATURATION,
    *,
    ink: np.ndarray | None = None,
) -> np.ndarray:
    """(H, W, 3) uint8 RGB thumbnail → (H, W) bool tissue mask, pen ink excluded.

    ``ink`` (H, W) bool: the pen-ink mask when already computed (default: :func:`pen_ink_mask`
    at an unknown scale).
    """
    hsv = np.asarray(Image.fromarray(thumbnail).convert("HSV"))
    saturation, value = hsv[..., 1], hsv[..., 2]
    threshold = float(np.clip(otsu_threshold(saturation), min_saturation, max_saturation))
    mask = (saturation > threshold) & (value > MAX_DARKNESS_VALUE)
    # Structuring sizes scale with the thumbnail so the clean-up means the same at any size.
    side = 2 * max(1, round(min(mask.shape) / 200)) + 1
    # Square closing then opening as separable max/min filters (much faster than binary
    # morphology); "nearest" edges keep tissue cut by the image border up to the border.
    values = mask.astype(np.uint8)
    values = ndimage.minimum_filter(ndimage.maximum_filter(values, side, mode="nearest"), side, mode="nearest")
    values = ndimage.maximum_filter(ndimage.minimum_filter(values, side, mode="nearest"), side, mode="nearest")
    # Ink is cut out after the holes are filled: a stroke across tissue would be a filled hole.
    mask = ndimage.binary_fill_holes(values.astype(bool))
    mask &= ~(pen_ink_mask(thumbnail) if ink is None else ink)
    labels, n_labels = ndimage.label(mask)
    if n_labels:
        sizes = np.bincount(labels.ravel())[1:]
        min_size = max(4, int(0.0005 * mask.size))
        keep = np.concatenate([[False], sizes >= min_size])
        mask = keep[labels]
    return mask


def tile_tissue_fraction(mask: np.ndarray, downsample: float, coords: np.ndarray, size_level0: float) -> np.ndarray:
    """Fraction of tissue under each tile, from the thumbnail-scale mask.

    ``coords`` (N, 2) level-0 top-left x, y; ``downsample`` level-0 px per mask px.
    Returns (N,) float64 in [0, 1]. A tile covers at least one mask pixel.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    height, width = mask.shape
    integral = np.zeros((height + 1, width + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    x_lo = np.clip(np.floor(coords[:, 0] / downsample + 1e-6).astype(np.int64), 0, width - 1)
    y_lo = np.clip(np.floor(coords[:, 1] / downsample + 1e-6).astype(np.int64), 0, height - 1)
    x_hi = np.clip(np.round((coords[:, 0] + size_level0) / downsample).astype(np.int64), x_lo + 1, width)
    y_hi = np.clip(np.round((coords[:, 1] + size_level0) / downsample).astype(np.int64), y_lo + 1, height)
    inside = integral[y_hi, x_hi] - integral[y_lo, x_hi] - integral[y_hi, x_lo] + integral[y_lo, x_lo]
    return inside / ((x_hi - x_lo) * (y_hi - y_lo))


def save_qc_image(
    path: str | Path,
    thumbnail: np.ndarray,
    mask: np.ndarray,
    downsample: float,
    coords: np.ndarray,
    size_level0: float,
    ink: np.ndarray | None = None,
) -> None:
    """Write a PNG of the thumbnail with the mask tinted blue, pen ink hatched red and each kept
    tile outlined (written to a temporary name, then renamed)."""
    base = Image.fromarray(thumbnail).convert("RGB")
    tint = Image.new("RGB", base.size, (0, 160, 255))
    alpha = Image.fromarray((mask * 60).astype(np.uint8))
    base.paste(tint, (0, 0), alpha)
    if ink is not None and ink.any():
        rows, cols = np.indices(ink.shape)
        hatch = ink & ((rows + cols) % 8 < 2)  # diagonal stripes: the ink stays visible beneath
        base.paste(Image.new("RGB", base.size, (230, 0, 0)), (0, 0), Image.fromarray((hatch * 255).astype(np.uint8)))
    draw = ImageDraw.Draw(base)
    side = size_level0 / downsample
    for x, y in np.asarray(coords).reshape(-1, 2) / downsample:
        draw.rectangle((x, y, x + side, y + side), outline=(20, 170, 20))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary_path(path)
    try:
        base.save(temp, format="PNG", compress_level=1)  # fast: the QC image of a small slide is on the planner's critical path
        temp.replace(path)
    finally:
        temp.unlink(missing_ok=True)
