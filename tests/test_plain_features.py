"""Plain features read for stage 2: gigassl files, TRIDENT/CLAM-layout files, NaN refused, duplicate ids."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from extract.features.plain import LAYOUT_FOREIGN, read_plain_features, read_slide_id, split_duplicate_ids
from extract.features.slide_file import FeatureFileError
from gigassl.synthetic.cohort import write_synthetic_cohort


def write_trident_file(
    path: Path, n_tiles: int = 12, width: int = 256, step: int | None = 512, encoder: str | None = None, seed: int = 0
) -> Path:
    """A per-slide file in TRIDENT's layout: features (N, D), coords (N, 2) with grid attributes."""
    rng = np.random.default_rng(seed)
    cells = np.stack(np.unravel_index(rng.choice(40, size=n_tiles, replace=False), (5, 8)), axis=1)[:, ::-1]
    with h5py.File(path, "w") as handle:
        features = handle.create_dataset("features", data=rng.standard_normal((n_tiles, width)).astype(np.float32))
        coords = handle.create_dataset("coords", data=cells.astype(np.int64) * (step or 512) + 1000)
        if step is not None:
            coords.attrs.update(patch_size=256, patch_size_level0=step, level0_magnification=40, target_magnification=20)
        if encoder is not None:
            features.attrs["encoder"] = encoder
    return path


def test_trident_layout_is_read_with_its_grid(tmp_path):
    slide = read_plain_features(write_trident_file(tmp_path / "TCGA-01.h5", width=1024, encoder="uni_v1"))
    assert slide.slide_id == "TCGA-01" and slide.layout == LAYOUT_FOREIGN
    assert slide.features.shape == (12, 1024) and slide.features.dtype == np.float32 and slide.feature_dim == 1024
    assert slide.tile_step_level0 == 512.0 and slide.coords.dtype == np.int64
    assert slide.encoder_name == "uni_v1" and slide.encoder_sha256 == ""


def test_clam_file_without_tile_size_takes_the_grid_step_of_its_coords(tmp_path):
    slide = read_plain_features(write_trident_file(tmp_path / "clam.h5", n_tiles=20, step=None))
    assert slide.tile_step_level0 == 512.0
    with h5py.File(tmp_path / "batched.h5", "w") as handle:  # features saved with a batch axis
        handle["features"] = np.ones((1, 3, 8), np.float32)
        handle["coords"] = np.array([[0, 0], [224, 0], [448, 224]])
    assert read_plain_features(tmp_path / "batched.h5").features.shape == (3, 8)


def test_nan_plain_features_are_refused_naming_the_file_and_the_slide(tmp_path):
    path = write_synthetic_cohort(tmp_path, n_slides=1, n_tiles=10, n_augmentations=1, bank_size=4)[0]
    with h5py.File(path, "a") as handle:
        handle["features"][3, 7] = np.nan
        handle["features"][5, 0] = np.inf
    with pytest.raises(
        FeatureFileError,
        match=r"slide_000\.h5: NaN or inf in the plain features of 2 of 10 tiles "
        r"\(slide slide_000\)",
    ):
        read_plain_features(path)


def test_malformed_foreign_files_are_one_line_errors(tmp_path):
    with h5py.File(tmp_path / "bad.h5", "w") as handle:
        handle["features"] = np.ones((4, 8), np.float32)
        handle["coords"] = np.zeros((4, 3), np.int64)
    with pytest.raises(FeatureFileError, match="bad.h5: .*not the TRIDENT/CLAM layout"):
        read_plain_features(tmp_path / "bad.h5")
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(FeatureFileError, match="junk.h5: not a readable HDF5 file"):
        read_plain_features(tmp_path / "junk.h5")


def test_duplicate_slide_ids_keep_the_file_named_after_the_id(tmp_path):
    original = write_synthetic_cohort(tmp_path, n_slides=2, n_tiles=6, n_augmentations=1, bank_size=4)[0]
    copy = tmp_path / "a_copy_of_slide_000.h5"
    copy.write_bytes(original.read_bytes())
    assert read_slide_id(copy) == "slide_000"
    files = sorted(tmp_path.glob("*.h5"))
    kept, duplicates = split_duplicate_ids(files)
    assert [p.name for p in kept] == ["slide_000.h5", "slide_001.h5"]
    assert duplicates == [
        (
            str(copy),
            "slide id 'slide_000' is also the id of slide_000.h5, which is used instead "
            "(a copied file?); remove or rename one of them",
        )
    ]
