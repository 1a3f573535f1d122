"""extract.encoders.exported: torch.export-ed tile encoders, their sidecar, and the archive safety check."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from extract.encoders.exported import export_tile_encoder, sidecar_path
from extract.encoders.kinds import load_encoder
from extract.encoders.tile_encoder import file_sha256

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


class TinyEncoder(nn.Module):
    """Normalised (B, 3, S, S) → (B, 12): a stand-in for a foundation model."""

    def __init__(self, flat: bool = True) -> None:
        super().__init__()
        self.flat = flat
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.relu(self.norm(self.conv(x)))
        return self.head(maps.mean(dim=(2, 3))) if self.flat else maps


def tiny_model(seed: int = 0, flat: bool = True) -> TinyEncoder:
    torch.manual_seed(seed)
    model = TinyEncoder(flat)
    with torch.no_grad():
        model.norm.running_mean.normal_(0, 0.1)
        model.norm.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture()
def exported(tmp_path: Path) -> tuple[TinyEncoder, Path]:
    model = tiny_model()
    return model, export_tile_encoder(model, tmp_path / "tiny.pt2", 32, MEAN, STD, name="tiny-fm")


def test_program_runs_like_the_model_and_says_what_it_is(exported: tuple[TinyEncoder, Path]) -> None:
    model, path = exported
    assert json.loads(sidecar_path(path).read_text()) == {
        "input_size_px": 32,
        "mean": list(MEAN),
        "std": list(STD),
        "name": "tiny-fm",
    }
    loaded = load_encoder(path)
    info = loaded.info
    assert (info.name, info.source, info.arch, info.width, info.layout) == ("tiny.pt2", "export", "tiny-fm", 12, "torch.export")
    assert info.sha256 == file_sha256(path) and (info.input_size_px, info.mean, info.std) == (32, MEAN, STD)
    assert loaded.feature_dim == 12 and loaded.resnet is None and loaded.layer4_width is None
    assert (loaded.trunk.mean, loaded.trunk.std, loaded.trunk.input_size_px) == (MEAN, STD, 32)
    with pytest.raises(ValueError, match="exported program: it has no ResNet layer4"):
        _ = loaded.layer4
    trunk = loaded.trunk.eval()  # .eval() reaches the wrapper only: the program keeps its exported mode
    for batch in (1, 5):
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(trunk(images), model(images), rtol=0, atol=1e-6)
    # Tiles of another size are resized (antialiased) to the program's input.
    big = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        resized = F.interpolate(big, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        torch.testing.assert_close(trunk(big), model(resized), rtol=0, atol=1e-6)


def test_preprocessing_from_flags_and_from_the_program(exported: tuple[TinyEncoder, Path]) -> None:
    _, path = exported
    sidecar_path(path).unlink()
    with pytest.raises(
        ValueError, match=r"tiny.pt2: no normalisation given; write .*tiny.json with mean and std, or pass --encoder-mean"
    ):
        load_encoder(path)
    loaded = load_encoder(path, mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0))
    assert loaded.info.input_size_px == 32 and loaded.info.arch == "tiny"  # the static input size of the program
    sidecar_path(path).write_text(json.dumps({"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}))
    assert load_encoder(path, input_size_px=32, std=(0.1, 0.1, 0.1)).info.std == (0.1, 0.1, 0.1)  # a flag wins
    sidecar_path(path).write_text(json.dumps({"mean": [0.5, 0.5], "std": [0.5, 0.5, 0.5]}))
    with pytest.raises(ValueError, match=r"tiny.pt2: mean \[0.5, 0.5\]: give three finite numbers"):
        load_encoder(path)
    sidecar_path(path).write_text(json.dumps({"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize": 3}))
    with pytest.raises(ValueError, match=r"tiny.json: unknown keys \['resize'\]"):
        load_encoder(path)


def test_programs_that_cannot_serve_as_tile_encoders_are_refused(tmp_path: Path) -> None:
    static = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(tiny_model(), (torch.randn(2, 3, 32, 32),)), str(static))
    with pytest.raises(ValueError, match=r"static.pt2: the program fails on a \(1, 3, 32, 32\) batch .*dynamic batch dimension"):
        load_encoder(static, mean=MEAN, std=STD)
    maps = export_tile_encoder(tiny_model(flat=False), tmp_path / "maps.pt2", 32, MEAN, STD)
    with pytest.raises(
        ValueError, match=r"maps.pt2: the program maps \(2, 3, 32, 32\) to \(2, 8, 16, 16\); it must return \(B, D\)"
    ):
        load_encoder(maps)
    with pytest.raises(FileNotFoundError, match="missing.pt2 does not exist"):
        load_encoder(tmp_path / "missing.pt2")


def test_archives_that_would_be_unpickled_are_refused(exported: tuple[TinyEncoder, Path], tmp_path: Path) -> None:
    _, path = exported
    tampered = tmp_path / "tampered.pt2"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(tampered, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("_weights_config.json"):
                config = json.loads(data)
                next(iter(config["config"].values()))["use_pickle"] = True
                data = json.dumps(config).encode()
            target.writestr(item, data)
    sidecar_path(path).rename(sidecar_path(tampered))
    with pytest.raises(ValueError, match=r"tampered.pt2: refused because its tensor 'conv.weight' is stored pickled"):
        load_encoder(tampered)
    not_a_zip = tmp_path / "text.pt2"
    not_a_zip.write_text("hello")
    with pytest.raises(ValueError, match="text.pt2: not a torch.export archive"):
        load_encoder(not_a_zip, mean=MEAN, std=STD)
