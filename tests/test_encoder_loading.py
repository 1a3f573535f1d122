"""Every published checkpoint layout of ResNet18/34/50 loads and gives the plain layout's trunk.

Each layout is written here from random weights (BatchNorm statistics randomised too, so a
mis-mapped buffer would show) and loaded through :func:`extract.encoders.kinds.load_encoder`; the
trunk's output must be exactly that of the same weights loaded the plain torchvision way.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from extract.encoders.kinds import load_encoder
from extract.encoders.loading import detect_arch
from extract.encoders.resnet import ResNet, build_resnet
from extract.encoders.tile_encoder import TileTrunk, load_resnet18, save_encoder_checkpoint

State = dict[str, torch.Tensor]


def random_resnet(arch: str, seed: int = 0) -> ResNet:
    """A network of ``arch`` with random weights and random BatchNorm statistics."""
    torch.manual_seed(seed)
    model = build_resnet(arch)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _without_fc(state: State) -> State:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _prefixed(prefix: str, state: State) -> State:
    return {prefix + k: v for k, v in state.items()}


def _moco(prefix: str) -> Callable[[State, Path], object]:
    def write(state: State, _: Path) -> object:
        weights = _prefixed(prefix + "encoder_q.", _without_fc(state))
        weights[prefix + "encoder_q.fc.0.weight"] = torch.randn(16, 16)  # MLP head: ignored
        weights[prefix + "encoder_q.fc.2.weight"] = torch.randn(8, 16)
        weights.update(_prefixed(prefix + "encoder_k.", {k: torch.zeros_like(v) for k, v in state.items()}))
        weights[prefix + "queue"] = torch.randn(8, 4)
        return {"epoch": 200, "arch": "resnet18", "state_dict": weights, "optimizer": {"state": {}}}

    return write


def _lightning(prefix: str) -> Callable[[State, Path], object]:
    def write(state: State, _: Path) -> object:
        weights = _prefixed(prefix, _without_fc(state))
        weights["model.projection_head.0.weight"] = torch.randn(16, 16)  # SimCLR head: ignored
        weights["model.projection_head.2.weight"] = torch.randn(8, 16)
        return {
            "epoch": 3,
            "global_step": 30,
            "pytorch-lightning_version": "1.1.0",
            "state_dict": weights,
            "hyper_parameters": {"lr": 0.1, "batch_size": 256},
        }

    return write


def _own(state: State, path: Path) -> None:
    model = build_resnet(detect_arch(state, "test"))
    model.load_state_dict(state)
    save_encoder_checkpoint(model, path, extra={"epoch": 1})


# name → (writer(state, path) returning the object to torch.save, or None when it wrote the file itself;
#          expected EncoderInfo.source, expected EncoderInfo.layout)
LAYOUTS: dict[str, tuple[Callable[[State, Path], object], str, str]] = {
    "torchvision": (lambda s, _: s, "torchvision", "plain"),
    "torchvision without fc (RetCCL, Lunit)": (lambda s, _: _without_fc(s), "torchvision", "plain"),
    "older torchvision without BN step counters": (
        lambda s, _: {k: v for k, v in s.items() if not k.endswith("num_batches_tracked")},
        "torchvision",
        "plain",
    ),
    "DataParallel module.": (lambda s, _: _prefixed("module.", s), "torchvision", "module."),
    "MoCo repository module.encoder_q.": (_moco("module."), "moco", "state_dict/module.encoder_q."),
    "MoCo unwrapped encoder_q. (pretrain-tiles last.pt)": (_moco(""), "moco", "state_dict/encoder_q."),
    "Lightning SimCLR model.resnet. (Ciga et al.)": (_lightning("model.resnet."), "lightning", "state_dict/model.resnet."),
    "Lightning model.": (_lightning("model."), "lightning", "state_dict/model."),
    "Lightning backbone.": (_lightning("backbone."), "lightning", "state_dict/backbone."),
    "Lightning encoder.": (_lightning("encoder."), "lightning", "state_dict/encoder."),
    "Lightning model.backbone.": (_lightning("model.backbone."), "lightning", "state_dict/model.backbone."),
    "plain resnet.": (lambda s, _: _prefixed("resnet.", _without_fc(s)), "torchvision", "resnet."),
    "module.backbone.": (lambda s, _: _prefixed("module.backbone.", s), "torchvision", "module.backbone."),
    "{'model': …}": (lambda s, _: {"model": s, "epoch": 5}, "torchvision", "model"),
    "gigassl own format": (_own, "gigassl", "gigassl"),
}
# Every layout for ResNet18; the bigger networks in the layouts they are published in.
CASES = [("resnet18", name) for name in LAYOUTS] + [
    (arch, name)
    for arch in ("resnet34", "resnet50")
    for name in (
        "torchvision without fc (RetCCL, Lunit)",
        "MoCo repository module.encoder_q.",
        "Lightning SimCLR model.resnet. (Ciga et al.)",
        "gigassl own format",
    )
]


@pytest.fixture(scope="module")
def networks() -> dict[str, ResNet]:
    return {arch: random_resnet(arch, seed) for seed, arch in enumerate(("resnet18", "resnet34", "resnet50"))}


@pytest.mark.parametrize(("arch", "layout"), CASES)
def test_layout_loads_and_gives_the_plain_trunk(arch: str, layout: str, networks: dict[str, ResNet], tmp_path: Path) -> None:
    reference = networks[arch]
    writer, source, layout_name = LAYOUTS[layout]
    path = tmp_path / "checkpoint.pth"
    payload = writer(reference.state_dict(), path)
    if payload is not None:
        torch.save(payload, path)
    loaded = load_encoder(path)
    assert (loaded.info.arch, loaded.info.source, loaded.info.layout) == (arch, source, layout_name)
    assert loaded.info.width == loaded.feature_dim == reference.trunk_width
    assert loaded.layer4_width == reference.layer4_width and len(loaded.info.sha256) == 64
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = TileTrunk(reference).eval()(images)
        assert torch.equal(loaded.trunk(images), expected)
        assert torch.equal(
            loaded.layer4(reference.forward_features(images)), reference.layer4(reference.forward_features(images))
        )


def _one_line_error(path: Path, match: str) -> str:
    with pytest.raises(ValueError, match=match) as caught:
        load_encoder(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_keys_are_listed_on_one_line(networks: dict[str, ResNet], tmp_path: Path) -> None:
    state = dict(networks["resnet50"].state_dict())
    del state["layer3.1.conv2.weight"], state["layer4.0.bn1.running_mean"]
    path = tmp_path / "cut.pth"
    torch.save(_prefixed("module.", state), path)
    message = _one_line_error(path, "resnet50 weights under prefix 'module.' lack 2 of the")
    assert "module.layer3.1.conv2.weight" in message and "module.layer4.0.bn1.running_mean" in message
    no_layer4 = tmp_path / "no_layer4.pth"
    torch.save({k: v for k, v in networks["resnet18"].state_dict().items() if not k.startswith("layer4.")}, no_layer4)
    _one_line_error(no_layer4, r"resnet18 weights under prefix '' lack 25 of the 120 .*layer4\.0\.conv1\.weight.* more\)")


def test_wrong_shapes_and_foreign_networks_are_refused(networks: dict[str, ResNet], tmp_path: Path) -> None:
    state = dict(networks["resnet18"].state_dict())
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    torch.save(state, tmp_path / "odd.pth")
    _one_line_error(tmp_path / "odd.pth", r"not a standard resnet18: 1 tensors .*layer2\.0\.conv1\.weight \(128, 64, 5, 5\)")
    torch.save(torch.nn.Linear(3, 4).state_dict(), tmp_path / "linear.pth")
    _one_line_error(tmp_path / "linear.pth", "no ResNet stem .* among its 2 tensors")
    stem = {"conv1.weight": torch.zeros(64, 3, 7, 7)}
    resnet101 = {**stem, **{f"layer{s}.{b}.conv3.weight": torch.zeros(1) for s, n in ((1, 3), (2, 4), (3, 23)) for b in range(n)}}
    torch.save(resnet101, tmp_path / "r101.pth")
    _one_line_error(tmp_path / "r101.pth", "bottleneck blocks 3-4-23-0 per stage is not supported; supported: resnet18")
    torch.save({**_prefixed("student.", stem), **_prefixed("teacher.", stem)}, tmp_path / "two.pth")
    _one_line_error(tmp_path / "two.pth", "several ResNets .*'student.', 'teacher.'")
    torch.save(networks["resnet50"].state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match="a resnet50 checkpoint, where a ResNet18 is needed"):
        load_resnet18(tmp_path / "r50.pth")


def test_lightning_file_with_pickled_hyperparameters_gets_the_conversion(networks: dict[str, ResNet], tmp_path: Path) -> None:
    reference = networks["resnet18"]
    path = tmp_path / "tenpercent_resnet18.ckpt"
    checkpoint = _lightning("model.resnet.")(reference.state_dict(), path)
    checkpoint["hyper_parameters"] = argparse.Namespace(lr=0.1, arch="resnet18")  # what weights_only refuses
    torch.save(checkpoint, path)
    message = _one_line_error(path, "refused by torch.load\\(weights_only=True\\) .*pickled Python objects .*argparse.Namespace")
    assert "Only if you trust" in message
    command = message.split("keep just its weights once with: ")[1].split("  and pass --encoder ")[0]
    converted = Path(message.rsplit("--encoder ", 1)[1])
    assert command.startswith("python -c ") and converted == tmp_path / "tenpercent_resnet18.weights.pt"
    subprocess.run([sys.executable, *shlex.split(command)[1:]], check=True, timeout=120)  # the user's step, run knowingly
    loaded = load_encoder(converted)
    assert (loaded.info.arch, loaded.info.layout) == ("resnet18", "model.resnet.")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.trunk(images), TileTrunk(reference).eval()(images))


def test_random_encoders_name_their_architecture() -> None:
    loaded = load_encoder("random:resnet34", seed=2)
    assert (loaded.info.name, loaded.info.arch, loaded.info.width, loaded.info.source) == (
        "random:resnet34",
        "resnet34",
        256,
        "random",
    )
    assert load_encoder("random").info.arch == "resnet18"
    with pytest.raises(ValueError, match="random:resnet18, random:resnet34, random:resnet50"):
        load_encoder("random:vit")
