"""`gigassl extract` with every kind of tile encoder: plain features and the bank of width D,
and the encoder's provenance in the files."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from extract.encoders.exported import export_tile_encoder
from extract.encoders.kinds import load_encoder
from extract.encoders.tile_encoder import file_sha256, prepare_batch, save_encoder_checkpoint
from extract.features.bank_chunks import BankChunkReader, locate_bank_chunks
from extract.features.slide_file import SlideFeatures
from extract.slides.formats import open_slide
from extract.slides.tiling import tile_grid
from fixtures.make_slides import write_tissue_slide
from gigassl.cli import main
from test_exported import MEAN, STD, tiny_model

FAST = [
    "--tile-size-px",
    "64",
    "--target-mpp",
    "2.0",
    "--num-workers",
    "0",
    "--batch-size",
    "32",
    "--bank",
    "--n-augmentations",
    "2",
    "--n-tiles-per-augmentation",
    "8",
]


@pytest.fixture()
def one_slide(tmp_path: Path) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir()
    write_tissue_slide(folder / "synthetic_a.tif", mpp=0.5, seed=1)
    return folder


def _extract(slides: Path, out: Path, encoder: Path | str, *extra: str) -> Path:
    assert main(["extract", "--slides", str(slides), "--out", str(out), "--encoder", str(encoder), *FAST, *extra]) == 0
    return out / "features" / "synthetic_a.h5"


def _check_file(path: Path, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain (N, D) and bank (2, 8, D) features present, finite, and the chunk reader agrees with h5py."""
    with SlideFeatures(path, require_plain=True, require_bank=True) as slide:
        features, coords = slide.features(), slide.coords()
        assert features.shape == (len(coords), width) and np.isfinite(features).all()
        bank, _ = slide.augmentation(1)
        assert bank.shape == (8, width) and np.isfinite(bank).all()
        chunks = locate_bank_chunks(slide)
        assert chunks is not None and chunks.n_features == width
        direct, _ = BankChunkReader().read(chunks, 1, np.array([0, 5]))
        np.testing.assert_array_equal(direct, bank[[0, 5]])
    return features, coords


def test_exported_program_through_extract(one_slide: Path, tmp_path: Path) -> None:
    model = tiny_model()
    program = export_tile_encoder(model, tmp_path / "fm.pt2", 32, MEAN, STD, name="tiny-fm")
    path = _extract(one_slide, tmp_path / "out", program, "--no-mixed-precision")
    features, coords = _check_file(path, 12)
    with h5py.File(path) as handle:
        for name in ("features", "aug_features"):
            attrs = handle[name].attrs
            assert (attrs["encoder"], attrs["encoder_arch"], attrs["encoder_layout"]) == ("fm.pt2", "tiny-fm", "torch.export")
            assert attrs["encoder_width"] == 12 and attrs["encoder_sha256"] == file_sha256(program)
            assert attrs["encoder_input_size_px"] == 32 and np.allclose(json.loads(attrs["encoder_mean"]), MEAN)
    # The stored features are the program's output on the 64 px tiles resized to its 32 px input.
    with open_slide(one_slide / "synthetic_a.tif") as reader:
        grid = tile_grid(reader, 2.0, 64, 0.5)
        tiles = torch.stack([torch.from_numpy(reader.read_tile(x, y, grid.size_level0, 64)) for x, y in coords[:16]])
    images = prepare_batch(tiles, torch.device("cpu"), MEAN, STD)
    with torch.no_grad():
        resized = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        expected = model(resized).numpy()
    np.testing.assert_allclose(features[:16], expected, rtol=0, atol=1e-5)


def test_resnet50_checkpoint_through_extract(one_slide: Path, tmp_path: Path) -> None:
    resnet = load_encoder("random:resnet50", seed=4).resnet
    checkpoint = tmp_path / "r50.pt"
    save_encoder_checkpoint(resnet, checkpoint)
    path = _extract(one_slide, tmp_path / "out", checkpoint)
    _check_file(path, 1024)
    with SlideFeatures(path) as slide:
        attrs = slide.encoder_attrs
    assert attrs["encoder_arch"] == "resnet50" and attrs["encoder_width"] == 1024 and attrs["encoder_layout"] == "gigassl"
    assert attrs["encoder_sha256"] == file_sha256(checkpoint) and attrs["encoder"] == "r50.pt"
    assert attrs["encoder_source"] == "gigassl" and attrs["encoder_input_size_px"] == 0
