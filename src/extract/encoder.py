"""ResNet18 with torchvision's parameter names, its tile trunk, and weight loaders.

The tile embedder of Giga-SSL is ResNet18 cut before its fourth residual block:
conv1 … layer3 followed by a spatial mean gives 256 numbers per tile. The network's own
layer4 is kept, because stage 2 starts its sparse layer4 from those weights.

Weights are untrusted input: every loader uses ``torch.load(..., weights_only=True)``.
Accepted layouts (all loaded with ``strict=True`` after a key remap):

- a torchvision-style state dict (``conv1.weight``, ``layer1.0.bn1.running_mean``, …);
- a MoCo checkpoint (``{"state_dict": {"module.encoder_q.conv1.weight": …}}``), head dropped;
- this package's own checkpoints (``{"format": "gigassl-tile-encoder", "resnet18": …}``),
  as written by :func:`save_encoder_checkpoint` and by ``gigassl pretrain-tiles``.

``"random"`` builds a randomly initialised network; outputs then say ``encoder="random"``.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

TILE_FEATURE_DIM = 256
SLIDE_FEATURE_DIM = 512
ENCODER_CHECKPOINT_FORMAT = "gigassl-tile-encoder"
# ImageNet statistics; the MoCo weights trained here use the same normalisation.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3×3 convs), named as in torchvision."""

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _make_layer(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        BasicBlock(in_channels, out_channels, stride),
        BasicBlock(out_channels, out_channels, 1),
    )


class ResNet18(nn.Module):
    """ResNet18 (He et al. 2016) with torchvision's module names.

    ``forward_features`` runs conv1 … layer3 (the tile trunk, before the spatial mean),
    ``forward`` runs the whole network to ``fc``.
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = _make_layer(64, 64, 1)
        self.layer2 = _make_layer(64, 128, 2)
        self.layer3 = _make_layer(128, 256, 2)
        self.layer4 = _make_layer(256, 512, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images → (B, 256, H/16, W/16) layer3 maps."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.forward_features(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TileTrunk(nn.Module):
    """The tile embedder ``e``: conv1 … layer3 of a ResNet18, then a spatial mean.

    Input (B, 3, H, W) normalised images, output (B, 256). Shares its modules with the
    ResNet18 it is cut from (no copy).
    """

    def __init__(self, resnet: ResNet18) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))


@dataclass(frozen=True)
class EncoderInfo:
    """Where the tile encoder's weights came from; written into every output file."""

    name: str  # "random", or the checkpoint's file name
    sha256: str  # of the checkpoint file, or of the random weights
    source: str  # "random", "torchvision", "moco", "gigassl"


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A stable hash of a state dict's tensors (names and values)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remap_state_dict(raw: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """Bring a checkpoint of any accepted layout to torchvision's ResNet18 keys.

    Returns the state dict and the layout's name ("torchvision", "moco" or "gigassl").
    MoCo's projection head (``encoder_q.fc.*`` of an MLP head) is dropped and replaced by the
    freshly initialised ``fc`` of a 1000-class ResNet18, which nothing downstream uses.
    """
    if raw.get("format") == ENCODER_CHECKPOINT_FORMAT:
        return dict(raw["resnet18"]), "gigassl"
    state = raw.get("state_dict", raw)
    if not isinstance(state, Mapping):
        raise ValueError("checkpoint holds no state dict")
    layout = "torchvision"
    for prefix in ("module.encoder_q.", "encoder_q."):
        if any(key.startswith(prefix) for key in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            layout = "moco"
            break
    else:
        if state and all(key.startswith("module.") for key in state):  # saved from DataParallel
            state = {k[len("module."):]: v for k, v in state.items()}
    if layout == "moco":
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        state.update({f"fc.{k}": v for k, v in nn.Linear(512, 1000).state_dict().items()})
    return {k: v for k, v in state.items() if torch.is_tensor(v)}, layout


def load_weights_only(path: str | Path, label: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; any failure becomes a ValueError
    starting with ``label`` (checkpoints are untrusted input: tensors and plain data only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the same to a user
        raise ValueError(f"{label}: not a loadable weights-only torch checkpoint ({error})") from error


def load_resnet18(source: str | Path, seed: int = 0) -> tuple[ResNet18, EncoderInfo]:
    """Build a ResNet18 from ``"random"`` or a checkpoint path (any accepted layout).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file and what to do.
    """
    if str(source) == "random":
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        model = ResNet18()
        torch.random.set_rng_state(generator_state)
        return model.eval(), EncoderInfo("random", state_dict_sha256(model.state_dict()), "random")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"tile encoder checkpoint {path} does not exist; pass a ResNet18 checkpoint "
            "(torchvision, MoCo or `gigassl pretrain-tiles` output) or --encoder random"
        )
    raw = load_weights_only(path, str(path))
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected a dict of weights, found {type(raw).__name__}")
    state, layout = remap_state_dict(raw)
    model = ResNet18()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path}: not a ResNet18 checkpoint in a known layout: {error}") from error
    return model.eval(), EncoderInfo(path.name, file_sha256(path), layout)


def save_encoder_checkpoint(model: ResNet18, path: str | Path, extra: Mapping[str, Any] | None = None) -> None:
    """Write the package's own encoder checkpoint (plain tensors and data, weights_only-loadable)."""
    payload: dict[str, Any] = {
        "format": ENCODER_CHECKPOINT_FORMAT,
        "resnet18": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if extra:
        payload.update(extra)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    Path(path).write_bytes(buffer.getvalue())
