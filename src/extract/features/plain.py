"""One slide's plain tile features as stage 2 reads them, from a gigassl file or a foreign one.

Everything that needs only plain features (``gigassl embed``, ``SlideEmbedder``, AverageMIL,
attention-MIL) reads through :func:`read_plain_features`, so the checks are made in one place:

- **gigassl files** (:mod:`extract.features.slide_file`): read through ``SlideFeatures``, which refuses
  incomplete files and other format versions.
- **foreign files in the TRIDENT / CLAM layout** (no ``format`` attribute): ``features`` (N, D)
  (a leading axis of length 1, (1, N, D), is dropped) and ``coords`` (N, 2) level-0 top-left
  (x, y). A tile's side in level-0 pixels — the divisor that turns coords into grid cells —
  is the ``patch_size_level0`` attribute of ``coords`` (TRIDENT writes it); without it (CLAM's
  feature files), the greatest common divisor of the coordinates' spacings, which is the grid
  step of any tiling without overlap. The slide id is the file stem; the tile encoder is the
  ``encoder`` / ``encoder_sha256`` attribute of ``features`` when there is one, else unknown.
- **in every file**: at least one tile, as many coords as feature rows, and finite features
  (a NaN or inf row is refused naming the file and the count: a NaN tile would turn the whole
  slide's embedding into NaN).

Errors are :class:`extract.features.slide_file.FeatureFileError` naming the file and the fix.

Two files of one folder with the same slide id (a copied file) would give two rows with one id:
:func:`split_duplicate_ids` keeps the file named after the id (else the first by name) and
returns the others with the reason, for the caller to list.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import reduce
from math import gcd
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from extract.features.slide_file import FeatureFileError, SlideFeatures

log = logging.getLogger(__name__)

LAYOUT_GIGASSL = "gigassl"
LAYOUT_FOREIGN = "trident/clam"


@dataclass(frozen=True)
class PlainFeatures:
    """One slide's plain tiles: features (N, D) float32, coords (N, 2) int64 level-0 (x, y)."""

    path: Path
    slide_id: str
    features: np.ndarray
    coords: np.ndarray
    tile_step_level0: float
    encoder_name: str
    encoder_sha256: str  # "" when the file does not say
    layout: str

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])


def _is_foreign(handle: h5py.File) -> bool:
    return "format" not in handle.attrs and {"features", "coords"} <= set(handle)


def read_slide_id(path: str | Path) -> str:
    """The slide id of a features file (the ``slide_id`` attribute, else the file stem), read cheaply."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as handle:
            value = handle.attrs.get("slide_id")
    except (OSError, ValueError):
        return path.stem  # unreadable: reading it for real reports the problem
    if value is None:
        return path.stem
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _text_attr(attrs: h5py.AttributeManager, key: str) -> str:
    value = attrs.get(key, "")
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _grid_step(coords: np.ndarray) -> int:
    """The grid step of level-0 coords: the gcd of the spacings between distinct x and y values."""
    spacings = [np.diff(np.unique(coords[:, axis])) for axis in (0, 1)]
    values = [int(v) for v in np.concatenate(spacings) if v > 0]
    return reduce(gcd, values, 0) or 1  # one tile (or one row and column): any step will do


def _read_foreign(path: Path, handle: h5py.File) -> PlainFeatures:
    features = handle["features"][...]
    if features.ndim == 3 and features.shape[0] == 1:
        features = features[0]
    coords = handle["coords"][...]
    if features.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 2:
        raise FeatureFileError(
            f"{path}: features {features.shape} and coords {coords.shape} are not the TRIDENT/CLAM "
            "layout (features (N, D), coords (N, 2)); convert the file or re-extract the slide"
        )
    attrs = handle["coords"].attrs
    if "patch_size_level0" in attrs:
        step = float(attrs["patch_size_level0"])
    else:
        step = float(_grid_step(np.asarray(coords, dtype=np.int64)))
    encoder_attrs = handle["features"].attrs
    return PlainFeatures(
        path,
        path.stem,
        np.asarray(features, dtype=np.float32),
        np.asarray(coords, dtype=np.int64),
        step,
        _text_attr(encoder_attrs, "encoder") or "unknown",
        _text_attr(encoder_attrs, "encoder_sha256"),
        LAYOUT_FOREIGN,
    )


def _read_gigassl(path: Path) -> PlainFeatures:
    with SlideFeatures(path, require_plain=True) as slide:
        encoder = slide.file["features"].attrs
        return PlainFeatures(
            path,
            slide.slide_id,
            slide.features(),
            slide.coords(),
            slide.tile_step_level0,
            _text_attr(encoder, "encoder") or "unknown",
            slide.encoder_sha256,
            LAYOUT_GIGASSL,
        )


def _check(slide: PlainFeatures) -> PlainFeatures:
    path, n = slide.path, len(slide.features)
    if n == 0:
        raise FeatureFileError(f"{path}: no tissue tiles; nothing to embed — drop the slide or re-extract it")
    if len(slide.coords) != n:
        raise FeatureFileError(f"{path}: {n} feature rows but {len(slide.coords)} coords; re-extract the slide")
    if not slide.tile_step_level0 > 0:
        raise FeatureFileError(f"{path}: tile size in level-0 pixels is {slide.tile_step_level0}; re-extract the slide")
    bad_rows = int((~np.isfinite(slide.features).all(axis=1)).sum())
    if bad_rows:
        raise FeatureFileError(
            f"{path}: NaN or inf in the plain features of {bad_rows} of {n} tiles (slide "
            f"{slide.slide_id}); re-extract this slide (`gigassl extract --overwrite`) or move "
            "the file out of the folder"
        )
    return slide


def read_plain_features(path: str | Path) -> PlainFeatures:
    """The checked plain features of one gigassl or TRIDENT/CLAM file (see the module docstring)."""
    path = Path(path)
    try:
        handle = h5py.File(path, "r")
    except (OSError, ValueError) as error:
        raise FeatureFileError(f"{path}: not a readable HDF5 file ({error}); re-extract the slide") from error
    with handle:
        if _is_foreign(handle):
            return _check(_read_foreign(path, handle))
    return _check(_read_gigassl(path))


def split_duplicate_ids(files: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """(files to use, [(path, reason)] of the files whose slide id another file already has).

    Of the files sharing an id, the one named after the id is kept, else the first by name.
    """
    by_id: dict[str, list[Path]] = {}
    for path in map(Path, files):
        by_id.setdefault(read_slide_id(path), []).append(path)
    keep, duplicates = set(), []
    for slide_id, paths in by_id.items():
        kept = next((p for p in paths if p.stem == slide_id), paths[0])
        keep.add(kept)
        for path in paths:
            if path != kept:
                duplicates.append(
                    (
                        str(path),
                        f"slide id {slide_id!r} is also the id of {kept.name}, which is used "
                        "instead (a copied file?); remove or rename one of them",
                    )
                )
    for name, reason in duplicates:
        log.warning("skipping %s: %s", name, reason)
    return [Path(p) for p in files if Path(p) in keep], duplicates
