"""DICOM WSI and OME-TIFF slides, made from CMU-1-Small-Region at test time: the same tiles, the
same features and the same µm/px as the SVS (exactly where the copy is lossless, within a JPEG
tolerance where it was re-encoded), their pyramids, how a folder lists them, and the refusals."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from extract.batch.slide_list import list_slides
from extract.device import autocast
from extract.encoders.tile_encoder import TileTrunk, load_resnet18, prepare_batch
from extract.errors import UserError
from extract.features.slide_file import SlideFeatures
from extract.slides.formats import open_slide
from extract.slides.reader import MissingMppError, SlideReader, SlideReadError
from extract.slides.tiling import tile_grid
from fixtures.make_formats import pyramid, write_dicom, write_generic_pyramid, write_ome_tiff
from gigassl.cli import main

CMU_MPP = 0.499
CMU_SIZE = (2220, 2967)


DICOM = pytest.mark.wsidicomizer  # writes its DICOM with wsidicomizer (Python ≥ 3.11)


@dataclasses.dataclass(frozen=True)
class Cmu:
    """CMU-1-Small-Region: its level-0 pixels and two halvings (as the pyramids below hold them),
    and 12 tiles of its tissue grid at 0.5 µm/px (128 px), the last two at the slide's edge."""

    svs: Path
    levels: list[np.ndarray]
    coords: np.ndarray
    tiles: np.ndarray


@pytest.fixture(scope="module")
def cmu(slides_dir: Path) -> Cmu:
    svs = slides_dir / "CMU-1-Small-Region.svs"
    with open_slide(svs) as reader:
        pixels = reader.read_tile(0, 0, max(CMU_SIZE), max(CMU_SIZE))[: CMU_SIZE[1], : CMU_SIZE[0]]
        grid = tile_grid(reader, 0.5, 128, 0.5)
        coords = np.concatenate([grid.coords[:: max(1, len(grid.coords) // 10)][:10], [[2150, 2900], [-40, 100]]])
        tiles = _tiles(reader, coords, grid.size_level0, 128)
    return Cmu(svs, pyramid(np.ascontiguousarray(pixels), 3), coords, tiles)


@pytest.fixture(scope="module")
def ome_files(tmp_path_factory: pytest.TempPathFactory, cmu: Cmu) -> dict[str, Path]:
    """OME-TIFFs of level 0 + 2 SubIFD levels: ``ome`` zlib (lossless), ``ome_jpeg`` JPEG (quality
    95, PhysicalSizeX in nm)."""
    folder = tmp_path_factory.mktemp("ome")
    return {
        "ome": write_ome_tiff(folder / "cmu.ome.tif", cmu.levels, (CMU_MPP, "µm"), compression="zlib"),
        "ome_jpeg": write_ome_tiff(folder / "cmu_jpeg.ome.tif", cmu.levels, (CMU_MPP * 1000, "nm"), compression="jpeg"),
    }


@pytest.fixture(scope="module")
def dicom_files(tmp_path_factory: pytest.TempPathFactory, cmu: Cmu) -> dict[str, Path]:
    """``dicom_folder``: 3 instances (a pyramid), uncompressed, read by OpenSlide; ``dicom_rle``: one
    RLE instance (lossless), which OpenSlide refuses and wsidicom reads; ``dicom_jpeg``: one instance
    re-encoded as JPEG (quality 95), read by OpenSlide."""
    folder = tmp_path_factory.mktemp("dicom")
    generic = write_generic_pyramid(folder / "pyramid.tif", cmu.levels, CMU_MPP)
    files = {"dicom_folder": folder / "cmu_dicom", "dicom_rle": folder / "cmu_rle.dcm", "dicom_jpeg": folder / "cmu_jpeg.dcm"}
    assert len(write_dicom(generic, files["dicom_folder"], "raw")) == 3
    write_dicom(cmu.svs, files["dicom_rle"], "rle")
    write_dicom(cmu.svs, files["dicom_jpeg"], "jpeg")
    generic.unlink()
    return files


def _made(request: pytest.FixtureRequest, name: str) -> Path:
    return request.getfixturevalue("dicom_files" if name.startswith("dicom") else "ome_files")[name]


def _tiles(reader: SlideReader, coords: np.ndarray, size_level0: float, out_px: int) -> np.ndarray:
    return np.stack([reader.read_tile(x, y, size_level0, out_px) for x, y in coords])


def _cmu_tiles(reader: SlideReader, cmu: Cmu) -> np.ndarray:
    return _tiles(reader, cmu.coords, 128 * 0.5 / CMU_MPP, 128)


LOSSLESS = [
    pytest.param("dicom_folder", "OpenSlideReader", (1.0, 2.0, 4.0), marks=DICOM),
    pytest.param("dicom_rle", "WsiDicomReader", (1.0,), marks=DICOM),
    ("ome", "OmeTiffReader", (1.0, 2.0, 4.0)),
]
PYRAMIDS = [pytest.param("dicom_folder", marks=DICOM), "ome"]
JPEG = [pytest.param("dicom_jpeg", "OpenSlideReader", marks=DICOM), ("ome_jpeg", "OmeTiffReader")]
ALL = [*PYRAMIDS, pytest.param("dicom_rle", marks=DICOM), pytest.param("dicom_jpeg", marks=DICOM), "ome_jpeg"]


@pytest.mark.parametrize("name, reader_type, downsamples", LOSSLESS)
def test_lossless_copies_read_the_svs_pixels(request, cmu: Cmu, name: str, reader_type: str, downsamples) -> None:
    with open_slide(_made(request, name)) as reader:
        assert type(reader).__name__ == reader_type
        assert (reader.level0_mpp, reader.dimensions) == (pytest.approx(CMU_MPP), CMU_SIZE)
        assert reader.mpp_source in ("the DICOM pixel spacing", "the OME-XML PhysicalSizeX")
        assert reader.level_downsamples == pytest.approx(downsamples, rel=1e-3)
        tiles = _cmu_tiles(reader, cmu)
    np.testing.assert_array_equal(tiles, cmu.tiles)
    assert np.all(tiles[-1][:, :20] == 255) and np.all(tiles[-2][:, 70:] == 255)  # outside the slide: white


@pytest.mark.parametrize("name", PYRAMIDS)
def test_pyramid_levels_are_read_as_written(request, cmu: Cmu, name: str) -> None:
    with open_slide(_made(request, name)) as reader:
        assert reader.best_level(2.0) == 1 and reader.best_level(4.1) == 2 and reader.best_level(1.9) == 0
        for level in (1, 2):
            tile = reader.read_tile(0, 0, 96 * reader.level_downsamples[level], 96)
            np.testing.assert_array_equal(tile, cmu.levels[level][:96, :96])
        thumbnail, downsample = reader.thumbnail(200)
    assert thumbnail.shape == (200, round(CMU_SIZE[0] / downsample), 3)


@pytest.mark.parametrize("name, reader_type", JPEG)
def test_jpeg_copies_are_within_the_jpeg_error(request, cmu: Cmu, name: str, reader_type: str) -> None:
    """Re-encoded as JPEG at quality 95 with chroma subsampling: a mean absolute error of 4.2 (DICOM)
    and 5.0 (OME-TIFF) grey levels of 255 was measured on these tiles; the bound is 8."""
    with open_slide(_made(request, name)) as reader:
        assert type(reader).__name__ == reader_type and reader.level0_mpp == pytest.approx(CMU_MPP)
        tiles = _cmu_tiles(reader, cmu)
    error = np.abs(tiles.astype(float) - cmu.tiles)
    assert 0 < error.mean() < 8 and np.percentile(error, 99) < 40


@pytest.fixture(scope="module")
def features_of():
    """A random ResNet18 (seed 0) as a function of (N, H, W, 3) uint8 tiles → (N, 256) features."""
    model, _ = load_resnet18("random", seed=0)
    trunk = TileTrunk(model).eval()

    def features(tiles: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), autocast(torch.device("cpu")):
            return trunk(prepare_batch(torch.from_numpy(tiles), torch.device("cpu"))).float().numpy()

    return features


@pytest.fixture(scope="module")
def svs_features(cmu: Cmu, features_of) -> np.ndarray:
    return features_of(cmu.tiles)


@pytest.mark.parametrize("name", ALL)
def test_features_equal_those_of_the_svs(request, cmu: Cmu, features_of, svs_features: np.ndarray, name: str) -> None:
    """The same random ResNet18 on the same tiles: the SVS's features for the lossless copies (to
    float noise, 1e-5), a cosine similarity above 0.99 for the JPEG ones."""
    with open_slide(_made(request, name)) as reader:
        got = features_of(_cmu_tiles(reader, cmu))
    if "jpeg" in name:
        cosine = (got * svs_features).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(svs_features, axis=1)
        assert cosine.min() > 0.99
    else:
        np.testing.assert_allclose(got, svs_features, rtol=0, atol=1e-5)


@DICOM
def test_extract_reads_a_folder_of_formats(cmu: Cmu, ome_files, dicom_files, tmp_path: Path) -> None:
    """`gigassl extract` over the SVS, a DICOM folder, a .dcm file and an OME-TIFF: four slides
    (the DICOM folder one slide; other sub-folders ignored); the one-level copy gives the SVS's
    features wherever both grids have a tile."""
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(cmu.svs, slides)
    shutil.copytree(dicom_files["dicom_folder"], slides / "cmu_dicom")
    shutil.copy(dicom_files["dicom_rle"], slides)
    shutil.copy(ome_files["ome"], slides)
    (slides / "data_folder").mkdir()  # e.g. a MIRAX data folder: not a slide
    (slides / "data_folder" / "Data0000.dat").write_bytes(b"\0" * 200)
    fast = ["--encoder", "random", "--tile-size-px", "64", "--target-mpp", "2.0", "--no-bank", "--num-workers", "0"]
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


@DICOM
def test_a_folder_lists_its_dicom_sub_folders_as_slides(dicom_files, tmp_path: Path) -> None:
    (tmp_path / "case_a").mkdir()
    for index, path in enumerate(sorted(dicom_files["dicom_folder"].iterdir())):
        shutil.copy(path, tmp_path / "case_a" / f"{index:04d}")  # DICOM files without an extension
    (tmp_path / "case_b").mkdir()
    shutil.copy(dicom_files["dicom_rle"], tmp_path / "case_b" / "slide.dcm")
    for name in ("mirax_data", ".hidden"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "Index.dat").write_bytes(b"\0" * 200)
    (tmp_path / ".hidden" / "x.dcm").write_bytes(b"\0" * 200)
    shutil.copy(dicom_files["dicom_rle"], tmp_path / "single.dcm")
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


@DICOM
def test_a_dicom_no_reader_accepts_is_one_line_saying_what_was_tried(dicom_files, tmp_path: Path) -> None:
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
    truncated.write_bytes(dicom_files["dicom_rle"].read_bytes()[:200_000])
    with open_slide(truncated) as reader, pytest.raises(SlideReadError, match="truncated.dcm"):
        reader.read_tile(1000, 1000, 256, 256)


@DICOM
def test_without_wsidicom_the_error_names_the_extra(dicom_files, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wsidicom", None)  # import wsidicom → ImportError
    with pytest.raises(SlideReadError) as error:
        open_slide(dicom_files["dicom_rle"])
    message = _one_line_error(error)
    assert "gigassl[dicom]" in message and "Unsupported transfer syntax" in message
    with open_slide(dicom_files["dicom_folder"]) as reader:  # what OpenSlide reads needs no extra
        assert reader.level0_mpp == pytest.approx(CMU_MPP)


@pytest.mark.parametrize("name", [*PYRAMIDS, pytest.param("dicom_rle", marks=DICOM)])
def test_mpp_rules_hold(request, name: str) -> None:
    """--mpp-csv wins over the metadata, which wins over --default-mpp."""
    with open_slide(_made(request, name), mpp_override=0.6) as reader:
        assert (reader.level0_mpp, reader.mpp_source) == (0.6, "--mpp-csv")
    with open_slide(_made(request, name), default_mpp=2.0) as reader:
        assert reader.level0_mpp == pytest.approx(CMU_MPP)


def test_ome_tiff_without_physical_size_needs_the_mpp(cmu: Cmu, ome_files, tmp_path: Path) -> None:
    path = write_ome_tiff(tmp_path / "no_size.ome.tif", [cmu.levels[0][:300, :300], cmu.levels[1][:150, :150]], None)
    with pytest.raises(MissingMppError) as error:
        open_slide(path)
    message = str(error.value)
    assert "no_size.ome" in message and "--mpp-csv" in message and "--default-mpp" in message
    with open_slide(path, default_mpp=0.42) as reader:
        assert (reader.level0_mpp, reader.mpp_source, reader.dimensions) == (0.42, "--default-mpp", (300, 300))
        np.testing.assert_array_equal(reader.read_tile(0, 0, 100, 100), cmu.levels[0][:100, :100])
    with open_slide(ome_files["ome_jpeg"]) as reader:  # PhysicalSizeX 499 nm
        assert reader.level0_mpp == pytest.approx(CMU_MPP)


def test_a_fluorescence_ome_tiff_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "fluo.ome.tif"
    tifffile.imwrite(path, np.zeros((4, 64, 64), dtype=np.uint16), ome=True, metadata={"axes": "CYX", "PhysicalSizeX": 0.5})
    with pytest.raises(SlideReadError, match="brightfield") as error:
        open_slide(path)
    assert "\n" not in str(error.value) and "fluo.ome.tif" in str(error.value)


def test_a_jpeg_ome_tiff_without_imagecodecs_names_the_extra(cmu: Cmu, tmp_path: Path) -> None:
    """Checked at open (its first tile is decoded), in a process where imagecodecs cannot import."""
    path = write_ome_tiff(tmp_path / "small.ome.tif", [cmu.levels[0][:256, :256]], (CMU_MPP, "µm"), compression="jpeg")
    code = "import sys; sys.modules['imagecodecs'] = None\nfrom extract.slides.formats import open_slide\nopen_slide(sys.argv[1])"
    source = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("extract.slides.ome.MissingCodecError:") and "small.ome.tif" in last and "gigassl[ome]" in last
