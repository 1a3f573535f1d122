"""Tissue mask, tissue fraction per tile and the QC picture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.slides.formats import open_slide
from extract.slides.tissue import otsu_threshold, pen_ink_mask, save_qc_image, tile_tissue_fraction, tissue_mask
from fixtures.make_slides import MARKERS, paint_marker, synthetic_image


def test_otsu_separates_two_modes() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(30, 5, 5000), rng.normal(160, 10, 3000)]).clip(0, 255).astype(np.uint8)
    assert 50 < otsu_threshold(values) < 130


def test_mask_finds_tissue_on_a_real_slide(slides_dir: Path) -> None:
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as reader:
        thumb, _downsample = reader.thumbnail(600)
    mask = tissue_mask(thumb)
    assert mask.shape == thumb.shape[:2]
    assert 0.2 < mask.mean() < 0.7
    # The corners of CMU-1-Small-Region are glass; its lower middle is dense dermis.
    height, width = mask.shape
    for y, x in [(5, 5), (5, width - 6), (height - 6, 5)]:
        assert not mask[y, x]
    assert mask[int(height * 0.8), int(width * 0.5)]
    # Tissue is more saturated than what the mask rejects.
    saturation = np.asarray(Image.fromarray(thumb).convert("HSV"))[..., 1].astype(float)
    assert saturation[mask].mean() > saturation[~mask].mean() + 20


def test_blank_slide_has_no_tissue() -> None:
    rng = np.random.default_rng(1)
    glass = np.clip(240 + rng.integers(-6, 6, size=(200, 300, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(glass).any()


def test_mask_of_synthetic_boxes_is_exact() -> None:
    image = synthetic_image(400, 300, [(50, 60, 250, 200)])
    mask = tissue_mask(image)
    expected = np.zeros((300, 400), dtype=bool)
    expected[60:200, 50:250] = True
    assert (mask == expected).mean() > 0.995


def test_tile_fraction_is_the_covered_share() -> None:
    mask = np.zeros((40, 40), dtype=bool)
    mask[:, :20] = True  # left half tissue
    coords = np.array([[0, 0], [80, 0], [60, 40], [120, 120]])  # level-0 px, downsample 4
    fraction = tile_tissue_fraction(mask, 4.0, coords, 40.0)  # each tile is 10 × 10 mask px
    assert fraction == pytest.approx([1.0, 0.0, 0.5, 0.0])


def test_qc_image_draws_kept_tiles(tmp_path: Path) -> None:
    thumb = np.full((100, 120, 3), 255, dtype=np.uint8)
    mask = np.zeros((100, 120), dtype=bool)
    mask[20:60, 20:60] = True
    save_qc_image(tmp_path / "qc" / "slide.png", thumb, mask, 2.0, np.array([[40, 40]]), 40.0)
    picture = np.asarray(Image.open(tmp_path / "qc" / "slide.png").convert("RGB"))
    assert picture.shape == (100, 120, 3)
    assert tuple(picture[20, 30]) == (20, 170, 20)  # outline of the tile at mask (20..40)
    assert picture[30, 30, 0] < 255 and tuple(picture[80, 100]) == (255, 255, 255)  # tint on tissue only
    assert not list((tmp_path / "qc").glob("*.partial*"))


@pytest.mark.shared_data
def test_an_image_that_is_all_tissue_is_not_split_in_two(shared_data: Path) -> None:
    # Pale stroma (saturation ~49) beside dense nuclei (~159): Otsu alone would cut between them.
    image = np.empty((200, 300, 3), dtype=np.uint8)
    image[:, :150] = (235, 190, 220)
    image[:, 150:] = (90, 60, 160)
    assert tissue_mask(image).mean() > 0.99
    with open_slide(shared_data / "bach-dev" / "b001.jpg", default_mpp=0.42) as reader:
        thumb, _ = reader.thumbnail(512)
    assert tissue_mask(thumb).mean() > 0.8  # a microscopy field of breast tissue, no glass


@pytest.mark.parametrize("marker", sorted(MARKERS))
def test_pen_ink_over_real_tissue_is_not_tissue(slides_dir: Path, marker: str) -> None:
    """Marker strokes 150 µm wide (a fine tip) painted over CMU-1-Small-Region at the mask's
    scale: before, every inked tissue pixel was kept; now (nearly) none is, and the clean
    tissue beside the strokes stays."""
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as reader:
        thumb, downsample = reader.thumbnail(1536)
        mpp = reader.level0_mpp * downsample
    clean = tissue_mask(thumb, ink=pen_ink_mask(thumb, mpp))
    for seed in (1, 2):
        inked, stroke = paint_marker(thumb, MARKERS[marker], round(150 / mpp), seed)
        under_ink, beside = stroke & clean, clean & ~stroke
        assert under_ink.sum() > 10_000
        mask = tissue_mask(inked, ink=pen_ink_mask(inked, mpp))
        assert mask[under_ink].mean() < 0.05  # share of inked tissue kept (1.0 without the ink rule)
        assert mask[beside].mean() > 0.98


@pytest.mark.shared_data
def test_pen_ink_rule_keeps_clean_tissue(slides_dir: Path, shared_data: Path) -> None:
    """Dense nuclei look like ink pixel by pixel; the rule must not cut clean H&E."""
    images = [(slides_dir / "CMU-1-Small-Region.svs", None), (shared_data / "slides" / "TCGA-CR-7395-01A-01-TS1.svs", 3.0)]
    images += [(shared_data / "bach-dev" / f"{name}.jpg", 0.42) for name in ("iv009", "is015", "n023", "b029")]
    for path, default_mpp in images:
        with open_slide(path, default_mpp=default_mpp) as reader:
            thumb, downsample = reader.thumbnail(1536)
            ink = pen_ink_mask(thumb, reader.level0_mpp * downsample)
        tissue = tissue_mask(thumb, ink=np.zeros(thumb.shape[:2], dtype=bool))
        assert (tissue & ink).sum() <= 0.005 * tissue.sum(), path.name


def test_qc_image_is_large_enough_to_judge_and_shows_ink(slides_dir: Path, tmp_path: Path) -> None:
    from extract.batch.slide_plan import PlanSettings, plan_slide

    _, qc_partial = plan_slide(
        slides_dir / "CMU-1-Small-Region.svs",
        None,
        PlanSettings(target_mpp=0.5, tile_size_px=224, tissue_threshold=0.5, qc_dir=tmp_path),
    )
    with Image.open(qc_partial) as picture:
        assert max(picture.size) >= 1500  # was 768: pen marks and borders could not be judged
    thumb = np.full((100, 120, 3), 255, dtype=np.uint8)
    ink = np.zeros((100, 120), dtype=bool)
    ink[:, 60:] = True
    save_qc_image(tmp_path / "ink.png", thumb, ~ink, 1.0, np.empty((0, 2)), 10.0, ink=ink)
    picture = np.asarray(Image.open(tmp_path / "ink.png").convert("RGB"))
    assert (picture[:, 60:] == (230, 0, 0)).all(axis=2).mean() > 0.2 and not (picture[:, :60] == (230, 0, 0)).all(axis=2).any()
