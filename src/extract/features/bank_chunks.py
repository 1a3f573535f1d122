"""Random access to bank augmentations by direct chunk reads, for training.

Training reads, for every view, one augmentation of one slide and keeps T of its K tiles.
Through h5py that costs an open file per slide, a selection, HDF5's filter pipeline and the
float16 → float32 conversion of all K tiles. The bank's layout (one chunk per augmentation,
shuffle then deflate, see :mod:`extract.features.slide_file`) allows a leaner read: find each
chunk's byte offset once (:func:`locate_bank_chunks`, when the cohort is scanned), then per
view read the compressed bytes with one ``pread``, inflate them (libdeflate when installed,
else zlib: both give the same bytes) and undo the shuffle only for the T tiles asked for.

A file whose bank is stored otherwise (e.g. re-compressed with ``h5repack``) has no chunk
index; callers fall back to :meth:`SlideFeatures.augmentation`. A file replaced after it was
indexed is detected (inode, size, mtime) and refused rather than read at stale offsets.
"""

from __future__ import annotations

import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import h5py
import numpy as np

from extract.features.slide_file import FeatureFileError, SlideFeatures, damaged

try:  # libdeflate inflates a whole buffer of known size ~3× faster than zlib
    import deflate

    _libdeflate: ModuleType | None = deflate
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    _libdeflate = None

# The filter pipeline the writer uses, in order: byte shuffle, then deflate (gzip), then (files
# written since issue 13) a Fletcher-32 checksum appended to each compressed chunk — skipped by
# these direct reads, whose zlib stream carries its own Adler-32 check.
BANK_FILTERS = (h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_DEFLATE)
CHECKSUM_BYTES = 4


def inflate(data: bytes, size: int) -> bytes:
    """Decompress one zlib-wrapped deflate chunk whose decompressed length is ``size``."""
    if _libdeflate is not None:
        return _libdeflate.zlib_decompress(data, size)
    out = zlib.decompress(data)
    if len(out) != size:
        raise zlib.error(f"chunk inflated to {len(out)} bytes, expected {size}")
    return out


def file_identity(path: Path) -> tuple[int, int, int]:
    """(inode, size, mtime in ns): changes when the file is rewritten or replaced."""
    stat = os.stat(path)
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


@dataclass(frozen=True, eq=False)
class BankChunks:
    """Where the compressed chunks of each augmentation lie in one slide file."""

    path: Path
    bank_size: int  # K, tiles per augmentation
    feature_offsets: np.ndarray = field(repr=False)  # (A,) int64 byte offsets of aug_features chunks
    feature_sizes: np.ndarray = field(repr=False)  # (A,) int64 compressed sizes
    coord_offsets: np.ndarray = field(repr=False)  # (A,) of aug_coords chunks
    coord_sizes: np.ndarray = field(repr=False)
    identity: tuple[int, int, int] = (0, 0, 0)
    n_features: int = 256  # D, the width of the tile features (ResNet18's 256 by default)

    @property
    def n_augmentations(self) -> int:
        return len(self.feature_offsets)


def _chunk_table(dataset: h5py.Dataset, chunk_shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray] | None:
    """(offsets, sizes) of the per-augmentation chunks, or None when the layout is not ours."""
    if dataset.chunks != chunk_shape or dataset.dtype != dtype:
        return None
    plist = dataset.id.get_create_plist()
    filters = tuple(plist.get_filter(i)[0] for i in range(plist.get_nfilters()))
    checksummed = filters == BANK_FILTERS + (h5py.h5z.FILTER_FLETCHER32,)
    if filters != BANK_FILTERS and not checksummed:
        return None
    n = dataset.shape[0]
    offsets, sizes = np.empty(n, np.int64), np.empty(n, np.int64)
    for a in range(n):
        info = dataset.id.get_chunk_info_by_coord((a,) + (0,) * (dataset.ndim - 1))
        if info.byte_offset is None or info.filter_mask != 0:  # unwritten, or a filter was skipped
            return None
        offsets[a], sizes[a] = info.byte_offset, info.size - (CHECKSUM_BYTES if checksummed else 0)
    return offsets, sizes


def locate_bank_chunks(slide: SlideFeatures) -> BankChunks | None:
    """The chunk index of ``slide``'s bank, or None when it is not stored as the writer stores it."""
    features, coords = slide.file["aug_features"], slide.file["aug_coords"]
    n_features, bank_size = int(features.shape[1]), int(features.shape[2])
    feature_table = _chunk_table(features, (1, n_features, bank_size), np.dtype("<f2"))
    coord_table = _chunk_table(coords, (1, bank_size, 2), np.dtype("<i8"))
    if feature_table is None or coord_table is None:
        return None
    return BankChunks(
        slide.path, bank_size, *feature_table, *coord_table, identity=file_identity(slide.path), n_features=n_features
    )


def _unshuffle_columns(raw: bytes, itemsize: int, n_elements: int, elements: np.ndarray) -> np.ndarray:
    """Undo HDF5's byte shuffle for the chosen element indices only → (len(elements),) uint8 rows of itemsize."""
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(itemsize, n_elements)
    return np.ascontiguousarray(planes[:, elements].T)


class BankChunkReader:
    """Reads augmentations through :class:`BankChunks`, keeping up to ``max_open`` files open.

    Descriptors are opened lazily; a forked DataLoader worker may use those it inherits (reads
    are positional, ``pread``), a spawned one starts with none.
    """

    def __init__(self, max_open: int = 256) -> None:
        self.max_open = max_open
        self._files: OrderedDict[Path, int] = OrderedDict()

    def _descriptor(self, chunks: BankChunks) -> int:
        fd = self._files.get(chunks.path)
        if fd is not None:
            self._files.move_to_end(chunks.path)
            return fd
        fd = os.open(chunks.path, os.O_RDONLY)
        stat = os.fstat(fd)
        if (stat.st_ino, stat.st_size, stat.st_mtime_ns) != chunks.identity:
            os.close(fd)
            raise FeatureFileError(
                f"{chunks.path}: the file changed after the cohort was scanned (re-extracted?); restart the run"
            )
        if len(self._files) >= self.max_open:
            os.close(self._files.popitem(last=False)[1])
        self._files[chunks.path] = fd
        return fd

    def _read_chunk(self, fd: int, chunks: BankChunks, offset: int, size: int, expected: int, what: str) -> bytes:
        data = os.pread(fd, int(size), int(offset))
        try:
            return inflate(data, expected)
        except Exception as error:  # zlib.error / deflate.DeflateError: a damaged chunk (Adler-32 or inflate)
            raise damaged(chunks.path, what) from error

    def read(self, chunks: BankChunks, index: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Augmentation ``index``: (t, D) float32 features and (t, 2) int64 coords of ``rows`` (all K when None)."""
        if not 0 <= index < chunks.n_augmentations:
            raise IndexError(f"{chunks.path}: augmentation {index} of {chunks.n_augmentations}")
        k, width = chunks.bank_size, chunks.n_features
        rows = np.arange(k) if rows is None else np.asarray(rows, dtype=np.int64)
        fd = self._descriptor(chunks)
        raw = self._read_chunk(
            fd,
            chunks,
            chunks.feature_offsets[index],
            chunks.feature_sizes[index],
            width * k * 2,
            f"augmentation {index} of the bank",
        )
        # Chunk (1, D, K) float16: element (f, r) is f·K + r; gather the columns of ``rows``.
        elements = (np.arange(width)[None, :] * k + rows[:, None]).ravel()
        features = _unshuffle_columns(raw, 2, width * k, elements).view("<f2")
        features = features.reshape(len(rows), width).astype(np.float32)
        raw = self._read_chunk(
            fd, chunks, chunks.coord_offsets[index], chunks.coord_sizes[index], k * 2 * 8, f"coords of augmentation {index}"
        )
        elements = (2 * rows[:, None] + np.arange(2)[None, :]).ravel()
        coords = _unshuffle_columns(raw, 8, 2 * k, elements).view("<i8").reshape(len(rows), 2)
        return features, coords.astype(np.int64, copy=False)

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = OrderedDict()  # descriptors never cross a process boundary
        return state
