"""Issue 30: no wrong number leaves with exit 0 — checkpoints, features and embeddings are
checked (content hash, checksums, finite values) when written and when loaded."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from extract.checkpoints.sealed import content_hash
from extract.encoders.exported import export_tile_encoder
from extract.partial_files import temporary_path
from fixtures.make_slides import write_tissue_slide
from gigassl.cli import main
from gigassl.synthetic.cohort import write_synthetic_cohort
from gigassl.training import loop as train_loop
from gigassl.training.checkpoint import load_checkpoint
from test_exported import MEAN, STD, tiny_model
from test_features_file import flip_bytes

TRAIN = ["--n-tiles-per-view", "3", "--warmup-epochs", "1", "--monitor-slides", "4", "--batch-size", "3"]
TRAIN += ["--checkpoint-every", "1", "--num-workers", "0"]


def train(features: Path, out: Path, *extra: str) -> int:
    return main(["train", "--features", str(features), "--out", str(out), *TRAIN, *extra])


def embed(features: Path, model: Path, out: Path) -> int:
    return main(["embed", "--features", str(features), "--model", str(model), "--out", str(out), "--n-views", "4"])


def errors(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(features folder, a one-epoch run folder) on 6 synthetic slides."""
    folder = tmp_path_factory.mktemp("integrity")
    features = folder / "features"
    write_synthetic_cohort(features, n_slides=6, n_tiles=24, n_augmentations=3, bank_size=10, seed=2)
    assert train(features, folder / "run", "--epochs", "1") == 0
    return features, folder / "run"


def _copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _flip_tensor_bytes(path: Path, tensor: torch.Tensor) -> None:
    """Change one byte in the middle of ``tensor``'s stored bytes in the checkpoint file ``path``
    (bit rot, a bad copy); its values are found by content."""
    data = bytearray(path.read_bytes())
    raw = tensor.detach().contiguous().numpy().tobytes()
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0, "the tensor's bytes must appear once"
    data[at + len(raw) // 2 + 1] ^= 0x40
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- 1: checkpoints


def test_a_checkpoint_with_a_nan_weight_is_refused_naming_the_tensor(trained, tmp_path, caplog):
    features, run = trained
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    key = "layer4.block0.conv1.weight" if "layer4.block0.conv1.weight" in payload["model"] else sorted(payload["model"])[0]
    payload["model"][key].view(-1)[0] = float("nan")
    payload["content_sha256"] = content_hash(payload)  # sealed over the NaN, as another tool could write it
    bad = tmp_path / "nan.pt"
    torch.save(payload, bad)
    with caplog.at_level(logging.ERROR):
        assert embed(features, bad, tmp_path / "embeddings.h5") == 2
    assert "NaN or inf" in errors(caplog) and key in errors(caplog) and str(bad) in errors(caplog)
    assert not (tmp_path / "embeddings.h5").exists()
    caplog.clear()
    out = _copy_run(run, tmp_path / "run")
    torch.save(payload, out / "checkpoint.pt")
    with caplog.at_level(logging.ERROR):
        assert train(features, out, "--epochs", "2", "--resume", str(out / "checkpoint.pt")) == 2
    assert key in errors(caplog) and "last good checkpoint" not in errors(caplog)


def test_a_flipped_byte_in_weights_or_optimizer_state_is_found(trained, tmp_path, caplog):
    features, run = trained
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    weights = tmp_path / "weights.pt"
    shutil.copy(run / "checkpoint.pt", weights)
    _flip_tensor_bytes(weights, max(payload["model"].values(), key=lambda t: t.numel()))
    with caplog.at_level(logging.ERROR):
        assert embed(features, weights, tmp_path / "embeddings.h5") == 2
    assert "damaged" in errors(caplog) and str(weights) in errors(caplog)
    caplog.clear()
    out = _copy_run(run, tmp_path / "run")
    (out / "checkpoint.pt").unlink()
    shutil.copy(run / "checkpoint.pt", out / "checkpoint.pt")  # not a hard link to the epoch snapshot
    _flip_tensor_bytes(out / "checkpoint.pt", payload["optimizer"]["state"][0]["exp_avg"])
    with caplog.at_level(logging.ERROR):
        assert train(features, out, "--epochs", "2", "--resume", str(out / "checkpoint.pt")) == 2
    assert "damaged" in errors(caplog) and "checkpoint.pt" in errors(caplog)


def test_weights_that_become_nan_are_never_written_nor_called_good(trained, tmp_path, monkeypatch):
    features, _ = trained
    real = train_loop.Run.checkpoint

    def nan_at_epoch_2(self):
        payload = real(self)
        if self.epoch == 2:
            next(iter(payload["model"].values())).view(-1)[0] = float("inf")
        return payload

    monkeypatch.setattr(train_loop.Run, "checkpoint", nan_at_epoch_2)
    out = tmp_path / "run"
    assert train(features, out, "--epochs", "3") == 2
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert not (out / "checkpoints" / "epoch_0002.pt").exists()


# ----------------------------------------------------------------------------- 2: NaN encoders


class NanOnRealTiles(nn.Module):
    """The tiny encoder, but NaN for any input that is not all zeros (the load probe's)."""

    def __init__(self, everywhere: bool) -> None:
        super().__init__()
        self.inner, self.everywhere = tiny_model(), everywhere

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.everywhere:
            return out * float("nan")
        real = x.flatten(1).abs().amax(dim=1, keepdim=True) > 0
        return torch.where(real, torch.full_like(out, float("nan")), out)


@pytest.mark.parametrize("everywhere", [True, False], ids=["nan-everywhere", "nan-on-real-tiles-only"])
def test_a_tile_encoder_returning_nan_fails_its_slide(tmp_path, everywhere):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_tissue_slide(slides / "s.tif", mpp=0.5)
    program = export_tile_encoder(NanOnRealTiles(everywhere), tmp_path / "nan.pt2", 32, MEAN, STD)
    out = tmp_path / "out"
    args = ["extract", "--slides", str(slides), "--out", str(out), "--encoder", str(program), "--tile-size-px", "64"]
    args += ["--target-mpp", "2.0", "--num-workers", "0", "--batch-size", "32", "--bank", "--n-augmentations", "2"]
    args += ["--n-tiles-per-augmentation", "4"]
    for _ in range(2):  # the rerun does not skip it
        assert main(args) == 1
        summary = json.loads((out / "summary.json").read_text())
        assert (summary["n_done"], summary["n_skipped"], summary["n_failed"]) == (0, 0, 1)
        assert "NaN or inf" in summary["slides"][0]["reason"]
        assert not list((out / "features").iterdir())


# ----------------------------------------------------------------------------- 3: damaged chunks


def test_a_damaged_bank_chunk_is_a_bad_file_for_training_and_embedding(tmp_path, caplog):
    features = tmp_path / "features"
    paths = write_synthetic_cohort(features, n_slides=7, n_tiles=24, n_augmentations=3, bank_size=10, seed=2)
    flip_bytes(paths[0], "aug_features")
    with caplog.at_level(logging.ERROR):
        assert train(features, tmp_path / "refused", "--epochs", "1") == 2
    message = errors(caplog)
    assert paths[0].name in message and "damaged file" in message and "re-extract" in message
    assert "filter" not in message
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert train(features, tmp_path / "run", "--epochs", "1", "--skip-bad-files") == 0
    assert any(paths[0].name in r.getMessage() and "damaged file" in r.getMessage() for r in caplog.records)
    assert paths[0].stem not in load_checkpoint(tmp_path / "run" / "checkpoint.pt")["slide_ids"]
    flip_bytes(paths[1], "features")
    assert embed(features, tmp_path / "run" / "checkpoint.pt", tmp_path / "embeddings.h5") == 0
    with h5py.File(tmp_path / "embeddings.h5", "r") as handle:
        failed = dict(json.loads(handle.attrs["failed"]))
    reason = failed[str(paths[1])]
    assert "damaged file" in reason and "re-extract" in reason and "filter" not in reason


# ----------------------------------------------------------------------------- 5: stale partials


def test_partials_of_a_killed_training_and_embedding_are_removed(trained, tmp_path, caplog):
    features, run = trained
    out = _copy_run(run, tmp_path / "run")
    dead = 2**22 + 12345  # no such pid (above the kernel's pid_max)

    leaked = [temporary_path(out / "checkpoints" / "epoch_0002.pt", pid=dead), temporary_path(out / "checkpoint.pt", pid=dead)]
    for path in leaked:
        path.write_bytes(b"x" * 1000)
    assert train(features, out, "--epochs", "2", "--resume", str(out / "checkpoint.pt")) == 0
    assert not any(path.exists() for path in leaked)
    embeddings = tmp_path / "embeddings.h5"
    stale = temporary_path(embeddings, pid=dead)
    stale.write_bytes(b"x" * 1000)
    assert embed(features, out / "checkpoint.pt", embeddings) == 0
    assert not stale.exists() and embeddings.is_file()


def test_a_run_killed_before_its_first_checkpoint_is_not_told_to_resume(trained, tmp_path, caplog):
    features, _ = trained
    out = tmp_path / "run"
    out.mkdir()
    (out / "monitors.csv").write_text("epoch\n0\n")  # what a run killed during epoch 1 leaves
    with caplog.at_level(logging.ERROR):
        assert train(features, out, "--epochs", "1") == 2
    assert "--resume" not in errors(caplog) and "--overwrite" in errors(caplog)


# ----------------------------------------------------------------------------- 7: labels


@pytest.mark.parametrize(
    ("slide_ids", "labelled_ids", "hint"),
    [
        (["001", "002", "003", "004"], ["001.svs", "002.svs", "003.svs", "004.svs"], "end in .svs"),
        (["007", "008", "009", "010"], ["7", "8", "9", "10"], "leading zeros"),
    ],
    ids=["extension", "leading-zeros"],
)
def test_labels_that_almost_match_get_a_hint(tmp_path, caplog, slide_ids, labelled_ids, hint):
    from gigassl.embeddings_file import EmbeddingWriter

    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\n" + "".join(f"{s},{i % 2}\n" for i, s in enumerate(labelled_ids)))
    embeddings = tmp_path / "embeddings.h5"
    with EmbeddingWriter(embeddings, {}, 4) as writer:
        writer.append(slide_ids, np.eye(len(slide_ids), 4, dtype=np.float32) + 0.1)
    with caplog.at_level(logging.ERROR):
        code = main(["evaluate", "--embeddings", str(embeddings), "--labels", str(labels), "--out", str(tmp_path / "ev")])
    assert code == 2
    assert hint in errors(caplog) and "single class" not in errors(caplog)


def test_a_tile_encoder_written_by_the_package_is_verified_when_loaded(tmp_path):
    from extract.encoders.resnet import build_resnet
    from extract.encoders.tile_encoder import load_resnet, save_encoder_checkpoint

    torch.manual_seed(0)
    model = build_resnet("resnet18")
    path = tmp_path / "encoder.pt"
    save_encoder_checkpoint(model, path, {"epoch": 3})
    load_resnet(path)
    _flip_tensor_bytes(path, model.state_dict()["layer3.0.conv1.weight"])
    with pytest.raises(ValueError, match=r"encoder\.pt: damaged file"):
        load_resnet(path)
