"""Slide reading at µm/px: level choice, resizing, white outside, plain images, bad files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from extract.slides.formats import open_slide
from extract.slides.reader import RESAMPLE_TOLERANCE, MissingMppError, SlideReadError, load_mpp_overrides
from fixtures.make_slides import write_pyramidal_tiff


def _levels_marked_tiff(path: Path) -> Path:
    """A 3-level pyramid whose level k is filled with grey value 50 * (k + 1)."""
    with tifffile.TiffWriter(path) as tiff:
        for level in range(3):
            side = 512 // 2**level
            data = np.full((side, side, 3), 50 * (level + 1), dtype=np.uint8)
            res = 1e4 / (0.25 * 2**level)
            tiff.write(
                data,
                tile=(64, 64),
                photometric="rgb",
                subfiletype=0 if level == 0 else 1,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
            )
    return path


def test_cmu_metadata(slides_dir: Path) -> None:
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as reader:
        assert reader.slide_id == "CMU-1-Small-Region"
        assert reader.level0_mpp == pytest.approx(0.499)
        assert reader.dimensions == (2220, 2967)
        assert reader.magnification == 20.0
        tile = reader.read_tile(1000, 1500, 224.4, 224)
        assert tile.shape == (224, 224, 3) and tile.dtype == np.uint8
        assert tile.std() > 10  # real tissue texture, not a blank fill


@pytest.mark.parametrize(
    "size_level0, out_px, expected_level",
    [(64, 64, 0), (96, 64, 0), (128, 64, 1), (190, 64, 1), (256, 64, 2), (512, 64, 2)],
)
def test_reads_the_closest_finer_level(tmp_path: Path, size_level0: int, out_px: int, expected_level: int) -> None:
    with open_slide(_levels_marked_tiff(tmp_path / "levels.tif")) as reader:
        assert reader.level0_mpp == pytest.approx(0.25)
        assert reader.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        tile = reader.read_tile(0, 0, size_level0, out_px)
    assert tile.shape == (out_px, out_px, 3)
    assert np.all(tile == 50 * (expected_level + 1))


def test_resizes_to_the_target_resolution(tmp_path: Path) -> None:
    gradient = np.tile((np.arange(512) // 2).astype(np.uint8)[None, :, None], (512, 1, 3))
    path = write_pyramidal_tiff(tmp_path / "gradient.tif", gradient, mpp=0.25, n_levels=1)
    with open_slide(path) as reader:
        tile = reader.read_tile(64, 0, 256, 128)  # 0.25 µm/px → 0.5 µm/px: 2 level-0 px per output px
    expected = (64 + 2 * np.arange(128) + 0.5) // 2  # level-0 column pairs averaged
    assert np.abs(tile[0, :, 0].astype(float) - expected).max() <= 1.0


def test_a_scale_within_the_tolerance_is_read_without_resampling(tmp_path: Path) -> None:
    """0.499 → 0.5 µm/px (a 20× Aperio slide): 128.3 level-0 px read as 128, pixels untouched;
    a 3 % difference is still resampled."""
    image = np.random.default_rng(0).integers(0, 256, size=(400, 400, 3), dtype=np.uint8)
    path = write_pyramidal_tiff(tmp_path / "noise.tif", image, mpp=0.499, n_levels=1)
    with open_slide(path) as reader:
        assert RESAMPLE_TOLERANCE == 0.01
        exact = reader.read_tile(10, 20, 128 * 0.5 / 0.499, 128)
        resampled = reader.read_tile(10, 20, 128 * 1.03, 128)
    np.testing.assert_array_equal(exact, image[20:148, 10:138])
    assert resampled.shape == (128, 128, 3) and not np.array_equal(resampled, image[20:148, 10:138])


def test_outside_the_slide_is_white(tmp_path: Path) -> None:
    image = np.full((256, 256, 3), 100, dtype=np.uint8)
    path = write_pyramidal_tiff(tmp_path / "grey.tif", image, mpp=0.5, n_levels=2)
    with open_slide(path) as reader:
        tile = reader.read_tile(192, 192, 128, 128)
    assert np.all(tile[:60, :60] == 100)
    assert np.all(tile[68:, :] == 255) and np.all(tile[:, 68:] == 255)


def test_plain_image_needs_mpp_and_reads_with_it(tmp_path: Path) -> None:
    path = tmp_path / "micro.png"
    Image.fromarray(np.full((300, 400, 3), 80, dtype=np.uint8)).save(path)
    with pytest.raises(MissingMppError, match="--mpp-csv.*--default-mpp"):
        open_slide(path)
    with open_slide(path, default_mpp=0.42) as reader:
        assert (reader.level0_mpp, reader.dimensions, reader.magnification) == (0.42, (400, 300), None)
        tile = reader.read_tile(300, 200, 200, 50)
        thumb, downsample = reader.thumbnail(100)
    assert np.all(tile[:20, :20] == 80) and np.all(tile[30:, 30:] == 255)
    assert thumb.shape == (75, 100, 3) and downsample == pytest.approx(4.0)
    with open_slide(path, mpp_override=1.5, default_mpp=0.42) as reader:
        assert reader.level0_mpp == 1.5


@pytest.mark.shared_data
def test_slide_without_mpp_names_the_options(shared_data: Path) -> None:
    path = shared_data / "slides" / "TCGA-CR-7395-01A-01-TS1.svs"
    with pytest.raises(MissingMppError) as error:
        open_slide(path)
    message = str(error.value)
    assert "TCGA-CR-7395-01A-01-TS1" in message and "--mpp-csv" in message and "--default-mpp" in message
    with open_slide(path, mpp_override=3.0) as reader:
        assert reader.level0_mpp == 3.0 and reader.dimensions == (4443, 3567) and len(reader.level_downsamples) == 2


def test_metadata_wins_over_default_but_not_over_csv(slides_dir: Path) -> None:
    with open_slide(slides_dir / "CMU-1-Small-Region.svs", default_mpp=2.0) as reader:
        assert reader.level0_mpp == pytest.approx(0.499)
    with open_slide(slides_dir / "CMU-1-Small-Region.svs", mpp_override=0.6) as reader:
        assert reader.level0_mpp == 0.6


def test_unopenable_file_is_a_clear_error(slides_dir: Path) -> None:
    with pytest.raises(SlideReadError, match="unopenable.tiff"):
        open_slide(slides_dir / "openslide" / "unopenable.tiff")


def test_unreadable_file_fails_at_read_with_its_name(slides_dir: Path) -> None:
    with open_slide(slides_dir / "openslide" / "unreadable.svs") as reader:
        with pytest.raises(SlideReadError, match="unreadable.svs"):
            reader.thumbnail(256)
        with pytest.raises(SlideReadError, match="unreadable.svs"):
            reader.read_tile(0, 0, 16, 16)


def test_text_file_is_not_a_slide(tmp_path: Path) -> None:
    for name in ("notes.txt", "fake.svs", "fake.jpg"):
        path = tmp_path / name
        path.write_text("not a slide\n")
        with pytest.raises(SlideReadError, match=name):
            open_slide(path, default_mpp=0.5)
    with pytest.raises(SlideReadError, match="no such file"):
        open_slide(tmp_path / "missing.svs")


def test_thumbnail_of_a_real_slide(slides_dir: Path) -> None:
    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as reader:
        thumb, downsample = reader.thumbnail(512)
    assert max(thumb.shape[:2]) == 512 and thumb.shape[2] == 3
    assert downsample == pytest.approx(2220 / thumb.shape[1])
    assert thumb.shape[0] == round(2967 / downsample)


def test_pyramid_with_several_levels_is_read_through_openslide(slides_dir: Path, tmp_path: Path) -> None:
    shutil.copy(slides_dir / "openslide" / "boxes.tiff", tmp_path / "boxes.tiff")
    with open_slide(tmp_path / "boxes.tiff") as reader:
        assert len(reader.level_downsamples) == 4
        assert reader.best_level(4.5) == 2 and reader.best_level(1.99) == 0 and reader.best_level(100) == 3


def test_mpp_overrides_csv(tmp_path: Path) -> None:
    path = tmp_path / "mpp.csv"
    path.write_text("slide,mpp\nTCGA-A.svs,0.25\nplain_image,0.42\n")
    assert load_mpp_overrides(path) == {"TCGA-A": 0.25, "plain_image": 0.42}
    path.write_text("name,resolution\na,1\n")
    with pytest.raises(ValueError, match="slide,mpp"):
        load_mpp_overrides(path)
    path.write_text("slide,mpp\na,-1\n")
    with pytest.raises(ValueError, match="positive"):
        load_mpp_overrides(path)


def test_stored_thumbnail_matches_the_decoded_slide(slides_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from extract.slides.reader import OpenSlideReader

    with open_slide(slides_dir / "CMU-1-Small-Region.svs") as reader:
        assert reader._stored_thumbnail(5.0) is not None and reader._stored_thumbnail(2.0) is None
        quick, quick_downsample = reader.thumbnail(256)
        monkeypatch.setattr(OpenSlideReader, "_stored_thumbnail", lambda self, downsample: None)
        decoded, decoded_downsample = reader.thumbnail(256)
    assert quick.shape == decoded.shape and quick_downsample == decoded_downsample
    assert np.abs(quick.astype(float) - decoded.astype(float)).mean() < 8
