"""The per-slide HDF5 file: plain tile features and the augmented bank.

Layout (TRIDENT / CLAM compatible for the first two datasets)::

    /features      (N, D) float32     attrs: encoder (name), encoder_sha256, encoder_source,
                                      encoder_arch, encoder_width (D), encoder_layout,
                                      encoder_input_size_px, encoder_mean, encoder_std
                                      (EncoderInfo.attrs; D = 256 for ResNet18/34, 1024 for
                                      ResNet50, any for an exported program)
    /coords        (N, 2)   int64     level-0 top-left (x, y); attrs: patch_size,
                                      patch_size_level0, patch_size_level0_exact, mpp,
                                      target_mpp, level0_width, level0_height,
                                      level0_magnification (when known), tissue_threshold
    /aug_features  (A, D, K) float16, one compressed chunk per augmentation, stored
                                      feature-major (layout attr) because a feature's K
                                      values compress ~11 % better side by side than a
                                      tile's 256 values; read it with SlideFeatures.augmentation
    /aug_coords    (A, K, 2)   int64   attrs on aug_features: n_augmentations, n_tiles,
                                      seed, sampled_with_replacement, augmentation (JSON),
                                      and the encoder attrs of /features
    root attrs: format, format_version, package_version, slide_id, source, settings (JSON),
                complete (written last; a file without it is never read)

Files are written to a temporary name beside the target and renamed when complete, so an
interrupted run never leaves a file that looks finished (:mod:`extract.partial_files`). Every
dataset carries HDF5's Fletcher-32 checksum per chunk, checked by every read: a damaged chunk
is a :class:`FeatureFileError` naming the file (never HDF5's filter message), and
:func:`why_incomplete` with ``verify=True`` reads every chunk before a file is reused. Features
are checked finite before they are written (as stored: float16 for the bank), so a tile encoder
that returns NaN or inf fails its slide instead of writing a complete file of NaN.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from extract import __version__
from extract.encoders.tile_encoder import EncoderInfo
from extract.errors import UserError
from extract.partial_files import AtomicHDF5Writer, temporary_path

FORMAT_NAME = "gigassl-slide-features"
FORMAT_VERSION = 3  # 2: bank stored feature-major (A, 256, K); 3: settings under their current names (target_mpp, tile_size_px)
BANK_LAYOUT = "augmentation,feature,tile"


class FeatureFileError(UserError):
    """A slide feature file that is missing, incomplete, of another version or malformed."""


class NonFiniteFeaturesError(UserError):
    """The tile encoder returned NaN or inf: the slide fails and its file is not written."""


def check_finite(rows: np.ndarray, path: Path, what: str, encoder: str) -> None:
    """Refuse features holding NaN or inf before they are written (the file is then discarded)."""
    finite = np.isfinite(rows)
    if not finite.all():
        bad = int((~finite.reshape(len(rows), -1).all(axis=1)).sum()) if len(rows) else 0
        raise NonFiniteFeaturesError(
            f"{path.name}: the tile encoder {encoder!r} returned NaN or inf for {bad} of {len(rows)} tiles ({what}); "
            "the slide's file is not written — check the encoder (its weights, its input size and normalisation, "
            "--no-mixed-precision for a model that overflows in half precision)"
        )


def damaged(path: Path, what: str) -> FeatureFileError:
    """The error of a file whose data fail their checksum or do not decompress."""
    return FeatureFileError(
        f"{path}: damaged file ({what} fails its checksum); re-extract this slide (`gigassl extract --overwrite`) "
        "or move the file out of the folder"
    )


def _checksummed(n_rows: int) -> dict[str, Any]:
    """Dataset options adding a Fletcher-32 checksum (it needs chunks, which need ≥ 1 row)."""
    return {"chunks": True, "fletcher32": True} if n_rows else {}


def verify_checksums(file: h5py.File, path: Path) -> None:
    """Read every chunk of every dataset (one chunk in memory at a time), so that HDF5 checks
    each checksum; raises :class:`FeatureFileError` naming the first damaged dataset."""
    for name, dataset in file.items():
        if not isinstance(dataset, h5py.Dataset) or dataset.size == 0:
            continue
        try:
            chunks = dataset.iter_chunks() if dataset.chunks else [()]
            for selection in chunks:
                dataset[selection]
        except (OSError, ValueError) as error:
            raise damaged(path, f"dataset {name!r}") from error


class SlideFileWriter(AtomicHDF5Writer):
    """Writes one slide's HDF5 file atomically.

    Use as a context manager: on a clean exit the file is marked complete and renamed to its
    final path; on an exception the temporary file is removed and nothing is left behind.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        slide_id: str,
        source: str,
        settings: Mapping[str, Any],
        encoder: EncoderInfo,
    ) -> None:
        self.path = Path(path)
        self.temp_path = temporary_path(self.path)
        self._meta = dict(slide_id=slide_id, source=source, settings=json.dumps(dict(settings), sort_keys=True))
        self._encoder = encoder
        self._file: h5py.File | None = None

    def __enter__(self) -> "SlideFileWriter":
        self._file = self._open()
        attrs = self._file.attrs
        attrs["format"] = FORMAT_NAME
        attrs["format_version"] = FORMAT_VERSION
        attrs["package_version"] = __version__
        for key, value in self._meta.items():
            attrs[key] = value
        return self

    @property
    def file(self) -> h5py.File:
        assert self._file is not None, "use SlideFileWriter as a context manager"
        return self._file

    def create_plain(self, coords: np.ndarray, grid_attrs: Mapping[str, Any]) -> h5py.Dataset:
        """Create ``coords`` (N, 2) and an empty ``features`` (N, D) to be filled by rows."""
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        coords_ds = self.file.create_dataset("coords", data=coords, **_checksummed(len(coords)))
        for key, value in grid_attrs.items():
            if value is not None:
                coords_ds.attrs[key] = value
        width = self._encoder.width
        features = self.file.create_dataset(
            "features",
            shape=(len(coords), width),
            dtype=np.float32,
            chunks=(min(max(len(coords), 1), 1024), width) if len(coords) else None,
            fletcher32=bool(len(coords)),
        )
        features.attrs.update(self._encoder.attrs())
        return features

    def write_plain_rows(self, start: int, rows: np.ndarray) -> None:
        """Fill ``features[start:start+len(rows)]``; refuses NaN or inf (:class:`NonFiniteFeaturesError`)."""
        check_finite(rows, self.path, "plain features", self._encoder.name)
        self.file["features"][start : start + len(rows)] = rows
        self.check_space()

    def create_bank(
        self,
        n_augmentations: int,
        n_tiles: int,
        bank_attrs: Mapping[str, Any],
        grid_attrs: Mapping[str, Any] | None = None,
    ) -> None:
        """Create the bank: ``aug_features`` float16 stored (A, D, K), ``aug_coords`` (A, K, 2) int64.

        ``grid_attrs`` (tile size, µm/px …, as on ``coords``) go on ``aug_coords``, so that a file
        written without plain features still tells training how to place its tiles on a grid.
        """
        width = self._encoder.width
        feats = self.file.create_dataset(
            "aug_features",
            shape=(n_augmentations, width, n_tiles),
            dtype=np.float16,
            chunks=(1, width, n_tiles),
            compression="gzip",
            compression_opts=4,
            shuffle=True,
            fletcher32=True,
        )
        feats.attrs["layout"] = BANK_LAYOUT
        coords = self.file.create_dataset(
            "aug_coords",
            shape=(n_augmentations, n_tiles, 2),
            dtype=np.int64,
            chunks=(1, n_tiles, 2),
            compression="gzip",
            compression_opts=4,
            shuffle=True,
            fletcher32=True,
        )
        for key, value in (grid_attrs or {}).items():
            if value is not None:
                coords.attrs[key] = value
        feats.attrs["n_augmentations"] = n_augmentations
        feats.attrs["n_tiles"] = n_tiles
        feats.attrs.update(self._encoder.attrs())
        for key, value in bank_attrs.items():
            feats.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value

    def write_augmentation(self, index: int, features: np.ndarray, coords: np.ndarray) -> None:
        """Store augmentation ``index``: (K, D) features and their (K, 2) level-0 coords.

        The K tiles are a sample whose order carries no meaning; they are stored sorted by
        position, so that a tile sampled several times (slides with fewer than K tiles) fills
        adjacent columns, which the feature-major chunk then compresses to almost nothing.
        """
        coords = np.asarray(coords, dtype=np.int64)
        order = np.lexsort((coords[:, 1], coords[:, 0]))
        stored = np.asarray(features, dtype=np.float16)  # beyond ±65504 a feature becomes inf here
        check_finite(stored, self.path, f"augmentation {index} of the bank (float16)", self._encoder.name)
        self.file["aug_features"][index] = stored[order].T
        self.file["aug_coords"][index] = coords[order]
        self.check_space()


class SlideFeatures:
    """Validated read access to one slide's HDF5 file (a context manager).

    Refuses, with a :class:`FeatureFileError` naming the file, anything that is not a
    complete file of this format version, or that lacks the datasets asked for.
    """

    def __init__(self, path: str | Path, *, require_plain: bool = False, require_bank: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FeatureFileError(f"{self.path}: no such file; check the path, or write it with `gigassl extract`")
        try:
            self._file = h5py.File(self.path, "r")
        except (OSError, ValueError) as error:
            raise FeatureFileError(
                f"{self.path}: not a readable HDF5 file ({error}); delete it and run `gigassl extract` again"
            ) from error
        try:
            self._validate(require_plain, require_bank)
        except FeatureFileError:
            self._file.close()
            raise

    def _validate(self, require_plain: bool, require_bank: bool) -> None:
        attrs = self._file.attrs
        if attrs.get("format") != FORMAT_NAME:
            raise FeatureFileError(f"{self.path}: not a gigassl slide feature file (no format={FORMAT_NAME!r})")
        version = int(attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise FeatureFileError(
                f"{self.path}: format version {version}, this package reads {FORMAT_VERSION}; "
                "re-extract with this version of gigassl"
            )
        if not bool(attrs.get("complete", False)):
            raise FeatureFileError(f"{self.path}: incomplete file (interrupted write); re-run extraction")
        if require_plain and not {"features", "coords"} <= set(self._file):
            raise FeatureFileError(f"{self.path}: has no plain features; run `gigassl extract` with plain features")
        if require_bank and not self.has_bank:
            raise FeatureFileError(f"{self.path}: has no augmented bank (aug_features); run `gigassl extract` with the bank")
        if self.has_bank and self._file["aug_features"].attrs.get("layout") != BANK_LAYOUT:
            raise FeatureFileError(f"{self.path}: augmented bank of an unknown layout; re-extract it")

    def __enter__(self) -> "SlideFeatures":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def file(self) -> h5py.File:
        """The open, read-only HDF5 file (for readers of the raw layout such as :mod:`extract.features.bank_chunks`)."""
        return self._file

    @property
    def slide_id(self) -> str:
        return str(self._file.attrs.get("slide_id", self.path.stem))

    @property
    def has_plain(self) -> bool:
        return {"features", "coords"} <= set(self._file)

    @property
    def has_bank(self) -> bool:
        return {"aug_features", "aug_coords"} <= set(self._file)

    @property
    def settings(self) -> dict[str, Any]:
        return json.loads(self._file.attrs.get("settings", "{}"))

    @property
    def grid_attrs(self) -> dict[str, Any]:
        """Attributes of ``coords`` (tile size, µm/px, level-0 size …)."""
        source = self._file["coords"] if "coords" in self._file else self._file["aug_coords"]
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in source.attrs.items()}

    @property
    def tile_step_level0(self) -> float:
        """A tile's side in level-0 pixels: grid cells are coords divided by this."""
        attrs = self.grid_attrs
        step = attrs.get("patch_size_level0_exact", attrs.get("patch_size_level0"))
        if step is None:
            raise FeatureFileError(
                f"{self.path}: no tile size in level-0 pixels (patch_size_level0) on its coords; it was written "
                "without plain features by an older version: re-extract it (`gigassl extract --overwrite`)"
            )
        return float(step)

    @property
    def encoder_sha256(self) -> str:
        name = "features" if "features" in self._file else "aug_features"
        return str(self._file[name].attrs.get("encoder_sha256", ""))

    @property
    def encoder_attrs(self) -> dict[str, Any]:
        """The tile encoder's provenance (``encoder``, ``encoder_arch``, ``encoder_width`` …, see
        :meth:`extract.encoders.tile_encoder.EncoderInfo.attrs`); files of older versions hold only some."""
        name = "features" if "features" in self._file else "aug_features"
        attrs = self._file[name].attrs
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in attrs.items() if k.startswith("encoder")}

    def _read(self, name: str, selection: Any = Ellipsis, what: str = "") -> np.ndarray:
        """``name[selection]``; a damaged chunk is a :class:`FeatureFileError` naming the file."""
        try:
            return self._file[name][selection]
        except OSError as error:  # HDF5's "filter returned failure": Fletcher-32 or inflate
            raise damaged(self.path, what or f"dataset {name!r}") from error

    def features(self) -> np.ndarray:
        """(N, D) float32 plain tile features."""
        return self._read("features").astype(np.float32, copy=False)

    def coords(self) -> np.ndarray:
        """(N, 2) int64 level-0 top-left (x, y) of each plain tile."""
        return self._read("coords")

    @property
    def n_plain_tiles(self) -> int:
        """N, the number of plain tiles (rows of ``features``)."""
        return int(self._file["features"].shape[0])

    @property
    def n_augmentations(self) -> int:
        return int(self._file["aug_features"].shape[0])

    @property
    def bank_size(self) -> int:
        """K, the number of tiles per augmentation."""
        return int(self._file["aug_features"].shape[2])

    @property
    def bank_attrs(self) -> dict[str, Any]:
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in self._file["aug_features"].attrs.items()}

    def augmentation(self, index: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Augmentation ``index`` of the bank: (K, D) float32 features, (K, 2) int64 coords.

        Reads only that augmentation's chunk from disk; with ``rows`` (indices into K) only
        those tiles are converted and returned, (len(rows), D) and (len(rows), 2).
        """
        stored = self._read("aug_features", index, f"augmentation {index} of the bank")  # (D, K) float16
        coords = self._read("aug_coords", index, f"the coords of augmentation {index}")
        if rows is not None:
            stored, coords = stored[:, rows], coords[rows]
        return np.ascontiguousarray(stored.T, dtype=np.float32), coords


def why_incomplete(
    path: str | Path, *, require_plain: bool = False, require_bank: bool = False, verify: bool = False
) -> str | None:
    """None when ``path`` is a complete, valid file holding what is asked for, else why not.

    With ``verify`` every chunk is read and its checksum checked (a whole read of the file).
    """
    path = Path(path)
    if not path.is_file():
        return "no such file"
    try:
        with SlideFeatures(path, require_plain=require_plain, require_bank=require_bank) as features:
            if verify:
                verify_checksums(features.file, path)
    except FeatureFileError as error:
        return str(error)
    return None


def is_complete(path: str | Path, *, require_plain: bool = False, require_bank: bool = False, verify: bool = False) -> bool:
    """True when ``path`` is a complete, valid file holding what is asked for (see :func:`why_incomplete`)."""
    return why_incomplete(path, require_plain=require_plain, require_bank=require_bank, verify=verify) is None
