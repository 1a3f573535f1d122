import os

import h5py
import numpy as np
import pytest

import extract.features.bank_chunks as bank_chunks
from extract.features.bank_chunks import BankChunkReader, locate_bank_chunks
from extract.features.slide_file import FeatureFileError, SlideFeatures
from gigassl.synthetic.cohort import write_synthetic_cohort


@pytest.fixture()
def slide_path(tmp_path):
    write_synthetic_cohort(tmp_path, n_slides=1, n_tiles=30, n_augmentations=4, bank_size=16, seed=2)
    return tmp_path / "slide_000.h5"


@pytest.mark.parametrize("inflater", ["libdeflate", "zlib"])
def test_direct_reads_equal_h5py_reads(slide_path, monkeypatch, inflater):
    if inflater == "zlib":
        monkeypatch.setattr(bank_chunks, "_libdeflate", None)
    else:
        assert bank_chunks._libdeflate is not None, "deflate (libdeflate) is a dependency and must import"
    reader = BankChunkReader()
    rng = np.random.default_rng(0)
    with SlideFeatures(slide_path) as slide:
        chunks = locate_bank_chunks(slide)
        assert chunks is not None and chunks.n_augmentations == 4 and chunks.bank_size == 16
        for a in range(4):
            expected = slide.augmentation(a)
            got = reader.read(chunks, a)
            for x, y in zip(expected, got):
                assert x.dtype == y.dtype and x.shape == y.shape
                np.testing.assert_array_equal(x, y)
            rows = rng.choice(16, size=7, replace=True)  # duplicates, any order
            for x, y in zip(slide.augmentation(a, rows), reader.read(chunks, a, rows)):
                np.testing.assert_array_equal(x, y)
    with pytest.raises(IndexError):
        reader.read(chunks, 4)
    reader.close()


def test_another_layout_has_no_chunk_index(slide_path, tmp_path):
    """A bank re-written with other filters (as h5repack would) is read through h5py instead."""
    other = tmp_path / "repacked.h5"
    with h5py.File(slide_path, "r") as source, h5py.File(other, "w") as target:
        for key, value in source.attrs.items():
            target.attrs[key] = value
        for name in source:
            data = source[name]
            copy = target.create_dataset(name, data=data[...], chunks=data.chunks, compression="lzf")
            for key, value in data.attrs.items():
                copy.attrs[key] = value
    with SlideFeatures(other, require_bank=True) as slide:
        assert locate_bank_chunks(slide) is None
        assert slide.augmentation(1)[0].shape == (16, 256)


def test_a_replaced_file_is_refused(slide_path):
    with SlideFeatures(slide_path) as slide:
        chunks = locate_bank_chunks(slide)
    replacement = slide_path.with_name("new.h5")
    replacement.write_bytes(slide_path.read_bytes() + b"\0" * 10)
    os.replace(replacement, slide_path)
    with pytest.raises(FeatureFileError, match="changed after the cohort was scanned") as error:
        BankChunkReader().read(chunks, 0)
    assert str(slide_path) in str(error.value)


def test_a_damaged_chunk_names_the_file(slide_path):
    with SlideFeatures(slide_path) as slide:
        chunks = locate_bank_chunks(slide)
    offset = int(chunks.feature_offsets[2])
    with open(slide_path, "r+b") as handle:  # overwrite the chunk's zlib header and first bytes
        handle.seek(offset)
        handle.write(b"\xff" * 64)
    stat = os.stat(slide_path)
    chunks = bank_chunks.BankChunks(
        chunks.path,
        chunks.bank_size,
        chunks.feature_offsets,
        chunks.feature_sizes,
        chunks.coord_offsets,
        chunks.coord_sizes,
        identity=(stat.st_ino, stat.st_size, stat.st_mtime_ns),
    )
    reader = BankChunkReader()
    reader.read(chunks, 1)  # other augmentations still read
    with pytest.raises(
        FeatureFileError, match=r"damaged file \(augmentation 2 of the bank fails its checksum\); re-extract"
    ) as error:
        reader.read(chunks, 2)
    assert str(slide_path) in str(error.value)
