"""DICOM WSI and OME-TIFF slides, made from CMU-1-Small-Region at test time: the same tiles, the
same features and the same µm/px as the SVS (exactly where the copy is lossless, within a JPEG
tolerance where it was re-encoded), their pyramids, how a folder lists them, and the refusals."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from extract.device import autocast
from extract.encoder import TileTrunk, load_resnet18, prepare_batch
from extract.errors import UserError
from extract.features_file import SlideFeatures
from extract.reader import MissingMppError, SlideReader, SlideReadError, open_slide
from extract.slide_list import list_slides
from extract.tiling import tile_grid
from fixtures.make_formats import pyramid, write_dicom, write_generic_pyramid, write_ome_tiff
from gigassl.cli import main

CMU_MPP = 0.499
CMU_SIZE = (2220, 2967)


@dataclasses.dataclass(frozen=True)
class Made:
    """CMU-1-Small-Region and its copies in other formats (all in one temporary folder)."""

    svs: Path
    levels: list[np.ndarray]  # the SVS's level-0 pixels and two halvings, as the pyramids hold them
    dicom_folder: Path  # 3 instances (a pyramid), uncompressed: read by OpenSlide
    dicom_rle: Path  # one instance, RLE (lossless): OpenSlide refuses it, wsidicom reads it
    dicom_jpeg: Path  # one instance, re-encoded as JPEG (quality 95): read by OpenSlide
    ome: Path  # OME-TIFF, level 0 + 2 SubIFD levels, zlib (lossless)
    ome_jpeg: Path  # the same, JPEG (quality 95)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, slides_dir: Path) -> Made:
    folder = tmp_path_factory.mktemp("formats")
    svs = slides_dir / "CMU-1-Small-Region.svs"
    with open_slide(svs) as reader:
        pixels = reader.read_tile(0, 0, max(CMU_SIZE), max(CMU_SIZE))[: CMU_SIZE[1], : CMU_SIZE[0]]
    levels = pyramid(np.ascontiguousarray(pixels), 3)
    generic = write_generic_pyramid(folder / "pyramid.tif", levels, CMU_MPP)
    made = Made(
        svs=svs,
        levels=levels,
        dicom_folder=folder / "cmu_dicom",
        dicom_rle=folder / "cmu_rle.dcm",
        dicom_jpeg=folder / "cmu_jpeg.dcm",
        ome=write_ome_tiff(folder / "cmu.ome.tif", levels, (CMU_MPP, "µm"), compression="zlib"),
        ome_jpeg=write_ome_tiff(folder / "cmu_jpeg.ome.tif", levels, (CMU_MPP * 1000, "nm"), compression="jpeg"),
    )
    assert len(write_dicom(generic, made.dicom_folder, "raw")) == 3
    write_dicom(svs, made.dicom_rle, "rle")
    write_dicom(svs, made.dicom_jpeg, "jpeg")
    generic.unlink()
    return made


def _tiles(reader: SlideReader, coords: np.ndarray, size_level0: float, out_px: int) -> np.ndarray:
    return np.stack([reader.read_tile(x, y, size_level0, out_px) for x, y in coords])


@pytest.fixture(scope="module")
def svs_tiles(made: Made) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of 12 tiles of the SVS's tissue grid at 0.5 µm/px (128 px), the last ones at
    the slide's edge (partly outside: white), and the SVS's tiles there."""
    with open_slide(made.svs) as reader:
        grid = tile_grid(reader, 0.5, 128, 0.5)
        coords = np.concatenate([grid.coords[:: max(1, len(grid.coords) // 10)][:10], [[2150, 2900], [-40, 100]]])
        return coords, _tiles(reader, coords, grid.size_level0, 128)


LOSSLESS = [
    ("dicom_folder", "OpenSlideReader", (1.0, 2.0, 4.0)),
    ("dicom_rle", "WsiDicomReader", (1.0,)),
    ("ome", "OmeTiffReader", (1.0, 2.0, 4.0)),
]


@pytest.mark.parametrize("name, reader_type, downsamples", LOSSLESS)
def test_lossless_copies_read_the_svs_pixels(made: Made, svs_tiles, name: str, reader_type: str, downsamples) -> None:
    coords, expected = svs_tiles
    with open_slide(getattr(made, name)) as reader:
        assert type(reader).__name__ == reader_type
        assert (reader.level0_mpp, reader.dimensions) == (pytest.approx(CMU_MPP), CMU_SIZE)
        assert reader.mpp_source in ("the DICOM pixel spacing", "the OME-XML PhysicalSizeX")
        assert reader.level_downsamples == pytest.approx(downsamples, rel=1e-3)
        tiles = _tiles(reader, coords, 128 * 0.5 / CMU_MPP, 128)
    np.testing.assert_array_equal(tiles, expected)
    assert np.all(tiles[-1][:, :20] == 255) and np.all(tiles[-2][:, 70:] == 255)  # outside the slide: white


@pytest.mark.parametrize("name", ["dicom_folder", "ome"])
def test_pyramid_levels_are_read_as_written(made: Made, name: str) -> None:
    with open_slide(getattr(made, name)) as reader:
        assert reader.best_level(2.0) == 1 and reader.best_level(4.1) == 2 and reader.best_level(1.9) == 0
        for level in (1, 2):
            tile = reader.read_tile(0, 0, 96 * reader.level_downsamples[level], 96)
            np.testing.assert_array_equal(tile, made.levels[level][:96, :96])
        thumbnail, downsample = reader.thumbnail(200)
    assert thumbnail.shape == (200, round(CMU_SIZE[0] / downsample), 3)


@pytest.mark.parametrize("name, reader_type", [("dicom_jpeg", "OpenSlideReader"), ("ome_jpeg", "OmeTiffReader")])
def test_jpeg_copies_are_within_the_jpeg_error(made: Made, svs_tiles, name: str, reader_type: str) -> None:
    """Re-encoded as JPEG at quality 95 with chroma subsampling: a mean absolute error of 4.2 (DICOM)
    and 5.0 (OME-TIFF) grey levels of 255 was measured on these tiles; the bound is 8."""
    coords, expected = svs_tiles
    with open_slide(getattr(made, name)) as reader:
        assert type(reader).__name__ == reader_type and reader.level0_mpp == pytest.approx(CMU_MPP)
        tiles = _tiles(reader, coords, 128 * 0.5 / CMU_MPP, 128)
    error = np.abs(tiles.astype(float) - expected)
    assert 0 < error.mean() < 8 and np.percentile(error, 99) < 40


def test_features_equal_those_of_the_svs(made: Made, svs_tiles) -> None:
    """A random ResNet18 on the same tiles: equal features for the lossless copies (to float noise),
    cosine > 0.99 for the JPEG ones."""
    coords, svs = svs_tiles
    model, _ = load_resnet18("random", seed=0)
    trunk = TileTrunk(model).eval()

    def features(tiles: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), autocast(torch.device("cpu")):
            return trunk(prepare_batch(torch.from_numpy(tiles), torch.device("cpu"))).float().numpy()

    expected = features(svs)
    for name in ("dicom_folder", "dicom_rle", "ome", "dicom_jpeg", "ome_jpeg"):
        with open_slide(getattr(made, name)) as reader:
            got = features(_tiles(reader, coords, 128 * 0.5 / CMU_MPP, 128))
        if "jpeg" in name:
            cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
            assert cosine.min() > 0.99, name
        else:
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=name)


def test_extract_reads_a_folder_of_formats(made: Made, tmp_path: Path) -> None:
    """`gigassl extract` over the SVS, a DICOM folder, a .dcm file and an OME-TIFF: four slides
    (the DICOM folder one slide; other sub-folders ignored), the copy read at level 0 gives the SVS's
    features wherever both grids have a tile."""
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(made.svs, slides)
    shutil.copytree(made.dicom_folder, slides / "cmu_dicom")
    shutil.copy(made.dicom_rle, slides)
    shutil.copy(made.ome, slides)
    (slides / "data_folder").mkdir()  # e.g. a MIRAX data folder: not a slide
    (slides / "data_folder" / "Data0000.dat").write_bytes(b"\0" * 200)
    fast = ["--encoder", "random", "--tile-size", "64", "--mpp", "2.0", "--no-bank", "--num-workers", "0"]
    assert main(["extract", "--slides", str(slides), "--out", str(tmp_path / "out"), *fast]) == 0
    features = tmp_path / "out" / "features"
    assert sorted(p.name for p in features.glob("*.h5")) == ["CMU-1-Small-Region.h5", "cmu.ome.h5", "cmu_dicom.h5", "cmu_rle.h5"]
    found = {}
    for path in features.glob("*.h5"):
        with SlideFeatures(path, require_plain=True) as slide:
            assert slide.grid_attrs["mpp"] == pytest.approx(CMU_MPP), path.name
            found[path.stem] = dict(zip(map(tuple, slide.coords()), slide.features()))
    svs, rle = found["CMU-1-Small-Region"], found["cmu_rle"]
    common = sorted(set(svs) & set(rle))
    assert len(common) >= 0.9 * len(svs)
    np.testing.assert_allclose([rle[c] for c in common], [svs[c] for c in common], rtol=0, atol=1e-5)


def test_a_folder_lists_its_dicom_sub_folders_as_slides(made: Made, tmp_path: Path) -> None:
    (tmp_path / "case_a").mkdir()
    for index, path in enumerate(sorted(made.dicom_folder.iterdir())):
        shutil.copy(path, tmp_path / "case_a" / f"{index:04d}")  # DICOM files without an extension
    (tmp_path / "case_b").mkdir()
    shutil.copy(made.dicom_rle, tmp_path / "case_b" / "slide.dcm")
    for name in ("mirax_data", ".hidden"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "Index.dat").write_bytes(b"\0" * 200)
    (tmp_path / ".hidden" / "x.dcm").write_bytes(b"\0" * 200)
    shutil.copy(made.dicom_rle, tmp_path / "single.dcm")
    (tmp_path / "notes.txt").write_text("a note\n")
    slides, others = list_slides(tmp_path)
    assert [p.name for p in slides] == ["case_a", "case_b", "single.dcm"] and [p.name for p in others] == ["notes.txt"]
    with open_slide(tmp_path / "case_a") as reader:
        assert reader.slide_id == "case_a" and len(reader.level_downsamples) == 3


def _one_line_error(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, UserError) and isinstance(error.value, SlideReadError)
    return message


def _non_wsi_dicom(path: Path) -> Path:
    """A valid DICOM file that is not a slide (a small secondary-capture image)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    data = Dataset()
    data.file_meta = meta
    data.SOPClassUID, data.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    data.StudyInstanceUID, data.SeriesInstanceUID, data.Modality = generate_uid(), generate_uid(), "OT"
    data.Rows, data.Columns, data.SamplesPerPixel, data.PhotometricInterpretation = 8, 8, 1, "MONOCHROME2"
    data.BitsAllocated, data.BitsStored, data.HighBit, data.PixelRepresentation = 8, 8, 7, 0
    data.PixelData = bytes(64)
    data.save_as(path, enforce_file_format=True)
    return path


def test_a_dicom_no_reader_accepts_is_one_line_saying_what_was_tried(made: Made, tmp_path: Path) -> None:
    text = tmp_path / "notes.dcm"
    text.write_text("not a slide\n")
    (tmp_path / "series").mkdir()
    for path in (text, _non_wsi_dicom(tmp_path / "photo.dcm"), _non_wsi_dicom(tmp_path / "series" / "0001")):
        with pytest.raises(SlideReadError) as error:
            open_slide(path.parent if path.parent.name == "series" else path, default_mpp=0.5)
        message = _one_line_error(error)
        assert path.name in message or "series" in message
        assert "OpenSlide:" in message and "wsidicom:" in message
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(SlideReadError, match="no DICOM file"):
        open_slide(tmp_path / "empty_folder")
    truncated = tmp_path / "truncated.dcm"  # its header is whole: it opens, and fails when read
    truncated.write_bytes(made.dicom_rle.read_bytes()[:200_000])
    with open_slide(truncated) as reader, pytest.raises(SlideReadError, match="truncated.dcm"):
        reader.read_tile(1000, 1000, 256, 256)


def test_without_wsidicom_the_error_names_the_extra(made: Made, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wsidicom", None)  # import wsidicom → ImportError
    with pytest.raises(SlideReadError) as error:
        open_slide(made.dicom_rle)
    message = _one_line_error(error)
    assert "gigassl[dicom]" in message and "Unsupported transfer syntax" in message
    with open_slide(made.dicom_folder) as reader:  # what OpenSlide reads needs no extra
        assert reader.level0_mpp == pytest.approx(CMU_MPP)


@pytest.mark.parametrize("name", ["dicom_folder", "dicom_rle", "ome"])
def test_mpp_rules_hold(made: Made, name: str) -> None:
    with open_slide(getattr(made, name), mpp_override=0.6) as reader:
        assert (reader.level0_mpp, reader.mpp_source) == (0.6, "--mpp-csv")
    with open_slide(getattr(made, name), default_mpp=2.0) as reader:
        assert reader.level0_mpp == pytest.approx(CMU_MPP)


def test_ome_tiff_without_physical_size_needs_the_mpp(made: Made, tmp_path: Path) -> None:
    path = write_ome_tiff(tmp_path / "no_size.ome.tif", [made.levels[0][:300, :300], made.levels[1][:150, :150]], None)
    with pytest.raises(MissingMppError) as error:
        open_slide(path)
    message = str(error.value)
    assert "no_size.ome" in message and "--mpp-csv" in message and "--default-mpp" in message
    with open_slide(path, default_mpp=0.42) as reader:
        assert (reader.level0_mpp, reader.mpp_source, reader.dimensions) == (0.42, "--default-mpp", (300, 300))
        np.testing.assert_array_equal(reader.read_tile(0, 0, 100, 100), made.levels[0][:100, :100])
    with open_slide(made.ome_jpeg) as reader:  # PhysicalSizeX 499 nm
        assert reader.level0_mpp == pytest.approx(CMU_MPP)


def test_a_fluorescence_ome_tiff_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "fluo.ome.tif"
    tifffile.imwrite(path, np.zeros((4, 64, 64), dtype=np.uint16), ome=True, metadata={"axes": "CYX", "PhysicalSizeX": 0.5})
    with pytest.raises(SlideReadError, match="brightfield") as error:
        open_slide(path)
    assert "\n" not in str(error.value) and "fluo.ome.tif" in str(error.value)
