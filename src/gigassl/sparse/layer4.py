"""A ResNet's fourth stage (layer4) as a sparse network over maps of tiles.

Stage 2 of Giga-SSL (docs/design.md §1.2, §2.2) runs the tile encoder's own layer4 on a sparse map of tile
features. :class:`SparseLayer4` is that stage, built from either block type of
:mod:`extract.encoders.resnet`, on either backend of :mod:`gigassl.sparse.conv`:

- **basic blocks** (ResNet18: 2 blocks, ResNet34: 3; 256 → 512 channels). Block 0: strided 3×3
  (stride 2, no padding) → BN → ReLU → submanifold 3×3 → BN; shortcut = 3×3 average pool,
  stride 2, dividing by 9 (not by the number of active cells) → 1×1 conv → BN; sum → ReLU.
  Blocks 1…N−1: submanifold 3×3 → BN → ReLU → submanifold 3×3 → BN; identity; ReLU.
- **bottleneck blocks** (ResNet50 v1.5: 3 blocks; 1024 → 2048 channels, 512 inside). Block 0:
  1×1 → BN → ReLU → strided 3×3 → BN → ReLU → 1×1 → BN; the same ÷9 average-pool shortcut →
  1×1 → BN; sum → ReLU. Blocks 1, 2: 1×1 → BN → ReLU → submanifold 3×3 → BN → ReLU → 1×1 → BN;
  identity; ReLU. v1.5 puts the stride on the 3×3 conv (as :mod:`extract.encoders.resnet` builds it), so
  the strided sparse conv is that conv, and the first 1×1 acts on the input sites.

A 1×1 conv acts on each site's features alone: it is a bias-free ``nn.Linear`` (weight = the
dense conv's (out, in, 0, 0)). BN is ``BatchNorm1d`` over the active sites. The ÷9 pool is
:func:`~gigassl.sparse.conv.sum_pool_3x3_stride2` / 9.

On a fully active map of odd sides placed one cell from the origin (``collate_views``' margin),
either stage equals the dense layer4 with the same weights whose shortcut's strided 1×1 conv is
replaced by ``AvgPool2d(3, 2, padding=1, count_include_pad=True)`` then the 1×1 conv at stride 1
(checked in ``tests/test_model.py``; the reasoning is in :mod:`gigassl.model`).

Weight layouts: dense conv (out, in, kh, kw) → sparse (out, kh, kw, in), no spatial flip.
"""

from __future__ import annotations

from typing import Callable, cast

import torch
from torch import nn

from extract.encoders.resnet import BasicBlock, Bottleneck, init_resnet_weights
from gigassl.sparse.conv import (
    SparseTensor,
    dense_to_sparse_weight,
    resolve_backend,
    strided_conv3x3,
    submanifold_conv3x3,
    sum_pool_3x3_stride2,
)

BLOCKS = ("basic", "bottleneck")
BOTTLENECK_EXPANSION = 4


def _relu_bn(bn: nn.Module, x: SparseTensor) -> SparseTensor:
    return x.replace_feature(torch.relu(bn(x.features)))


class _BasicDown(nn.Module):
    """Basic block 0: strided conv, ÷9 average-pool shortcut. (N, in) sites → (M, out) sites."""

    DENSE_NAMES = (
        ("conv1", "conv1"),
        ("bn1", "bn1"),
        ("conv2", "conv2"),
        ("bn2", "bn2"),
        ("shortcut_conv", "downsample.0"),
        ("shortcut_bn", "downsample.1"),
    )

    def __init__(self, in_channels: int, out_channels: int, backend: str) -> None:
        super().__init__()
        self.conv1 = strided_conv3x3(in_channels, out_channels, backend)
        self.bn1 = nn.BatchNorm1d(out_channels)
        self.conv2 = submanifold_conv3x3(out_channels, out_channels, backend)
        self.bn2 = nn.BatchNorm1d(out_channels)
        self.shortcut_conv = nn.Linear(in_channels, out_channels, bias=False)  # the 1×1 conv
        self.shortcut_bn = nn.BatchNorm1d(out_channels)

    def forward(self, x: SparseTensor) -> SparseTensor:
        out = self.conv1(x)
        shortcut = self.shortcut_bn(self.shortcut_conv(sum_pool_3x3_stride2(x, out) / 9.0))
        out = self.conv2(_relu_bn(self.bn1, out))
        return out.replace_feature(torch.relu(self.bn2(out.features) + shortcut))


class _BasicBlock(nn.Module):
    """Basic block 1…N−1: two submanifold convs, identity shortcut. (M, C) → (M, C) sites."""

    DENSE_NAMES = (("conv1", "conv1"), ("bn1", "bn1"), ("conv2", "conv2"), ("bn2", "bn2"))

    def __init__(self, channels: int, backend: str) -> None:
        super().__init__()
        self.conv1 = submanifold_conv3x3(channels, channels, backend)
        self.bn1 = nn.BatchNorm1d(channels)
        self.conv2 = submanifold_conv3x3(channels, channels, backend)
        self.bn2 = nn.BatchNorm1d(channels)

    def forward(self, x: SparseTensor) -> SparseTensor:
        out = self.conv2(_relu_bn(self.bn1, self.conv1(x)))
        return out.replace_feature(torch.relu(self.bn2(out.features) + x.features))


class _Bottleneck(nn.Module):
    """The residual branch of both bottleneck blocks: 1×1 → BN → ReLU → 3×3 (``conv3x3``) → BN →
    ReLU → 1×1 → BN, ``out_channels // 4`` channels inside."""

    def __init__(self, in_channels: int, out_channels: int, conv3x3: Callable[[int, int], nn.Module]) -> None:
        super().__init__()
        planes = out_channels // BOTTLENECK_EXPANSION
        self.conv1 = nn.Linear(in_channels, planes, bias=False)
        self.bn1 = nn.BatchNorm1d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm1d(planes)
        self.conv3 = nn.Linear(planes, out_channels, bias=False)
        self.bn3 = nn.BatchNorm1d(out_channels)

    def _branch(self, x: SparseTensor) -> tuple[SparseTensor, torch.Tensor]:
        """(the sites after the 3×3 conv, the branch's (M, out) features before the sum)."""
        reduced = x.replace_feature(torch.relu(self.bn1(self.conv1(x.features))))  # same sites as x
        out = _relu_bn(self.bn2, self.conv2(reduced))
        return out, self.bn3(self.conv3(out.features))


class _BottleneckDown(_Bottleneck):
    """Bottleneck block 0 (v1.5): 1×1, strided 3×3, 1×1; ÷9 average-pool shortcut. (N, in) → (M, out)."""

    DENSE_NAMES = (
        ("conv1", "conv1"),
        ("bn1", "bn1"),
        ("conv2", "conv2"),
        ("bn2", "bn2"),
        ("conv3", "conv3"),
        ("bn3", "bn3"),
        ("shortcut_conv", "downsample.0"),
        ("shortcut_bn", "downsample.1"),
    )

    def __init__(self, in_channels: int, out_channels: int, backend: str) -> None:
        super().__init__(in_channels, out_channels, lambda cin, cout: strided_conv3x3(cin, cout, backend))
        self.shortcut_conv = nn.Linear(in_channels, out_channels, bias=False)
        self.shortcut_bn = nn.BatchNorm1d(out_channels)

    def forward(self, x: SparseTensor) -> SparseTensor:
        out, branch = self._branch(x)
        shortcut = self.shortcut_bn(self.shortcut_conv(sum_pool_3x3_stride2(x, out) / 9.0))
        return out.replace_feature(torch.relu(branch + shortcut))


class _BottleneckBlock(_Bottleneck):
    """Bottleneck block 1…N−1: 1×1, submanifold 3×3, 1×1; identity shortcut. (M, C) → (M, C)."""

    DENSE_NAMES = (("conv1", "conv1"), ("bn1", "bn1"), ("conv2", "conv2"), ("bn2", "bn2"), ("conv3", "conv3"), ("bn3", "bn3"))

    def __init__(self, channels: int, backend: str) -> None:
        super().__init__(channels, channels, lambda cin, cout: submanifold_conv3x3(cin, cout, backend))

    def forward(self, x: SparseTensor) -> SparseTensor:
        out, branch = self._branch(x)
        return out.replace_feature(torch.relu(branch + x.features))


_SPARSE_BLOCKS = {"basic": (_BasicDown, _BasicBlock), "bottleneck": (_BottleneckDown, _BottleneckBlock)}


class SparseLayer4(nn.Module):
    """A ResNet's layer4 on sparse maps: sparse tensor (N, ``in_channels``) → (M, ``out_channels``).

    Args:
        backend: ``auto``, ``torch`` or ``spconv`` (:func:`gigassl.sparse.conv.resolve_backend`);
            the state dict is the same for both.
        in_channels: D of the tile features (256 for ResNet18/34, 1024 for ResNet50).
        out_channels: width of the output sites (512 basic, 2048 bottleneck).
        block: ``basic`` or ``bottleneck``.
        n_blocks: blocks of the stage (ResNet18: 2, ResNet34 and ResNet50: 3); block 0 strides.

    Randomly initialised; :meth:`load_dense` copies a dense layer4's weights. Modules are named
    ``block0`` … ``block{n_blocks-1}``. Runs on whatever device its parameters are on.
    """

    def __init__(
        self, backend: str = "auto", in_channels: int = 256, out_channels: int = 512, block: str = "basic", n_blocks: int = 2
    ) -> None:
        super().__init__()
        if block not in _SPARSE_BLOCKS:
            raise ValueError(f"sparse layer4 block {block!r}: choose one of {', '.join(BLOCKS)}")
        if n_blocks < 1:
            raise ValueError(f"sparse layer4 with {n_blocks} blocks: needs at least 1")
        self.backend = backend = resolve_backend(backend)
        self.block, self.n_blocks = block, n_blocks
        down, rest = _SPARSE_BLOCKS[block]
        self.block0 = down(in_channels, out_channels, backend)
        for index in range(1, n_blocks):
            self.add_module(f"block{index}", rest(out_channels, backend))

    def blocks(self) -> list[_BasicDown | _BasicBlock | _BottleneckDown | _BottleneckBlock]:
        """block0 … block{n_blocks-1}, in order."""
        return [getattr(self, f"block{index}") for index in range(self.n_blocks)]

    def forward(self, x: SparseTensor) -> SparseTensor:
        for block in self.blocks():
            x = block(x)
        return x

    @torch.no_grad()
    def load_dense(self, layer4: nn.Module) -> "SparseLayer4":
        """Copy the weights of a dense ``layer4`` (torchvision names, the same block type and count)."""
        state = layer4.state_dict()
        found_blocks = len({key.split(".", 1)[0] for key in state})
        if found_blocks != self.n_blocks:
            raise ValueError(f"not a layer4 of {self.n_blocks} {self.block} blocks: the dense stage has {found_blocks} blocks")
        for index, block in enumerate(self.blocks()):
            for own, dense in block.DENSE_NAMES:
                _copy_dense(getattr(block, own), state, f"{index}.{dense}")
        return self


def _copy_dense(module: nn.Module, state: dict[str, torch.Tensor], key: str) -> None:
    """Copy the dense parameters at ``key`` (a conv or a BN) into ``module`` (sparse conv, Linear or BN)."""
    if isinstance(module, nn.BatchNorm1d):
        names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        missing = [f"{key}.{name}" for name in names if f"{key}.{name}" not in state]
        if missing:
            raise ValueError(f"not a matching layer4: {', '.join(missing)} missing")
        module.load_state_dict({name: state[f"{key}.{name}"] for name in names})
        return
    weight = state.get(f"{key}.weight")
    found = None if weight is None else tuple(weight.shape)
    if isinstance(module, nn.Linear):
        expected = (*module.weight.shape, 1, 1)
        if weight is None or found != expected:
            raise ValueError(f"not a matching layer4: {key}.weight has shape {found}, expected {expected}")
        module.weight.copy_(weight[:, :, 0, 0])
        return
    sparse_weight = cast(torch.Tensor, module.weight)  # a sparse conv: its (3, 3, in, out) weight
    expected = tuple(sparse_weight.shape[i] for i in (0, 3, 1, 2))
    if weight is None or found != expected:
        raise ValueError(f"not a matching layer4: {key}.weight has shape {found}, expected {expected}")
    sparse_weight.copy_(dense_to_sparse_weight(weight))


def dense_layer4(in_channels: int, out_channels: int, block: str = "basic", n_blocks: int = 2) -> nn.Sequential:
    """A randomly initialised dense layer4 (He init as torchvision's ResNet, drawn from torch's
    global generator): the weights a sparse stage starts from when no encoder gives them."""
    if block not in _SPARSE_BLOCKS:
        raise ValueError(f"layer4 block {block!r}: choose one of {', '.join(BLOCKS)}")
    dense_block = BasicBlock if block == "basic" else Bottleneck
    planes = out_channels // dense_block.expansion
    stage = nn.Sequential(
        dense_block(in_channels, planes, 2), *(dense_block(out_channels, planes, 1) for _ in range(n_blocks - 1))
    )
    init_resnet_weights(stage)
    return stage
