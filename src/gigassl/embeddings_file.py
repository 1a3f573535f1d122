"""The slide embeddings file that ``gigassl embed`` writes and ``gigassl evaluate`` reads.

HDF5, written to a temporary file beside it and renamed when complete
(:mod:`extract.partial_files`); every vector is checked finite before it is written, and both
datasets carry a checksum that every read checks (Fletcher-32 per chunk of the embeddings, a
sha256 of the ids as their ``sha256`` attribute) (format version 2;
files of version 1, without it, are refused with the message to re-run ``gigassl embed``)::

    /slide_ids   (S,)      utf-8 strings
    /embeddings  (S, W)    float32, unit L2 norm
    root attrs: format, format_version, package_version, checkpoint, checkpoint_sha256,
                checkpoint_epoch, n_views, n_tiles_per_view, seed, features, encoder_sha256
                (tile encoder of the features), checkpoint_encoder_sha256, features_encoders
                (JSON), feature_dim (D), architecture (JSON, the sparse head), unverified
                (JSON slide ids), settings (JSON), failed (JSON), complete

Exports (``--export npz,csv``): ``OUT.npz`` (slide_ids, embeddings, provenance JSON) and
``OUT.csv`` (slide_id, e000 … e511, or … e2047).
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from extract import __version__
from extract.encoders.tile_encoder import SLIDE_FEATURE_DIM
from extract.errors import UserError
from extract.partial_files import AtomicHDF5Writer, temporary_path
from gigassl.config import EMBED_EXPORTS as EXPORTS

FORMAT_NAME = "gigassl-slide-embeddings"
FORMAT_VERSION = 2  # 2: every dataset carries a Fletcher-32 checksum per chunk, checked when read


class EmbeddingFileError(UserError):
    """An embeddings file that is missing, incomplete, of another version or malformed."""


@dataclass(frozen=True)
class SlideEmbeddings:
    """A cohort of slide embeddings: ids (S,), (S, W) float32 and the provenance attributes."""

    slide_ids: list[str]
    embeddings: np.ndarray
    provenance: dict[str, Any]

    def index(self) -> dict[str, int]:
        """slide id → row."""
        return {slide_id: row for row, slide_id in enumerate(self.slide_ids)}


def ids_sha256(slide_ids: Sequence[str]) -> str:
    """The checksum of the slide ids, stored as their dataset's ``sha256`` attribute."""
    return hashlib.sha256("\n".join(slide_ids).encode()).hexdigest()


def _attr_value(value: Any) -> Any:
    """An HDF5 attribute: numbers and strings as they are, anything else as JSON."""
    return value if isinstance(value, (int, float, str)) else json.dumps(value)


class EmbeddingWriter(AtomicHDF5Writer):
    """Appends (s, ``embedding_dim``) slide embeddings to an HDF5 file; atomic (temporary file,
    renamed on success)."""

    def __init__(self, path: str | Path, provenance: dict[str, Any], embedding_dim: int = SLIDE_FEATURE_DIM) -> None:
        self.path = Path(path)
        self.embedding_dim = int(embedding_dim)
        self.temp_path = temporary_path(self.path)
        self.provenance = provenance
        self._file: h5py.File | None = None
        self.n_slides = 0
        self._ids: list[str] = []

    def __enter__(self) -> "EmbeddingWriter":
        self._file = self._open()
        # HDF5 has no checksum filter for variable-length strings: the ids' hash is an attribute
        self._file.create_dataset("slide_ids", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(1024,))
        width = self.embedding_dim
        self._file.create_dataset(
            "embeddings", shape=(0, width), maxshape=(None, width), dtype=np.float32, chunks=(256, width), fletcher32=True
        )
        self._file.attrs["format"] = FORMAT_NAME
        self._file.attrs["format_version"] = FORMAT_VERSION
        self._file.attrs["package_version"] = __version__
        for key, value in self.provenance.items():
            self._file.attrs[key] = _attr_value(value)
        return self

    def append(self, slide_ids: Sequence[str], embeddings: np.ndarray) -> None:
        """Add rows: ids (s,), embeddings (s, W)."""
        assert self._file is not None, "use EmbeddingWriter as a context manager"
        bad = [slide_id for slide_id, row in zip(slide_ids, np.asarray(embeddings)) if not np.isfinite(row).all()]
        if bad:
            raise EmbeddingFileError(
                f"{self.path}: the embeddings of {len(bad)} slide(s) hold NaN or inf ({', '.join(bad[:5])}); nothing is "
                "written — check the checkpoint (`gigassl embed` refuses one with NaN weights) and the features"
            )
        start, end = self.n_slides, self.n_slides + len(slide_ids)
        for name in ("slide_ids", "embeddings"):
            self._file[name].resize(end, axis=0)
        self._file["slide_ids"][start:end] = list(slide_ids)
        self._file["embeddings"][start:end] = embeddings
        self.n_slides = end
        self._ids.extend(slide_ids)
        self._file["slide_ids"].attrs["sha256"] = ids_sha256(self._ids)
        self.check_space()

    def set_attr(self, key: str, value: Any) -> None:
        """Set a root attribute (JSON unless a number or a string)."""
        assert self._file is not None, "use EmbeddingWriter as a context manager"
        self._file.attrs[key] = _attr_value(value)


def read_embeddings(path: str | Path) -> SlideEmbeddings:
    """Read a file written by ``gigassl embed``; refuses other formats, versions, partial files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file {path} does not exist; write it with `gigassl embed`")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise EmbeddingFileError(f"{path}: not a readable HDF5 file ({error})") from error
    with handle:
        attrs = dict(handle.attrs)
        if attrs.get("format") != FORMAT_NAME:
            raise EmbeddingFileError(
                f"{path}: not a slide embeddings file (no format={FORMAT_NAME!r}); write it with `gigassl embed`"
            )
        if int(attrs.get("format_version", -1)) != FORMAT_VERSION:
            raise EmbeddingFileError(
                f"{path}: format version {attrs.get('format_version')}, this package reads "
                f"{FORMAT_VERSION}; re-run `gigassl embed`"
            )
        if not bool(attrs.get("complete", False)) or not {"slide_ids", "embeddings"} <= set(handle):
            raise EmbeddingFileError(f"{path}: incomplete file; re-run `gigassl embed`")
        try:  # HDF5 checks each chunk's Fletcher-32 checksum as it reads it
            ids = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in handle["slide_ids"][...]]
            embeddings = handle["embeddings"][...].astype(np.float32, copy=False)
            intact = handle["slide_ids"].attrs.get("sha256", "") == ids_sha256(ids)
        except OSError:
            intact = False
        if not intact:
            raise EmbeddingFileError(f"{path}: damaged file (its data fail their checksum); re-run `gigassl embed`")
    provenance = {k: (v.item() if hasattr(v, "item") else v) for k, v in attrs.items()}
    return SlideEmbeddings(ids, embeddings, provenance)


def export_embeddings(embeddings: SlideEmbeddings, path: str | Path, kind: str) -> Path:
    """Write ``path`` with suffix ``.npz`` (ids, embeddings, provenance JSON) or ``.csv``."""
    if kind not in EXPORTS:
        raise UserError(f"unknown export {kind!r}; choose among {', '.join(EXPORTS)}")
    target = Path(path).with_suffix(f".{kind}")
    if kind == "npz":
        np.savez(
            target,
            slide_ids=np.array(embeddings.slide_ids, dtype=str),
            embeddings=embeddings.embeddings,
            provenance=np.array(json.dumps(embeddings.provenance, default=str)),
        )
    else:
        with open(target, "w", newline="", encoding="utf-8") as handle:
            table = csv.writer(handle)
            table.writerow(["slide_id", *(f"e{j:03d}" for j in range(embeddings.embeddings.shape[1]))])
            for slide_id, row in zip(embeddings.slide_ids, embeddings.embeddings):
                table.writerow([slide_id, *(f"{v:.7g}" for v in row)])
    return target
