"""ResNet18, ResNet34 and ResNet50 (He et al. 2016) with torchvision's parameter names.

Written here because torchvision is not a dependency; the names are torchvision's so that the
checkpoints people publish load after a key remap (:mod:`extract.encoders.loading`). ResNet50
is torchvision's "v1.5" (the stride of a bottleneck sits on its 3×3 conv), as in every
published histology ResNet50 (RetCCL, Lunit, MoCo v2).

Giga-SSL cuts the network before its fourth stage: conv1 … layer3 is the tile trunk
(256 channels for basic blocks, 1024 for bottlenecks), layer4 (512 / 2048 channels) is what
stage 2 turns into a sparse network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from extract.errors import UserError


class BasicBlock(nn.Module):
    """ResNet basic block (two 3×3 convs), named as in torchvision; ``planes`` output channels."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _shortcut(in_channels, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet bottleneck block (1×1 → 3×3 with the stride → 1×1), torchvision names; 4·``planes`` out."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))


@dataclass(frozen=True)
class ResNetSpec:
    """One architecture: its block type and the number of blocks of each of the four stages."""

    name: str
    block: type[BasicBlock] | type[Bottleneck]
    blocks_per_stage: tuple[int, int, int, int]

    @property
    def trunk_width(self) -> int:
        """Channels of layer3, hence the tile features' width D."""
        return 256 * self.block.expansion

    @property
    def layer4_width(self) -> int:
        """Channels of layer4, hence the width of stage 2's slide vector."""
        return 512 * self.block.expansion

    def describe(self) -> str:
        kind = "bottleneck" if self.block is Bottleneck else "basic"
        return f"{self.name} ({kind} blocks {'-'.join(map(str, self.blocks_per_stage))})"


ARCHITECTURES: dict[str, ResNetSpec] = {
    "resnet18": ResNetSpec("resnet18", BasicBlock, (2, 2, 2, 2)),
    "resnet34": ResNetSpec("resnet34", BasicBlock, (3, 4, 6, 3)),
    "resnet50": ResNetSpec("resnet50", Bottleneck, (3, 4, 6, 3)),
}


def init_resnet_weights(module: nn.Module) -> None:
    """torchvision's ResNet initialisation, in place: He (fan-out) normal convs, BN weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNet(nn.Module):
    """A ResNet of :data:`ARCHITECTURES` with torchvision's module names.

    ``forward_features`` runs conv1 … layer3 (the tile trunk, before the spatial mean),
    ``forward`` runs the whole network to ``fc``. ``arch``, ``trunk_width`` and
    ``layer4_width`` say what it is.
    """

    def __init__(self, arch: str = "resnet18", num_classes: int = 1000) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise UserError(f"architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
        spec = ARCHITECTURES[arch]
        self.arch, self.trunk_width, self.layer4_width = arch, spec.trunk_width, spec.layer4_width
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = 64
        for index, (planes, n_blocks) in enumerate(zip((64, 128, 256, 512), spec.blocks_per_stage)):
            blocks = [spec.block(channels, planes, 1 if index == 0 else 2)]
            channels = planes * spec.block.expansion
            blocks += [spec.block(channels, planes, 1) for _ in range(n_blocks - 1)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc: nn.Linear | nn.Sequential = nn.Linear(channels, num_classes)  # MoCo swaps in an MLP head
        init_resnet_weights(self)

    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images → (B, trunk_width, H/16, W/16) layer3 maps."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images → (B, num_classes) through layer4, the global pool and ``fc``."""
        x = self.layer4(self.forward_features(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNet18(ResNet):
    """ResNet18: basic blocks 2-2-2-2, trunk 256-d, layer4 512-d."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__("resnet18", num_classes)


class ResNet34(ResNet):
    """ResNet34: basic blocks 3-4-6-3, trunk 256-d, layer4 512-d."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__("resnet34", num_classes)


class ResNet50(ResNet):
    """ResNet50 (v1.5): bottleneck blocks 3-4-6-3, trunk 1024-d, layer4 2048-d."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__("resnet50", num_classes)


_CLASSES: dict[str, type[ResNet]] = {"resnet18": ResNet18, "resnet34": ResNet34, "resnet50": ResNet50}


def build_resnet(arch: str, num_classes: int = 1000) -> ResNet:
    """A randomly initialised network of ``arch`` (``"resnet18"``, ``"resnet34"``, ``"resnet50"``)."""
    if arch not in _CLASSES:
        raise UserError(f"architecture {arch!r}: choose one of {', '.join(_CLASSES)}")
    return _CLASSES[arch](num_classes=num_classes)
