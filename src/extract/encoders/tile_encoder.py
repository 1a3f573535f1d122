"""The tile encoder: what stage 1 runs on every tile, where it came from, and how it is loaded.

Two kinds of tile encoders, both :class:`TileEncoder` modules mapping normalised
(B, 3, H, W) images to (B, D) features:

- a ResNet18 / ResNet34 / ResNet50 (:mod:`extract.encoders.resnet`) cut before its fourth stage —
  conv1 … layer3 then a spatial mean (:class:`TileTrunk`), D = 256 (R18/R34) or 1024 (R50);
  its layer4 is kept for stage 2 (:attr:`LoadedEncoder.layer4`, 512-d / 2048-d). Weights come
  from ``"random"`` (``"random:resnet50"`` …), or a checkpoint in any published layout
  (:mod:`extract.encoders.loading`: torchvision, ``module.``, MoCo, Lightning, this package's);
- any other network exported with ``torch.export`` to a ``.pt2`` file (:mod:`extract.encoders.exported`).

:func:`extract.encoders.kinds.load_encoder` takes either and returns a :class:`LoadedEncoder`; its
:class:`EncoderInfo` (name, sha256, architecture, width, layout, normalisation) is written into
every output file (:meth:`EncoderInfo.attrs`). Checkpoints are untrusted input, read with
``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from extract.checkpoints.sealed import CONTENT_HASH_KEY, load_weights_only, save_atomic, verify_payload
from extract.device import autocast
from extract.encoders.loading import ENCODER_CHECKPOINT_FORMAT, find_resnet, load_found, read_checkpoint
from extract.encoders.resnet import ARCHITECTURES, BasicBlock, Bottleneck, ResNet, ResNet18, ResNet34, ResNet50, build_resnet
from extract.errors import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURES",
    "BasicBlock",
    "Bottleneck",
    "ENCODER_CHECKPOINT_FORMAT",
    "EncoderInfo",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "LoadedEncoder",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "SLIDE_FEATURE_DIM",
    "TILE_FEATURE_DIM",
    "TileEncoder",
    "TileTrunk",
    "build_resnet",
    "file_sha256",
    "load_resnet",
    "load_resnet18",
    "encode_batch",
    "encode_batches",
    "load_weights_only",
    "normalise",
    "prepare_batch",
    "save_encoder_checkpoint",
    "state_dict_sha256",
]

TILE_FEATURE_DIM = 256  # ResNet18's trunk; other encoders say theirs (TileEncoder.feature_dim)
SLIDE_FEATURE_DIM = 512  # ResNet18's layer4
# ImageNet statistics; the MoCo weights trained here use the same normalisation.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
RANDOM = "random"


def normalise(images: torch.Tensor, mean: Sequence[float] = IMAGE_MEAN, std: Sequence[float] = IMAGE_STD) -> torch.Tensor:
    """Float (B, 3, H, W) in [0, 1] → normalised per channel with ``mean``/``std`` (ImageNet's by
    default, as every ResNet here expects), channels_last, on the images' device."""
    mean_t = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return ((images - mean_t) / std_t).contiguous(memory_format=torch.channels_last)


class TileEncoder(nn.Module):
    """Normalised (B, 3, H, W) images → (B, ``feature_dim``) tile features.

    ``mean`` / ``std`` are the per-channel statistics the images must be normalised with;
    ``input_size_px`` (None: any) the side the encoder takes — other sizes are resized to it
    (bilinear, antialiased) before :meth:`embed`.
    """

    def __init__(
        self,
        feature_dim: int,
        mean: Sequence[float] = IMAGE_MEAN,
        std: Sequence[float] = IMAGE_STD,
        input_size_px: int | None = None,
    ) -> None:
        super().__init__()
        self.feature_dim, self.input_size_px = int(feature_dim), input_size_px
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, input_size_px, input_size_px) → (B, feature_dim)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images → (B, feature_dim)."""
        size = self.input_size_px
        if size is not None and tuple(images.shape[-2:]) != (size, size):
            dtype = images.dtype
            images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            images = images.to(dtype).contiguous(memory_format=torch.channels_last)
        return self.embed(images)


class TileTrunk(TileEncoder):
    """The tile embedder ``e``: conv1 … layer3 of a ResNet, then a spatial mean.

    Input (B, 3, H, W) normalised images, output (B, 256) for ResNet18/34, (B, 1024) for
    ResNet50. Shares its modules with the ResNet it is cut from (no copy).
    """

    def __init__(
        self,
        resnet: ResNet,
        mean: Sequence[float] = IMAGE_MEAN,
        std: Sequence[float] = IMAGE_STD,
        input_size_px: int | None = None,
    ) -> None:
        super().__init__(resnet.trunk_width, mean, std, input_size_px)
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))


@dataclass(frozen=True)
class EncoderInfo:
    """Where the tile encoder came from and what it gives; written into every output file.

    ``sha256`` is that of the checkpoint / program file (of the weights for ``random``);
    ``source`` the family of its layout: "random", "torchvision", "moco", "lightning",
    "gigassl" or "export"; ``layout`` the container and key prefix found, e.g.
    ``"state_dict/model.resnet."``; ``input_size_px`` 0 when any size is taken.
    """

    name: str  # "random", "random:resnet50", or the file's name
    sha256: str
    source: str
    arch: str = "resnet18"  # resnet18 | resnet34 | resnet50 | the exported program's name
    width: int = TILE_FEATURE_DIM  # D of the tile features
    layout: str = ""
    input_size_px: int = 0
    mean: tuple[float, ...] = IMAGE_MEAN
    std: tuple[float, ...] = IMAGE_STD

    def attrs(self) -> dict[str, Any]:
        """HDF5 attributes of a features dataset: ``encoder`` (the name, as TRIDENT writes it),
        ``encoder_sha256``, ``encoder_source``, ``encoder_arch``, ``encoder_width``,
        ``encoder_layout``, ``encoder_input_size_px``, ``encoder_mean``, ``encoder_std`` (JSON lists)."""
        return {
            "encoder": self.name,
            "encoder_sha256": self.sha256,
            "encoder_source": self.source,
            "encoder_arch": self.arch,
            "encoder_width": int(self.width),
            "encoder_layout": self.layout,
            "encoder_input_size_px": int(self.input_size_px),
            # JSON text, not arrays: every attribute stays a scalar for readers that call .item()
            "encoder_mean": json.dumps([float(v) for v in self.mean]),
            "encoder_std": json.dumps([float(v) for v in self.std]),
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON, weights_only checkpoints)."""
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data


@dataclass(frozen=True, eq=False)
class LoadedEncoder:
    """A tile encoder ready to run: ``trunk`` (B, 3, H, W) → (B, ``feature_dim``), and its provenance.

    ``resnet`` is the whole network for ResNet encoders (None for exported programs): its
    dense ``layer4`` is where stage 2 starts its sparse head.
    """

    trunk: TileEncoder
    info: EncoderInfo
    resnet: ResNet | None = None

    @property
    def feature_dim(self) -> int:
        """D, the width of the tile features (256, 1024, or the exported program's)."""
        return self.trunk.feature_dim

    @property
    def layer4(self) -> nn.Sequential:
        """The ResNet's dense layer4 (R18/R34: 256 → 512 channels; R50: 1024 → 2048)."""
        if self.resnet is None:
            raise ValueError(f"tile encoder {self.info.name} is an exported program: it has no ResNet layer4")
        return self.resnet.layer4

    @property
    def layer4_width(self) -> int | None:
        """Channels out of ``layer4`` (512 or 2048), None for exported programs."""
        return None if self.resnet is None else self.resnet.layer4_width


def prepare_batch(
    tiles: torch.Tensor, device: torch.device, mean: Sequence[float] = IMAGE_MEAN, std: Sequence[float] = IMAGE_STD
) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float normalised with ``mean``/``std``, channels_last, on ``device``."""
    # NHWC storage permuted to NCHW is already channels_last; normalise keeps it so.
    return normalise(tiles.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0), mean, std)


@torch.inference_mode()
def encode_batch(tiles: torch.Tensor, trunk: TileEncoder, device: torch.device, mixed_precision: bool = True) -> np.ndarray:
    """(B, H, W, 3) uint8 tiles → (B, D) float32 features (D = ``trunk.feature_dim``)."""
    with autocast(device, mixed_precision):
        features = trunk(prepare_batch(tiles, device, trunk.mean, trunk.std))
    return features.float().cpu().numpy()


def encode_batches(
    loader: Iterable[torch.Tensor], trunk: TileEncoder, device: torch.device, mixed_precision: bool = True
) -> Iterator[np.ndarray]:
    """Yield (B, D) float32 features batch by batch (memory bounded by the batch size)."""
    for tiles in loader:
        yield encode_batch(tiles, trunk, device, mixed_precision)


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


def _random_arch(source: str) -> str | None:
    """``"random"`` → resnet18, ``"random:resnet50"`` → resnet50; None for anything else."""
    if source == RANDOM:
        return "resnet18"
    if source.startswith(RANDOM + ":"):
        arch = source.split(":", 1)[1]
        if arch not in ARCHITECTURES:
            raise UserError(
                f"--encoder {source}: unknown architecture; use random, {', '.join('random:' + a for a in ARCHITECTURES)}"
            )
        return arch
    return None


def load_resnet(source: str | Path, seed: int = 0) -> tuple[ResNet, EncoderInfo]:
    """A ResNet (eval mode) from ``"random"`` / ``"random:ARCH"`` or a checkpoint of any accepted layout.

    The architecture (ResNet18/34/50) is read from the checkpoint's keys. Raises
    ``FileNotFoundError`` / ``ValueError`` naming the file and what to do.
    """
    arch = _random_arch(str(source))
    if arch is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_resnet(arch)
        info = EncoderInfo(str(source), state_dict_sha256(model.state_dict()), "random", arch, model.trunk_width, "random")
        return model.eval(), info
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"tile encoder checkpoint {path} does not exist; pass a ResNet18/34/50 checkpoint "
            "(torchvision, MoCo, Lightning or `gigassl pretrain-tiles` output), a torch.export .pt2 program, "
            "or --encoder random"
        )
    raw = read_checkpoint(path)
    if isinstance(raw, dict) and CONTENT_HASH_KEY in raw:  # written by this package: verify it
        verify_payload(raw, str(path))
    found = find_resnet(raw, str(path))
    if found.n_ignored:
        logger.debug("%s: %d tensors outside conv1 … layer4 (heads) ignored", path, found.n_ignored)
    model = load_found(found)
    return model, EncoderInfo(path.name, file_sha256(path), found.source, found.arch, model.trunk_width, found.layout)


def load_resnet18(source: str | Path, seed: int = 0) -> tuple[ResNet18, EncoderInfo]:
    """:func:`load_resnet` for callers that need a ResNet18 (refuses the other architectures)."""
    model, info = load_resnet(source, seed)
    if info.arch != "resnet18":
        raise UserError(f"{source}: a {info.arch} checkpoint, where a ResNet18 is needed here")
    return model, info  # type: ignore[return-value]


def save_encoder_checkpoint(model: ResNet, path: str | Path, extra: Mapping[str, Any] | None = None) -> None:
    """Write the package's own encoder checkpoint (plain tensors and data, weights_only-loadable):
    ``{"format": "gigassl-tile-encoder", "arch": A, A: state dict, **extra, "content_sha256"}``,
    atomically, refusing NaN or inf weights (:func:`extract.checkpoints.sealed.save_atomic`)."""

    arch = getattr(model, "arch", "resnet18")
    payload: dict[str, Any] = {
        "format": ENCODER_CHECKPOINT_FORMAT,
        "arch": arch,
        arch: {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if extra:
        payload.update(extra)
    save_atomic(payload, Path(path))
