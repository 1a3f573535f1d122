"""The slide encoder of Giga-SSL: ResNet18's layer4 as a sparse network, then a projector.

``SparseLayer4`` (DESIGN.md §2), for input maps of 256-d tiles, on either sparse backend of
:mod:`gigassl.sparse_conv` (plain PyTorch, or spconv where installed):

- block 0: strided 3×3 sparse conv (stride 2, no padding) → BN → ReLU → submanifold 3×3 → BN;
  shortcut = 3×3 average pool, stride 2, dividing by 9 (not by the number of active cells) →
  1×1 conv → BN; sum → ReLU;
- block 1: submanifold 3×3 → BN → ReLU → submanifold 3×3 → BN; identity shortcut; ReLU.

BN is ``BatchNorm1d`` over the active sites. The 1×1 conv of the shortcut acts on each site's
features alone, so it is a bias-free ``nn.Linear`` (weight = the dense conv's (out, in, 0, 0)).
The ÷9 pool is :func:`~gigassl.sparse_conv.sum_pool_3x3_stride2` (spconv's ``SparseAvgPool2d``
divides by the active count and runs on CUDA only).

Correspondence with the dense layer4 (checked in ``tests/test_model.py``). ``collate_views``
places each map one cell from the origin. On a map where every cell of an H×W grid is active,
H and W odd, the sparse layer4 equals the dense ``ResNet18.layer4`` with the same weights in
which the shortcut's strided 1×1 conv is replaced by ``AvgPool2d(3, 2, padding=1,
count_include_pad=True)`` followed by the same 1×1 conv at stride 1: the strided sparse conv
without padding, shifted by the one-cell margin, is the dense conv with padding 1 (inactive
cells play the zero padding), and submanifold convs on a fully active map are dense convs with
padding 1. On an even side the dense conv drops the last stride-2 window (it hangs past the
padding) while the sparse conv keeps every window that holds a tile. The dense shortcut
(sampling every other cell) and the sparse one (averaging 3×3) are different functions; the
paper's sparse network uses the average.

``GigaSSLModel`` = ``SparseLayer4`` → mean over each slide's active sites (B, 512), the slide
representation → projector 512 → 512 → 512 → ``projector_dim`` (Linear-BN-ReLU twice, then a
Linear), the output fed to NT-Xent.

Weight layouts: dense conv (out, in, kh, kw) → sparse (out, kh, kw, in) for both backends, no
spatial flip (sparse convolutions are cross-correlations like ``F.conv2d``).
"""

from __future__ import annotations

import torch
from torch import nn

from extract.encoder import SLIDE_FEATURE_DIM, TILE_FEATURE_DIM, ResNet18
from gigassl.sparse_conv import (
    dense_to_sparse_weight,
    make_sparse_tensor,
    resolve_backend,
    strided_conv3x3,
    submanifold_conv3x3,
    sum_pool_3x3_stride2,
)
from gigassl.sparse_map import SparseBatch


def mean_per_map(features: torch.Tensor, batch_index: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean of the (N, C) site features of each map → (batch_size, C)."""
    batch_index = batch_index.long()
    sums = features.new_zeros((batch_size, features.shape[1])).index_add_(0, batch_index, features)
    counts = torch.bincount(batch_index, minlength=batch_size).clamp_(min=1).to(sums.dtype)
    return sums / counts[:, None]


class _SparseDownBlock(nn.Module):
    """Block 0 of the sparse layer4 (strided conv, ÷9 average-pool shortcut)."""

    def __init__(self, in_channels: int, out_channels: int, backend: str) -> None:
        super().__init__()
        self.conv1 = strided_conv3x3(in_channels, out_channels, backend)
        self.bn1 = nn.BatchNorm1d(out_channels)
        self.conv2 = submanifold_conv3x3(out_channels, out_channels, backend)
        self.bn2 = nn.BatchNorm1d(out_channels)
        self.shortcut_conv = nn.Linear(in_channels, out_channels, bias=False)  # the 1×1 conv
        self.shortcut_bn = nn.BatchNorm1d(out_channels)

    def forward(self, x):  # sparse tensor (N, in) → sparse tensor (M, out)
        out = self.conv1(x)
        pooled = sum_pool_3x3_stride2(x, out) / 9.0
        shortcut = self.shortcut_bn(self.shortcut_conv(pooled))
        out = out.replace_feature(torch.relu(self.bn1(out.features)))
        out = self.conv2(out)
        return out.replace_feature(torch.relu(self.bn2(out.features) + shortcut))


class _SparseBlock(nn.Module):
    """Block 1 of the sparse layer4 (two submanifold convs, identity shortcut)."""

    def __init__(self, channels: int, backend: str) -> None:
        super().__init__()
        self.conv1 = submanifold_conv3x3(channels, channels, backend)
        self.bn1 = nn.BatchNorm1d(channels)
        self.conv2 = submanifold_conv3x3(channels, channels, backend)
        self.bn2 = nn.BatchNorm1d(channels)

    def forward(self, x):  # sparse tensor (M, C) → sparse tensor (M, C)
        out = self.conv1(x)
        out = out.replace_feature(torch.relu(self.bn1(out.features)))
        out = self.conv2(out)
        return out.replace_feature(torch.relu(self.bn2(out.features) + x.features))


class SparseLayer4(nn.Module):
    """ResNet18's layer4 on sparse maps: sparse tensor (N, 256) → sparse tensor (M, 512).

    ``backend``: ``auto``, ``torch`` or ``spconv`` (:func:`gigassl.sparse_conv.resolve_backend`);
    the state dict is the same for both. Randomly initialised; :meth:`load_dense` copies a dense
    layer4's weights. Runs on whatever device its parameters are on.
    """

    def __init__(self, backend: str = "auto", in_channels: int = TILE_FEATURE_DIM, out_channels: int = SLIDE_FEATURE_DIM) -> None:
        super().__init__()
        self.backend = backend = resolve_backend(backend)
        self.block0 = _SparseDownBlock(in_channels, out_channels, backend)
        self.block1 = _SparseBlock(out_channels, backend)

    def forward(self, x):  # sparse tensor → sparse tensor
        return self.block1(self.block0(x))

    @torch.no_grad()
    def load_dense(self, layer4: nn.Module) -> "SparseLayer4":
        """Copy the weights of a dense ResNet18 ``layer4`` (torchvision names) into this network."""
        state = layer4.state_dict()
        own = {
            "0.conv1.weight": self.block0.conv1.weight, "0.conv2.weight": self.block0.conv2.weight,
            "1.conv1.weight": self.block1.conv1.weight, "1.conv2.weight": self.block1.conv2.weight,
        }
        for key, target in own.items():
            found = tuple(state[key].shape) if key in state else None
            expected = tuple(target.shape[i] for i in (0, 3, 1, 2))
            if found != expected:
                raise ValueError(f"not a ResNet18 layer4: {key} has shape {found}, expected {expected}")
        for block, dense_prefix in ((self.block0, "0"), (self.block1, "1")):
            for conv in ("conv1", "conv2"):
                getattr(block, conv).weight.copy_(dense_to_sparse_weight(state[f"{dense_prefix}.{conv}.weight"]))
            for bn in ("bn1", "bn2"):
                getattr(block, bn).load_state_dict(_bn_state(state, f"{dense_prefix}.{bn}"))
        self.block0.shortcut_conv.weight.copy_(state["0.downsample.0.weight"][:, :, 0, 0])
        self.block0.shortcut_bn.load_state_dict(_bn_state(state, "0.downsample.1"))
        return self


def _bn_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    return {name: state[f"{prefix}.{name}"] for name in names}


class GigaSSLModel(nn.Module):
    """Sparse layer4 → per-slide mean (512) → projector MLP (``projector_dim``).

    Args:
        layer4_source: a ``ResNet18`` (or its ``layer4``) whose dense layer4 initialises the sparse
            one — the tile encoder's own, by default; ``None``: a freshly initialised ResNet18's
            (He init, drawn from torch's global generator).
        projector_dim: output size of the projector (256).
        device: where the model is placed (it may be moved later; nothing depends on it).
        sparse_backend: ``auto``, ``torch`` or ``spconv`` (:mod:`gigassl.sparse_conv`).

    ``pool`` gives the slide representation (B, 512) used at inference; ``forward`` the (B,
    projector_dim) projection used by the loss. Both take a :class:`~gigassl.sparse_map.SparseBatch`
    or the backend's sparse tensor. The state dict holds plain tensors only, the same for both
    backends.
    """

    def __init__(
        self, layer4_source: ResNet18 | nn.Module | None = None, projector_dim: int = 256,
        device: torch.device | str = "cpu", sparse_backend: str = "auto",
    ) -> None:
        super().__init__()
        device = torch.device(device)
        self.projector_dim = projector_dim
        self.sparse_backend = resolve_backend(sparse_backend, device)
        self.layer4 = SparseLayer4(self.sparse_backend)
        source = ResNet18() if layer4_source is None else layer4_source
        self.layer4.load_dense(source.layer4 if hasattr(source, "layer4") else source)
        width = SLIDE_FEATURE_DIM
        self.projector = nn.Sequential(
            nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
            nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
            nn.Linear(width, projector_dim),
        )
        self.to(device)

    def _as_sparse(self, x):
        if not isinstance(x, SparseBatch):
            return x
        # the parameters' device, not the one given at construction: the model may have moved
        x = x.to(self.projector[0].weight.device, non_blocking=True)
        return make_sparse_tensor(x.features, x.indices, x.spatial_shape, x.batch_size, self.sparse_backend)

    def pool(self, x) -> torch.Tensor:
        """Sparse maps → (B, 512) slide representations (mean over each map's active sites)."""
        x = self._as_sparse(x)
        out = self.layer4(x)
        return mean_per_map(out.features, out.indices[:, 0], x.batch_size)

    def forward(self, x) -> torch.Tensor:
        """Sparse maps → (B, projector_dim) projections."""
        return self.projector(self.pool(x))
