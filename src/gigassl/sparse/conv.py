"""Sparse 3×3 convolutions over maps of tiles — the one module that owns sparse convolution.

Two backends compute the same functions with the same parameters:

- ``torch`` (default): plain PyTorch — sites hashed by sort + ``searchsorted``, then for each of
  the 9 kernel taps the neighbouring rows are gathered, multiplied by that tap's (in, out) matrix
  and scatter-added (``index_add``). Autograd by construction; the same code on CPU, CUDA and
  Apple MPS, under autocast in the autocast dtype. Installs everywhere.
- ``spconv`` (optional, ``pip install 'gigassl[spconv]'``; wheels for x86-64 Linux and Windows
  only): spconv 2.x, kept as the reference the torch backend is tested against. Its algorithm is
  chosen from the input's device at every call (Native on the CPU, implicit GEMM on CUDA), so a
  model built on one device runs correctly on another. spconv has no bf16 kernels: under CPU
  autocast its convolutions run in fp32.

Nothing outside this module imports spconv.

Conventions: a batch of maps has features (N, C), indices (N, 3) (batch, y, x) and a spatial shape
[H, W]. Weights are stored as (out, 3, 3, in) — spconv's layout, so the state dict of a model is the
same for both backends and a checkpoint trained with one runs with the other. Convolutions are
cross-correlations (as ``F.conv2d``): output (y, x) takes tap (ky, kx) from input (y + ky − 1,
x + kx − 1) for the submanifold conv and from input (2y + ky, 2x + kx) for the strided one.

- submanifold 3×3 (stride 1, padding 1): outputs exactly at the input sites;
- strided 3×3 (stride 2, no padding): an output site for every window holding an input site,
  output shape ⌊(H − 3) / 2⌋ + 1 × ⌊(W − 3) / 2⌋ + 1.

For maps of T = 5 tiles most sites have no neighbour, so the centre tap of a submanifold conv is
one GEMM over all sites and the 8 other taps touch a few rows each. Rulebooks (which row feeds
which, per tap) are built once per set of sites and shared by the convolutions on those sites.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from extract.errors import UserError
from gigassl.config import SPARSE_BACKENDS as BACKENDS  # the names the settings accept

# ``auto``: the torch backend everywhere. It installs everywhere, and on the 2-core CPU with bf16
# autocast (the default where the CPU has bf16 units) it takes 0.6× spconv Native's time per
# training step and embeds 1.7–1.9× faster; in fp32 it is 4–10 % slower (docs/training.md,
# "Sparse backends"). On CUDA spconv has not been measured here; the torch backend is the one checked there.
AUTO_BACKEND = "torch"
_CENTRE = 4  # tap index of (1, 1) in a row-major 3×3 kernel
_SUBM_KEY = "subm3x3"  # spconv's indice_key shared by the submanifold convs on one set of sites


class SparseBackendError(UserError):
    """A sparse backend that cannot be used here (not installed, unknown, wrong device)."""


class SparseTensor(Protocol):
    """What the model uses of either backend's sparse tensor: :class:`SparseMaps` (torch) or
    ``spconv.pytorch.SparseConvTensor`` (spconv, typed here without importing it).

    features (N, C); indices (N, 3) (batch, y, x), int64 for torch and int32 for spconv;
    spatial_shape [H, W]; batch_size maps.
    """

    @property
    def features(self) -> torch.Tensor: ...

    @property
    def indices(self) -> torch.Tensor: ...

    @property
    def spatial_shape(self) -> Sequence[int]: ...

    @property
    def batch_size(self) -> int: ...

    def replace_feature(self, features: torch.Tensor) -> "SparseTensor":
        """The same sites with other (N, C') features."""
        ...


# spconv's own forward of a conv class, as ``_run_spconv`` calls it
SpconvForward = Callable[[nn.Module, SparseTensor], SparseTensor]


# ---------------------------------------------------------------------------------------------
# backend choice


@functools.cache
def spconv_available() -> bool:
    """True when ``spconv.pytorch`` imports (x86-64 Linux/Windows with the spconv extra)."""
    try:
        import spconv.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA build failing at import
        return False
    return True


def resolve_backend(name: str, device: torch.device | str = "cpu") -> str:
    """``auto`` / ``torch`` / ``spconv`` → the backend to run on ``device`` (``torch`` or ``spconv``).

    Raises :class:`SparseBackendError` (one line, saying what to install or pass) for an unknown
    name, spconv when it is not installed, or spconv on a device it has no kernels for.
    """
    device = torch.device(device)
    if name not in BACKENDS:
        raise SparseBackendError(f"unknown sparse backend {name!r}: use one of {', '.join(BACKENDS)}")
    if name == "auto":
        return AUTO_BACKEND
    if name == "spconv":
        if device.type not in ("cpu", "cuda"):
            raise SparseBackendError(
                f"sparse backend 'spconv' has no kernels for device {device.type!r}; pass --sparse-backend torch"
            )
        if not spconv_available():
            raise SparseBackendError(
                "sparse backend 'spconv' asked for but spconv is not installed: "
                "pip install 'gigassl[spconv]' (x86-64 Linux/Windows only), or pass --sparse-backend torch"
            )
    return name


# ---------------------------------------------------------------------------------------------
# the torch backend's tensor and rulebooks


@dataclass(eq=False)
class SparseMaps:
    """A batch of sparse maps for the torch backend (the counterpart of spconv's SparseConvTensor).

    features (N, C); indices (N, 3) int64 (batch, y, x); spatial_shape [H, W]; batch_size maps.
    ``rulebooks`` caches neighbour tables of these sites; maps with the same sites share it.
    """

    features: torch.Tensor
    indices: torch.Tensor
    spatial_shape: list[int]
    batch_size: int
    rulebooks: dict[str, Any] = field(default_factory=dict)

    def replace_feature(self, features: torch.Tensor) -> "SparseMaps":
        """The same sites (and rulebooks) with other (N, C') features."""
        return SparseMaps(features, self.indices, self.spatial_shape, self.batch_size, self.rulebooks)

    def dense(self) -> torch.Tensor:
        """(batch_size, C, H, W) with zeros at inactive cells."""
        h, w = self.spatial_shape
        out = self.features.new_zeros((self.batch_size, h, w, self.features.shape[1]))
        b, y, x = self.indices.long().unbind(1)
        out[b, y, x] = self.features
        return out.permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class Rulebook:
    """Which input row feeds which output row through which tap (row-major over the 3×3 kernel).

    ``inputs[t]`` feed ``outputs[t]``; ``full_tap``: the tap (a submanifold conv's centre) that maps
    every row onto itself, or None; ``n_out`` output sites. The other taps' pairs are also kept
    concatenated (``gather``, ``scatter``, ``tap_sizes``), so a convolution gathers and scatters
    once for all of them.
    """

    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]
    n_out: int
    full_tap: int | None = None
    gather: torch.Tensor = field(init=False)
    scatter: torch.Tensor = field(init=False)
    taps: tuple[int, ...] = field(init=False)
    tap_sizes: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        taps = tuple(t for t in range(9) if t != self.full_tap and len(self.inputs[t]))
        empty = self.inputs[0].new_zeros(0)
        object.__setattr__(self, "taps", taps)
        object.__setattr__(self, "tap_sizes", tuple(len(self.inputs[t]) for t in taps))
        object.__setattr__(self, "gather", torch.cat([self.inputs[t] for t in taps]) if taps else empty)
        object.__setattr__(self, "scatter", torch.cat([self.outputs[t] for t in taps]) if taps else empty)


def _site_keys(indices: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 3) (b, y, x) → (N,) int64 keys, unique per site for 0 ≤ y < height, 0 ≤ x < width."""
    indices = indices.long()
    return (indices[:, 0] * height + indices[:, 1]) * width + indices[:, 2]


def submanifold_rulebook(maps: SparseMaps) -> Rulebook:
    """Neighbour table of a submanifold 3×3 conv on ``maps``' sites (cached on ``maps``)."""
    if _SUBM_KEY in maps.rulebooks:
        return maps.rulebooks[_SUBM_KEY]
    indices = maps.indices.long()
    h, w = (int(s) + 2 for s in maps.spatial_shape)  # +2: neighbours at −1 and at H get keys too
    shifted = indices + torch.tensor([0, 1, 1], device=indices.device)
    keys = _site_keys(shifted, h, w)
    sorted_keys, order = torch.sort(keys)
    rows = torch.arange(len(keys), device=keys.device)
    inputs, outputs = [], []
    for tap in range(9):
        if tap == _CENTRE:
            inputs.append(rows)
            outputs.append(rows)
            continue
        dy, dx = tap // 3 - 1, tap % 3 - 1
        wanted = keys + dy * w + dx  # the site at (y + dy, x + dx) of each output site
        position = torch.searchsorted(sorted_keys, wanted).clamp_(max=max(len(keys) - 1, 0))
        found = sorted_keys[position] == wanted if len(keys) else wanted.new_zeros(0, dtype=torch.bool)
        inputs.append(order[position[found]])
        outputs.append(rows[found])
    book = Rulebook(tuple(inputs), tuple(outputs), len(keys), full_tap=_CENTRE)
    maps.rulebooks[_SUBM_KEY] = book
    return book


def strided_rulebook(maps: SparseMaps) -> tuple[Rulebook, torch.Tensor, list[int]]:
    """Rulebook of the strided 3×3 conv (stride 2, no padding) on ``maps``, its output indices
    (M, 3) int64 sorted by (batch, y, x), and the output spatial shape. Cached on ``maps``."""
    if "stride2" in maps.rulebooks:
        return maps.rulebooks["stride2"]
    h, w = (int(s) for s in maps.spatial_shape)
    out_h, out_w = max((h - 3) // 2 + 1, 0), max((w - 3) // 2 + 1, 0)
    indices = maps.indices.long()
    rows = torch.arange(len(indices), device=indices.device)
    tap_rows, tap_keys = [], []
    for tap in range(9):
        oy2, ox2 = indices[:, 1] - tap // 3, indices[:, 2] - tap % 3  # 2·(output y), 2·(output x)
        valid = (oy2 >= 0) & (ox2 >= 0) & (oy2 % 2 == 0) & (ox2 % 2 == 0) & (oy2 < 2 * out_h) & (ox2 < 2 * out_w)
        tap_rows.append(rows[valid])
        tap_keys.append((indices[valid, 0] * out_h + oy2[valid] // 2) * out_w + ox2[valid] // 2)
    unique, inverse = torch.unique(torch.cat(tap_keys), return_inverse=True)  # sorted keys
    outputs = torch.split(inverse, [len(k) for k in tap_keys])
    out_indices = torch.stack((unique // (out_h * out_w), unique // out_w % out_h, unique % out_w), dim=1)
    result = (Rulebook(tuple(tap_rows), tuple(outputs), len(unique)), out_indices, [out_h, out_w])
    maps.rulebooks["stride2"] = result
    return result


def _convolve(features: torch.Tensor, weight: torch.Tensor, book: Rulebook) -> torch.Tensor:
    """Σ over taps t of scatter(outputs[t], features[inputs[t]] @ weight[:, t]ᵀ) → (n_out, out).

    One gather for all partial taps, each scatter-added in place; a full tap is one GEMM over
    every row. Under autocast the products and their sum are in the autocast dtype (at T = 5 a
    site gets the centre tap and rarely another, so there is little to accumulate).
    """
    taps = weight.permute(1, 2, 3, 0).reshape(9, weight.shape[3], weight.shape[0])  # (9, in, out), contiguous
    out = torch.matmul(features, taps[book.full_tap]) if book.full_tap is not None else None
    if book.taps:
        for rows, tap in zip(torch.split(features.index_select(0, book.gather), list(book.tap_sizes)), book.taps):
            product = torch.matmul(rows, taps[tap])
            if out is None:
                out = product.new_zeros((book.n_out, weight.shape[0]))
            out.index_add_(0, book.outputs[tap], product.to(out.dtype))
    return features.new_zeros((book.n_out, weight.shape[0])) if out is None else out


class _TorchSparseConv3x3(nn.Module):
    """Shared parameters of the torch backend's convolutions: weight (out, 3, 3, in), no bias."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(torch.empty(out_channels, 3, 3, in_channels))
        # the fan-in of a 3×3 conv, as nn.Conv2d's default initialisation
        nn.init.kaiming_uniform_(self.weight.permute(0, 3, 1, 2), a=math.sqrt(5))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=3"


class TorchSubMConv3x3(_TorchSparseConv3x3):
    """Submanifold 3×3 conv, plain PyTorch: :class:`SparseMaps` (N, in) → (N, out), same sites."""

    def forward(self, x: SparseMaps) -> SparseMaps:
        return x.replace_feature(_convolve(x.features, self.weight, submanifold_rulebook(x)))


class TorchStridedConv3x3(_TorchSparseConv3x3):
    """Strided 3×3 conv (stride 2, no padding), plain PyTorch: (N, in) → (M, out) on the
    windows that hold a site."""

    def forward(self, x: SparseMaps) -> SparseMaps:
        book, out_indices, out_shape = strided_rulebook(x)
        return SparseMaps(_convolve(x.features, self.weight, book), out_indices, out_shape, x.batch_size)


# ---------------------------------------------------------------------------------------------
# the spconv backend


def _run_spconv(conv_forward: SpconvForward, module: nn.Module, x: SparseTensor) -> SparseTensor:
    """Pick spconv's algorithm from the input's device, and run fp32 under CPU autocast
    (spconv.SparseConvTensor → the same)."""
    import spconv.pytorch as spconv

    on_cuda = x.features.device.type == "cuda"
    module.algo = spconv.ConvAlgo.MaskImplicitGemm if on_cuda else spconv.ConvAlgo.Native
    if not on_cuda and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return conv_forward(module, x.replace_feature(x.features.float()))
    return conv_forward(module, x)


@functools.cache
def _spconv_classes() -> tuple[type[nn.Module], type[nn.Module]]:
    """spconv's submanifold and strided 3×3 conv classes with this module's settings (spconv imported here)."""
    import spconv.pytorch as spconv

    class SpconvSubMConv3x3(spconv.SubMConv2d):
        def __init__(self, in_channels: int, out_channels: int) -> None:
            super().__init__(in_channels, out_channels, 3, bias=False, indice_key=_SUBM_KEY, algo=spconv.ConvAlgo.Native)

        def forward(self, x: SparseTensor) -> SparseTensor:
            return _run_spconv(spconv.SubMConv2d.forward, self, x)

    class SpconvStridedConv3x3(spconv.SparseConv2d):
        def __init__(self, in_channels: int, out_channels: int) -> None:
            super().__init__(in_channels, out_channels, 3, stride=2, padding=0, bias=False, algo=spconv.ConvAlgo.Native)

        def forward(self, x: SparseTensor) -> SparseTensor:
            return _run_spconv(spconv.SparseConv2d.forward, self, x)

    return SpconvSubMConv3x3, SpconvStridedConv3x3


# ---------------------------------------------------------------------------------------------
# what the model uses


def submanifold_conv3x3(in_channels: int, out_channels: int, backend: str) -> nn.Module:
    """A bias-free submanifold 3×3 conv of ``backend`` (``torch`` or ``spconv``); weight (out, 3, 3, in)."""
    return TorchSubMConv3x3(in_channels, out_channels) if backend == "torch" else _spconv_classes()[0](in_channels, out_channels)


def strided_conv3x3(in_channels: int, out_channels: int, backend: str) -> nn.Module:
    """A bias-free strided 3×3 conv (stride 2, no padding) of ``backend``; weight (out, 3, 3, in)."""
    return (
        TorchStridedConv3x3(in_channels, out_channels) if backend == "torch" else _spconv_classes()[1](in_channels, out_channels)
    )


def make_sparse_tensor(
    features: torch.Tensor, indices: torch.Tensor, spatial_shape: Sequence[int], batch_size: int, backend: str
) -> SparseTensor:
    """(N, C) features at (N, 3) (batch, y, x) indices → the backend's sparse tensor."""
    if backend == "torch":
        return SparseMaps(features, indices.long(), [int(s) for s in spatial_shape], int(batch_size))
    import spconv.pytorch as spconv

    return spconv.SparseConvTensor(features, indices.int(), [int(s) for s in spatial_shape], int(batch_size))


def dense_to_sparse_weight(weight: torch.Tensor) -> torch.Tensor:
    """Dense conv weight (out, in, kh, kw) → sparse conv weight (out, kh, kw, in), both backends."""
    return weight.detach().permute(0, 2, 3, 1).contiguous()


def sum_pool_3x3_stride2(x: SparseTensor, out: SparseTensor) -> torch.Tensor:
    """Sum of the active input sites of ``x`` in each 3×3, stride-2, unpadded window → (M, C) at
    the sites of ``out``, the strided conv's output on ``x``. Divide by 9 for the average that
    counts inactive cells as zeros. Differentiable; any device; either backend's tensors."""
    if isinstance(x, SparseMaps):
        book, _, _ = strided_rulebook(x)
        return x.features.new_zeros((book.n_out, x.features.shape[1])).index_add_(
            0, book.scatter, x.features.index_select(0, book.gather)
        )
    return _sum_pool_by_lookup(x.features, x.indices, out.indices, out.spatial_shape)


def _sum_pool_by_lookup(
    features: torch.Tensor, indices: torch.Tensor, out_indices: torch.Tensor, out_shape: Sequence[int]
) -> torch.Tensor:
    """:func:`sum_pool_3x3_stride2` for output sites given in any order (spconv's)."""
    out_h, out_w = int(out_shape[0]), int(out_shape[1])
    maps = SparseMaps(features, indices.long(), [2 * out_h + 1, 2 * out_w + 1], 0)
    book, ours, _ = strided_rulebook(maps)
    theirs = _site_keys(out_indices, out_h, out_w)
    sorted_keys, order = torch.sort(theirs)
    mine = _site_keys(ours, out_h, out_w)
    position = torch.searchsorted(sorted_keys, mine).clamp_(max=max(len(sorted_keys) - 1, 0))
    if len(mine) != len(theirs) or not torch.equal(sorted_keys[position], mine):
        raise RuntimeError("sum_pool_3x3_stride2: the output sites are not the strided conv's output sites of the input")
    return features.new_zeros((len(theirs), features.shape[1])).index_add_(
        0, order[position][book.scatter], features.index_select(0, book.gather)
    )
