"""Tissue detection at thumbnail scale, tissue fraction per tile, and the QC picture.

Stained tissue is saturated, glass and background are not: the mask is an Otsu threshold on
the HSV saturation of a thumbnail, clipped to a band — the floor keeps a blank slide free of
tissue instead of thresholding its noise; the ceiling keeps an image that is all tissue (a
microscopy field, a dense section) from being split into "more" and "less" stained tissue —
then cleaned by a morphological closing and opening, holes filled and specks removed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

# Band (saturation 0–255) the Otsu threshold is clipped to. Glass, dust and JPEG noise stay
# below the floor (background measures 0–5 on the test slides); the palest stained tissue
# (~25–40 on BACH stroma) stays above the ceiling.
MIN_SATURATION = 20
MAX_SATURATION = 40
# Very dark pixels (pen marks' cores, scanner black borders) are not tissue.
MAX_DARKNESS_VALUE = 25


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


def tissue_mask(
    thumbnail: np.ndarray, min_saturation: int = MIN_SATURATION, max_saturation: int = MAX_SATURATION
) -> np.ndarray:
    """(H, W, 3) uint8 RGB thumbnail → (H, W) bool tissue mask."""
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
    mask = ndimage.binary_fill_holes(values.astype(bool))
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
) -> None:
    """Write a PNG of the thumbnail with the mask tinted and each kept tile outlined."""
    base = Image.fromarray(thumbnail).convert("RGB")
    tint = Image.new("RGB", base.size, (0, 160, 255))
    alpha = Image.fromarray((mask * 60).astype(np.uint8))
    base.paste(tint, (0, 0), alpha)
    draw = ImageDraw.Draw(base)
    side = size_level0 / downsample
    for x, y in np.asarray(coords).reshape(-1, 2) / downsample:
        draw.rectangle((x, y, x + side, y + side), outline=(20, 170, 20))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".partial.png")
    base.save(temp)
    temp.replace(path)
