import json
import logging

import h5py
import numpy as np
import pytest

from extract.encoders.tile_encoder import EncoderInfo
from extract.features.slide_file import (
    FORMAT_VERSION,
    FeatureFileError,
    SlideFeatures,
    SlideFileWriter,
    is_complete,
    why_incomplete,
)
from gigassl.cli import main
from gigassl.synthetic.cohort import write_synthetic_cohort
from gigassl.training.data import scan_features_folder

ENCODER = EncoderInfo("random", "0" * 64, "random")
GRID = dict(
    patch_size=224,
    patch_size_level0=448,
    patch_size_level0_exact=448.0,
    mpp=0.25,
    target_mpp=0.5,
    level0_width=4000,
    level0_height=3000,
    tissue_threshold=0.5,
)


def _write(path, n=10, bank=True):
    rng = np.random.default_rng(0)
    feats = rng.random((n, 256), dtype=np.float32)
    coords = np.stack([np.arange(n) * 448, np.zeros(n)], 1).astype(np.int64)
    with SlideFileWriter(path, slide_id="s1", source="s1.svs", settings={"target_mpp": 0.5}, encoder=ENCODER) as writer:
        writer.create_plain(coords, GRID)
        writer.write_plain_rows(0, feats[:4])
        writer.write_plain_rows(4, feats[4:])
        if bank:
            writer.create_bank(3, 5, {"seed": 0, "sampled_with_replacement": False, "augmentation": {"p": 1}})
            for a in range(3):
                writer.write_augmentation(a, feats[a : a + 5], coords[a : a + 5])
    return feats, coords


def test_round_trip(tmp_path):
    path = tmp_path / "s1.h5"
    feats, coords = _write(path)
    assert not list(tmp_path.glob("*.partial"))
    with SlideFeatures(path, require_plain=True, require_bank=True) as slide:
        assert slide.slide_id == "s1"
        np.testing.assert_array_equal(slide.features(), feats)
        np.testing.assert_array_equal(slide.coords(), coords)
        assert slide.tile_step_level0 == 448.0
        assert (slide.n_augmentations, slide.bank_size) == (3, 5)
        aug, aug_coords = slide.augmentation(2)
        np.testing.assert_allclose(aug, feats[2:7], rtol=1e-3)
        assert aug.flags.c_contiguous and aug.dtype == np.float32  # (K, 256) rows, as written
        np.testing.assert_array_equal(aug_coords, coords[2:7])
        assert slide.settings == {"target_mpp": 0.5}
    with h5py.File(path) as handle:  # TRIDENT / CLAM readers see the usual layout
        assert handle["coords"].attrs["patch_size"] == 224
        assert handle["features"].attrs["encoder"] == "random"
        assert handle["aug_features"].chunks == (1, 256, 5)  # one chunk per augmentation
    assert is_complete(path, require_plain=True, require_bank=True)


def test_bank_rows_stored_by_position_so_repeats_compress(tmp_path):
    rng = np.random.default_rng(1)
    tiles = rng.random((8, 256), dtype=np.float32)
    rows = rng.integers(0, 8, size=256)  # 256 draws of 8 tiles, with replacement
    coords = np.stack([rows * 448, np.zeros_like(rows)], 1)
    path = tmp_path / "s.h5"
    with SlideFileWriter(path, slide_id="s", source="s", settings={}, encoder=ENCODER) as writer:
        writer.create_bank(2, 256, {})
        for a in range(2):
            writer.write_augmentation(a, tiles[rows], coords)
    with SlideFeatures(path, require_bank=True) as slide:
        features, stored = slide.augmentation(1)
    order = np.argsort(rows, kind="stable")
    np.testing.assert_array_equal(stored, coords[order])
    np.testing.assert_allclose(features, tiles[rows][order], rtol=1e-3)
    with h5py.File(path) as handle:
        stored_bytes = handle["aug_features"].id.get_storage_size()
    assert stored_bytes < 0.2 * 2 * 256 * 256 * 2  # 8 distinct tiles, not 256


def test_interrupted_write_leaves_nothing(tmp_path):
    path = tmp_path / "s1.h5"
    with pytest.raises(RuntimeError):
        with SlideFileWriter(path, slide_id="s1", source="x", settings={}, encoder=ENCODER) as writer:
            writer.create_plain(np.zeros((2, 2)), GRID)
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_refuses_incomplete_other_version_and_missing_bank(tmp_path):
    path = tmp_path / "s1.h5"
    _write(path, bank=False)
    with pytest.raises(FeatureFileError, match="no augmented bank"):
        SlideFeatures(path, require_bank=True)
    assert not is_complete(path, require_bank=True)
    with h5py.File(path, "a") as handle:
        handle.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(FeatureFileError, match="format version"):
        SlideFeatures(path)
    with h5py.File(path, "a") as handle:
        handle.attrs["format_version"] = FORMAT_VERSION
        del handle.attrs["complete"]
    with pytest.raises(FeatureFileError, match="incomplete"):
        SlideFeatures(path)
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(path.read_bytes()[:500])
    with pytest.raises(FeatureFileError, match="corrupt.h5"):
        SlideFeatures(corrupt)
    assert not is_complete(corrupt)


def flip_bytes(path, dataset: str) -> None:
    """Overwrite 16 bytes in the middle of ``dataset``'s first chunk on disk (bit rot, a bad copy)."""
    with h5py.File(path, "r") as handle:
        info = handle[dataset].id.get_chunk_info(0)
    data = bytearray(path.read_bytes())
    middle = info.byte_offset + info.size // 2
    data[middle : middle + 16] = bytes(255 - b for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("dataset", ["features", "coords", "aug_features", "aug_coords"])
def test_flipped_bytes_in_any_dataset_are_detected(tmp_path, dataset):
    path = tmp_path / "s1.h5"
    _write(path)
    assert why_incomplete(path, require_plain=True, require_bank=True, verify=True) is None
    flip_bytes(path, dataset)
    assert is_complete(path, require_plain=True, require_bank=True)  # the layout still looks whole …
    reason = why_incomplete(path, require_plain=True, require_bank=True, verify=True)  # … its checksums do not
    assert reason is not None and "s1.h5" in reason and f"damaged file (dataset '{dataset}' fails its checksum)" in reason


def test_a_missing_file_is_not_told_to_delete_it(tmp_path):
    with pytest.raises(FeatureFileError) as refusal:
        SlideFeatures(tmp_path / "absent.h5")
    assert "absent.h5: no such file" in str(refusal.value) and "delete" not in str(refusal.value)


def test_a_file_of_the_previous_format_version_is_refused_and_a_bad_file_for_training(tmp_path, caplog):
    features = tmp_path / "features"
    paths = write_synthetic_cohort(features, n_slides=4, n_tiles=12, n_augmentations=2, bank_size=6)
    with h5py.File(paths[0], "a") as handle:  # as version 2 wrote it: settings under their former names
        handle.attrs["format_version"] = FORMAT_VERSION - 1
        handle.attrs["settings"] = json.dumps({"mpp": 0.5, "tile_size": 224})
    reason = f"format version {FORMAT_VERSION - 1}, this package reads {FORMAT_VERSION}; re-extract with this version of gigassl"
    with pytest.raises(FeatureFileError) as error:
        SlideFeatures(paths[0])
    assert str(error.value) == f"{paths[0]}: {reason}"
    assert why_incomplete(paths[0]) == str(error.value)
    with pytest.raises(FeatureFileError) as error:
        scan_features_folder(features, 3)
    assert f"1 of 4 files in {features} cannot be used" in str(error.value) and f"{paths[0].name}: {reason}" in str(error.value)
    with caplog.at_level(logging.ERROR):
        assert main(["train", "--features", str(features), "--out", str(tmp_path / "run"), "--num-workers", "0"]) == 2
    assert reason in "\n".join(r.getMessage() for r in caplog.records)
    assert [path for path, _ in scan_features_folder(features, 3, skip_bad_files=True).skipped] == [paths[0]]
