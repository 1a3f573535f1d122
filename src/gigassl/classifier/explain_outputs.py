"""The files ``gigassl explain`` writes for one slide's :class:`~gigassl.classifier.attribution.TileAttribution`,
the same for every method, so maps of Giga-SSL and of the baselines can be put side by side:

- ``{slide}.{method}.h5``: ``coords`` (N, 2) int64 level-0 top-left (x, y), TRIDENT's convention,
  with ``patch_size_level0``; ``contributions`` (N,) float64; ``n_views`` (N,) int32;
  ``attention`` (N,) for attention-MIL; the scores, class and coverage as root attributes;
- ``{slide}.{method}.geojson``: a FeatureCollection of tile squares (level-0 px) whose
  ``properties.measurements`` hold the contribution and the view count — QuPath's
  *File › Import objects* reads it (``objectType`` "tile");
- ``{slide}.{method}.heatmap.png``: the contributions over the slide thumbnail at the QC scale
  (:func:`extract.slides.tiling.thumbnail_side`), a diverging colour map centred at 0, every tile a
  square with a one-pixel grid line, and a colour bar;
- ``{slide}.{method}.tiles.png``: the top and bottom ``k`` tiles by contribution, read from the slide.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from extract import __version__
from extract.partial_files import temporary_path
from gigassl.classifier.attribution import TileAttribution

FORMAT_NAME = "gigassl-tile-attribution"
FORMAT_VERSION = 1


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary_path(path)
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def summary_attrs(attribution: TileAttribution) -> dict[str, Any]:
    """The scalar facts of an attribution (HDF5 attributes, the job's report)."""
    return dict(
        slide_id=attribution.slide_id,
        method=attribution.method,
        class_name=attribution.class_name,
        intercept=attribution.intercept,
        score=attribution.score,
        reproduced_score=attribution.reproduced_score,
        reference_score=attribution.reference_score,
        probability=attribution.probability,
        score_sd=attribution.score_sd,
        n_tiles=len(attribution.contributions),
        n_explaining_views=attribution.n_explaining_views,
        min_views_per_tile=int(attribution.n_views.min()),
        tiles_covered=float((attribution.n_views > 0).mean()),
    )


def write_attribution_h5(attribution: TileAttribution, path: Path, provenance: dict[str, Any]) -> Path:
    """The attribution as HDF5 (see the module docstring)."""

    def write(temp: Path) -> None:
        with h5py.File(temp, "w") as handle:
            coords = handle.create_dataset("coords", data=np.asarray(attribution.coords, np.int64))
            coords.attrs["patch_size_level0"] = float(attribution.tile_size_level0)
            handle.create_dataset("contributions", data=np.asarray(attribution.contributions, np.float64))
            handle.create_dataset("n_views", data=np.asarray(attribution.n_views, np.int32))
            if attribution.attention is not None:
                handle.create_dataset("attention", data=np.asarray(attribution.attention, np.float64))
            handle.attrs.update(summary_attrs(attribution))
            handle.attrs.update(format=FORMAT_NAME, format_version=FORMAT_VERSION, package_version=__version__)
            handle.attrs["provenance"] = json.dumps(provenance, default=str)
            handle.attrs["complete"] = True

    return _atomic(path, write)


def geojson_collection(attribution: TileAttribution) -> dict[str, Any]:
    """A GeoJSON FeatureCollection: one square Polygon per tile (level-0 px), measurements as properties."""
    side = float(attribution.tile_size_level0)
    features = []
    for row, ((x, y), value, n) in enumerate(zip(attribution.coords.tolist(), attribution.contributions, attribution.n_views)):
        ring = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "tile",
                    "name": f"tile {row}",
                    "measurements": {"contribution": float(value), "n_views": int(n)},
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(attribution: TileAttribution, path: Path) -> Path:
    """The tiles as GeoJSON (QuPath: File › Import objects)."""

    def write(temp: Path) -> None:
        temp.write_text(json.dumps(geojson_collection(attribution), allow_nan=False, separators=(",", ":")))

    return _atomic(path, write)


def _limit(values: np.ndarray) -> float:
    top = float(np.max(np.abs(values))) if len(values) else 0.0
    return top if top > 0 else 1.0


def heatmap_overlay(attribution: TileAttribution, shape: tuple[int, int], downsample: float) -> np.ndarray:
    """(H, W, 4) float RGBA at the thumbnail's scale: each tile's colour (diverging, centred at 0),
    its last row and column a grey grid line; transparent where there is no tile."""
    from matplotlib import colormaps

    limit = _limit(attribution.contributions)
    colours = colormaps["RdBu_r"](0.5 + 0.5 * np.clip(attribution.contributions / limit, -1, 1))
    overlay = np.zeros((*shape, 4))
    side = attribution.tile_size_level0 / downsample
    for (x, y), colour in zip(attribution.coords / downsample, colours):
        x0, y0 = int(math.floor(x)), int(math.floor(y))
        x1, y1 = min(shape[1], max(x0 + 1, int(math.floor(x + side)))), min(shape[0], max(y0 + 1, int(math.floor(y + side))))
        overlay[y0:y1, x0:x1] = colour
        if side >= 3:  # the grid: visible at full resolution
            overlay[y1 - 1, x0:x1, :3] = overlay[y0:y1, x1 - 1, :3] = 0.35
    return overlay


def write_heatmap(attribution: TileAttribution, thumbnail: np.ndarray, downsample: float, path: Path) -> Path:
    """The heatmap PNG: the thumbnail at full resolution under the tile colours, a colour bar beside it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.colors import Normalize

    height, width = thumbnail.shape[:2]
    overlay = heatmap_overlay(attribution, (height, width), downsample)
    alpha = 0.65 * (overlay[..., 3:] > 0)
    blended = (thumbnail / 255.0) * (1 - alpha) + overlay[..., :3] * alpha
    dpi = 100
    figure = plt.figure(figsize=(width / dpi + 1.6, height / dpi + 0.6), dpi=dpi)
    axes = figure.add_axes((0, 0, width / (width + 160), height / (height + 60)))
    axes.imshow(blended, interpolation="nearest")
    axes.set_axis_off()
    limit = _limit(attribution.contributions)
    bar = figure.add_axes((width / (width + 160) + 0.02, 0.1, 0.025, 0.7))
    mappable = plt.cm.ScalarMappable(norm=Normalize(-limit, limit), cmap="RdBu_r")
    figure.colorbar(mappable, cax=bar).set_label(f"contribution to the score of {attribution.class_name!r}")
    figure.text(
        0.01,
        1 - 25 / (height + 60),
        f"{attribution.slide_id} · {attribution.method} · class {attribution.class_name!r}: "
        f"score {attribution.score:+.3f}, p = {attribution.probability:.3f}",
        fontsize=10,
    )
    _atomic(path, lambda temp: figure.savefig(temp, dpi=dpi, format="png"))
    plt.close(figure)
    return path


def write_tile_grid(attribution: TileAttribution, read_tiles: Callable[[np.ndarray], np.ndarray], k: int, path: Path) -> Path:
    """A PNG of the top ``k`` tiles (first block) and the bottom ``k`` (second), each captioned with its contribution."""
    from PIL import Image, ImageDraw

    order = np.argsort(attribution.contributions)
    k = min(k, len(order))
    rows = np.concatenate([order[::-1][:k], order[:k]])
    tiles = read_tiles(rows)  # (2k, px, px, 3)
    px, per_line, caption = tiles.shape[1], min(k, 8), 16
    lines_per_block = -(-k // per_line)
    canvas = Image.new("RGB", (per_line * (px + 4), 2 * (lines_per_block * (px + caption) + 22)), "white")
    draw = ImageDraw.Draw(canvas)
    for block, title in enumerate(("top: drove the call", "bottom: spoke against it")):
        top = block * (lines_per_block * (px + caption) + 22)
        draw.text((4, top + 4), f"{title} (class {attribution.class_name!r}, {attribution.method})", fill="black")
        for i in range(k):
            row = rows[block * k + i]
            x, y = (i % per_line) * (px + 4), top + 22 + (i // per_line) * (px + caption)
            canvas.paste(Image.fromarray(tiles[block * k + i]), (x, y))
            draw.text((x + 2, y + px + 1), f"{attribution.contributions[row]:+.2e}", fill="black")
    return _atomic(path, lambda temp: canvas.save(temp, format="PNG"))
