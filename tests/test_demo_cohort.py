"""The demo cohort writer: valid pyramidal TIFFs with µm/px, balanced labels, reproducible, stain shifts."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import openslide
import pytest

from gigassl.synthetic.demo_cohort import (
    KATHER_MPP,
    CohortSettings,
    apply_stain,
    kather_tiles_dir,
    load_kather_tiles,
    random_stain_matrix,
    write_demo_cohort,
)

# Small slides keep every test to a second or two; the drawing code is the same at any size.
SMALL = CohortSettings(width_px=768, height_px=512, blob_sigma_px=120.0, region_sigma_px=80.0)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[list[Path], Path]:
    return write_demo_cohort(tmp_path_factory.mktemp("cohort"), n_slides=6, seed=3, settings=SMALL)


def test_packaged_tiles_are_the_kather_classes():
    tiles = load_kather_tiles()
    assert sorted(tiles) == [
        f"0{i}_{n}"
        for i, n in enumerate(["TUMOR", "STROMA", "COMPLEX", "LYMPHO", "DEBRIS", "MUCOSA", "ADIPOSE", "EMPTY"], start=1)
    ]
    assert all(len(v) == 3 and v[0].shape == (150, 150, 3) and v[0].dtype == np.uint8 for v in tiles.values())
    assert "CC BY 4.0" in (kather_tiles_dir() / "ATTRIBUTION.md").read_text()


def test_slides_open_with_openslide_as_pyramids_with_mpp(cohort):
    paths, labels_csv = cohort
    assert [p.name for p in paths] == [f"demo_{i:03d}.tiff" for i in range(6)]
    assert {p.parent for p in paths} == {labels_csv.parent / "slides"}
    for path in paths:
        slide = openslide.OpenSlide(str(path))
        try:
            assert slide.level_count == SMALL.n_levels
            assert slide.level_dimensions[0] == (SMALL.width_px, SMALL.height_px)
            assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(KATHER_MPP, rel=1e-4)
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(KATHER_MPP, rel=1e-4)
            assert slide.properties["openslide.level[0].tile-width"] == str(SMALL.tile_px)
            region = np.asarray(slide.read_region((0, 0), 0, (SMALL.width_px, SMALL.height_px)).convert("RGB"))
        finally:
            slide.close()
        bright = region.min(axis=2) > 225
        # Tissue on a white background: both present, corners are background.
        assert 0.2 < 1.0 - bright.mean() < 0.8
        assert bright[:4, :4].all()


def test_package_reader_gets_the_mpp(cohort):
    from extract.slides.formats import open_slide

    with open_slide(cohort[0][0]) as reader:
        assert reader.level0_mpp == pytest.approx(KATHER_MPP, rel=1e-4)


def test_labels_are_balanced_and_match_the_manifest(cohort):
    paths, labels_csv = cohort
    with labels_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["slide"] for r in rows] == [p.stem for p in paths]
    labels = [int(r["label"]) for r in rows]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1]
    manifest = json.loads((labels_csv.parent / "cohort.json").read_text())
    by_slide = {s["slide"]: s for s in manifest["slides"]}
    for row in rows:
        record = by_slide[row["slide"]]
        assert record["label"] == int(row["label"])
        assert (record["tumour_fraction"] > 0.2) == (record["label"] == 1)


def test_odd_cohort_has_one_more_negative(tmp_path):
    _, labels_csv = write_demo_cohort(tmp_path, n_slides=3, seed=0, settings=SMALL)
    with labels_csv.open() as handle:
        assert sorted(int(r["label"]) for r in csv.DictReader(handle)) == [0, 0, 1]


def test_same_seed_same_files_other_seed_other_files(cohort, tmp_path):
    paths, labels_csv = cohort
    again, again_csv = write_demo_cohort(tmp_path / "a", n_slides=6, seed=3, settings=SMALL)
    assert [_digest(p) for p in again] == [_digest(p) for p in paths]
    assert again_csv.read_text() == labels_csv.read_text()
    other, _ = write_demo_cohort(tmp_path / "b", n_slides=2, seed=4, settings=SMALL)
    assert _digest(other[0]) != _digest(paths[0])


def test_existing_cohort_is_reused_unless_overwrite(tmp_path):
    paths, _ = write_demo_cohort(tmp_path, n_slides=2, seed=0, settings=SMALL)
    stamp = paths[0].stat().st_mtime_ns
    write_demo_cohort(tmp_path, n_slides=2, seed=0, settings=SMALL)
    assert paths[0].stat().st_mtime_ns == stamp
    write_demo_cohort(tmp_path, n_slides=2, seed=0, settings=SMALL, overwrite=True)
    assert paths[0].stat().st_mtime_ns != stamp


def test_stain_shift_differs_between_slides(cohort):
    _, labels_csv = cohort
    manifest = json.loads((labels_csv.parent / "cohort.json").read_text())
    matrices = np.array([s["stain_matrix"] for s in manifest["slides"]])
    assert matrices.shape == (6, 3, 3)
    differences = [np.abs(matrices[i] - matrices[j]).max() for i in range(6) for j in range(i + 1, 6)]
    assert min(differences) > 1e-3
    assert all(np.abs(m - np.eye(3)).max() > 1e-3 for m in matrices)


def test_stain_map_keeps_white_and_changes_tissue_colour():
    rng = np.random.default_rng(0)
    matrix = random_stain_matrix(rng, 0.1)
    white = np.full((2, 2, 3), 255, np.uint8)
    assert (apply_stain(white, matrix) == 255).all()
    tissue = load_kather_tiles()["01_TUMOR"][0]
    shifted = apply_stain(tissue, matrix)
    assert shifted.shape == tissue.shape and shifted.dtype == np.uint8
    assert np.abs(shifted.astype(int) - tissue).mean() > 2
    # The identity map changes nothing (up to uint8 rounding).
    assert np.abs(apply_stain(tissue, np.eye(3)).astype(int) - tissue).max() <= 1


def test_too_few_slides_is_refused(tmp_path):
    with pytest.raises(ValueError, match="n_slides=1"):
        write_demo_cohort(tmp_path, n_slides=1)
