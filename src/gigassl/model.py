"""The slide encoder of Giga-SSL: a ResNet's layer4 as a sparse network, then a projector.

``GigaSSLModel`` = [per-site linear D → P, the linear-first head only] → :class:`SparseLayer4`
(:mod:`gigassl.sparse.layer4`) → mean over each slide's active sites (B, W), the slide
representation → projector W → W → W → ``projector_dim`` (Linear-BN-ReLU twice, then a Linear),
the output fed to NT-Xent. W is the layer4's width: 512 for basic blocks, 2048 for bottlenecks.

Which head (:class:`HeadSpec`, recorded in checkpoints as ``architecture``):

- a ResNet tile encoder (R18, R34, R50): that network's own layer4, converted dense → sparse
  (R18: 2 basic blocks, R34: 3 basic blocks, both 256 → 512; R50: 3 bottlenecks, 1024 → 2048);
- any other encoder (an exported program, foreign features) of width D: a ResNet18-layer4-shaped
  head (2 basic blocks, 512 wide) whose first convolutions take D channels, randomly initialised
  (``source`` = ``generic``). ``input_projection_dim`` P > 0 puts a per-site linear D → P first
  instead (compared in ``docs/encoders_stage2.md``; not the default).

Correspondence with the dense layer4 (checked in ``tests/test_model.py``). ``collate_views``
places each map one cell from the origin. On a map where every cell of an H×W grid is active,
H and W odd, the sparse layer4 equals the dense layer4 with the same weights in which the
shortcut's strided 1×1 conv is replaced by ``AvgPool2d(3, 2, padding=1, count_include_pad=True)``
followed by the same 1×1 conv at stride 1: the strided sparse conv without padding, shifted by
the one-cell margin, is the dense conv with padding 1 (inactive cells play the zero padding),
and submanifold convs on a fully active map are dense convs with padding 1. On an even side the
dense conv drops the last stride-2 window (it hangs past the padding) while the sparse conv
keeps every window that holds a tile. The dense shortcut (sampling every other cell) and the
sparse one (averaging 3×3) are different functions; the paper's sparse network uses the average.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, cast

import torch
from torch import nn

from extract.encoders.resnet import ARCHITECTURES, Bottleneck
from extract.errors import UserError
from gigassl.sparse.conv import SparseTensor, make_sparse_tensor, resolve_backend
from gigassl.sparse.layer4 import BLOCKS, SparseLayer4, dense_layer4
from gigassl.sparse.maps import SparseBatch

__all__ = ["GENERIC", "GigaSSLModel", "HeadSpec", "SparseLayer4", "mean_per_map"]

GENERIC = "generic"  # HeadSpec.source of the randomly initialised head for non-ResNet encoders


def mean_per_map(features: torch.Tensor, batch_index: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean of the (N, C) site features of each map → (batch_size, C)."""
    batch_index = batch_index.long()
    sums = features.new_zeros((batch_size, features.shape[1])).index_add_(0, batch_index, features)
    counts = torch.bincount(batch_index, minlength=batch_size).clamp_(min=1).to(sums.dtype)
    return sums / counts[:, None]


@dataclass(frozen=True)
class HeadSpec:
    """The architecture of the sparse head: plain data, written into checkpoints (``architecture``).

    ``feature_dim``: D of the tile features; ``block`` / ``n_blocks`` / ``width``: the layer4
    (basic 2 × 512 for ResNet18); ``source``: the ResNet whose layer4 shape it has, or
    ``generic``; ``input_projection_dim``: P > 0 puts a per-site linear D → P before the layer4.
    """

    feature_dim: int = 256
    block: str = "basic"
    n_blocks: int = 2
    width: int = 512
    source: str = "resnet18"
    input_projection_dim: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.block not in BLOCKS:
            problems.append(f"block {self.block!r} (choose {', '.join(BLOCKS)})")
        if min(self.feature_dim, self.n_blocks, self.width) < 1 or self.input_projection_dim < 0:
            problems.append(
                f"sizes feature_dim={self.feature_dim}, n_blocks={self.n_blocks}, width={self.width}, "
                f"input_projection_dim={self.input_projection_dim}"
            )
        if self.block == "bottleneck" and self.width % 4:
            problems.append(f"bottleneck width {self.width} (a multiple of 4)")
        if self.source not in (*ARCHITECTURES, GENERIC):
            problems.append(f"source {self.source!r} (choose {', '.join((*ARCHITECTURES, GENERIC))})")
        if problems:
            raise UserError("invalid sparse head: " + "; ".join(problems))

    @property
    def layer4_in(self) -> int:
        """Channels entering the layer4: P with an input projection, else D."""
        return self.input_projection_dim or self.feature_dim

    @classmethod
    def for_resnet(cls, arch: str) -> "HeadSpec":
        """The head made of ``arch``'s own layer4 (resnet18, resnet34, resnet50)."""
        if arch not in ARCHITECTURES:
            raise UserError(f"no ResNet head for {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
        spec = ARCHITECTURES[arch]
        block = "bottleneck" if spec.block is Bottleneck else "basic"
        return cls(spec.trunk_width, block, spec.blocks_per_stage[3], spec.layer4_width, arch)

    @classmethod
    def generic(cls, feature_dim: int, input_projection_dim: int = 0) -> "HeadSpec":
        """The randomly initialised ResNet18-layer4-shaped head for D-wide features of any encoder."""
        return cls(feature_dim, "basic", 2, 512, GENERIC, input_projection_dim)

    @classmethod
    def of_layer4(cls, layer4: nn.Sequential) -> "HeadSpec":
        """The head a dense layer4 (torchvision names) converts to."""
        first: Any = layer4[0]  # a BasicBlock or Bottleneck, ours or torchvision's (read by attribute names)
        block = "bottleneck" if isinstance(first, Bottleneck) else "basic"
        width = first.bn3.num_features if block == "bottleneck" else first.bn2.num_features
        spec = cls(first.conv1.in_channels, block, len(layer4), width, GENERIC)
        known = [arch for arch in ARCHITECTURES if cls.for_resnet(arch) == dataclasses.replace(spec, source=arch)]
        return dataclasses.replace(spec, source=known[0]) if known else spec

    def to_dict(self) -> dict[str, Any]:
        """Plain data (weights-only checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, label: str = "checkpoint") -> "HeadSpec":
        """A spec from :meth:`to_dict`'s data, every field given."""
        if not isinstance(data, Mapping):
            raise UserError(f"{label}: the sparse head is {type(data).__name__}, not a mapping; re-save the checkpoint")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(data) - names), sorted(names - set(data))
        if unknown:
            raise UserError(f"{label}: unknown sparse head fields {unknown}; was it written by a newer gigassl?")
        if missing:
            raise UserError(f"{label}: sparse head fields {missing} missing; train the slide encoder again with `gigassl train`")
        try:
            return cls(**dict(data))
        except (TypeError, ValueError) as error:
            raise UserError(f"{label}: {error}") from error


class GigaSSLModel(nn.Module):
    """[linear D → P] → sparse layer4 → per-slide mean (W) → projector MLP (``projector_dim``).

    Args:
        layer4_source: a ResNet (or its dense ``layer4``) whose layer4 initialises the sparse one —
            the tile encoder's own, by default; its shape sets the head (``head`` may then only
            repeat it). ``None``: a freshly initialised layer4 of ``head``'s shape (He init,
            drawn from torch's global generator).
        projector_dim: output size of the projector (256).
        device: where the model is placed (it may be moved later; nothing depends on it).
        sparse_backend: ``auto``, ``torch`` or ``spconv`` (:mod:`gigassl.sparse.conv`).
        head: the architecture (:class:`HeadSpec`); default ResNet18's, or ``layer4_source``'s.

    ``pool`` gives the slide representation (B, W) used at inference; ``forward`` the (B,
    projector_dim) projection used by the loss. Both take a :class:`~gigassl.sparse.maps.SparseBatch`
    or the backend's sparse tensor of (N, D) features. ``feature_dim`` (D) and ``slide_dim`` (W)
    say what goes in and out. The state dict holds plain tensors only, the same for both backends.
    """

    def __init__(
        self,
        layer4_source: nn.Module | None = None,
        projector_dim: int = 256,
        device: torch.device | str = "cpu",
        sparse_backend: str = "auto",
        head: HeadSpec | None = None,
    ) -> None:
        super().__init__()
        device = torch.device(device)
        dense = None if layer4_source is None else getattr(layer4_source, "layer4", layer4_source)
        if dense is not None:
            found = HeadSpec.of_layer4(cast(nn.Sequential, dense))  # a ResNet's layer4, or that stage itself
            if (
                head is not None
                and dataclasses.replace(head, feature_dim=head.layer4_in, input_projection_dim=0, source=found.source) != found
            ):
                raise UserError(f"the layer4 given ({found}) does not have the shape of the head asked for ({head})")
            head = head or found
        head = head or HeadSpec()
        self.head, self.projector_dim = head, projector_dim
        self.feature_dim, self.slide_dim = head.feature_dim, head.width
        self.sparse_backend = resolve_backend(sparse_backend, device)
        self.input_projection = (
            nn.Linear(head.feature_dim, head.input_projection_dim, bias=False) if head.input_projection_dim else None
        )
        self.layer4 = SparseLayer4(self.sparse_backend, head.layer4_in, head.width, head.block, head.n_blocks)
        if dense is None:
            dense = dense_layer4(head.layer4_in, head.width, head.block, head.n_blocks)
        self.layer4.load_dense(dense)
        width = head.width
        self.projector = nn.Sequential(
            nn.Linear(width, width),
            nn.BatchNorm1d(width),
            nn.ReLU(inplace=True),
            nn.Linear(width, width),
            nn.BatchNorm1d(width),
            nn.ReLU(inplace=True),
            nn.Linear(width, projector_dim),
        )
        self.to(device)

    def _as_sparse(self, x: SparseBatch | SparseTensor) -> SparseTensor:
        if not isinstance(x, SparseBatch):
            return x
        # the parameters' device, not the one given at construction: the model may have moved
        x = x.to(cast(torch.Tensor, self.projector[0].weight).device, non_blocking=True)
        return make_sparse_tensor(x.features, x.indices, x.spatial_shape, x.batch_size, self.sparse_backend)

    def site_features(self, x: SparseBatch | SparseTensor) -> SparseTensor:
        """Sparse maps of (N, D) tiles → the layer4's (M, W) output sites, (batch, y, x) indices;
        ``pool`` averages them per map (:mod:`gigassl.classifier.attribution` splits that mean into site terms)."""
        x = self._as_sparse(x)
        if self.input_projection is not None:
            x = x.replace_feature(self.input_projection(x.features))  # (N, D) → (N, P), per site
        return self.layer4(x)

    def pool(self, x: SparseBatch | SparseTensor) -> torch.Tensor:
        """Sparse maps of (N, D) tiles → (B, W) slide representations (mean over each map's active sites)."""
        out = self.site_features(x)
        return mean_per_map(out.features, out.indices[:, 0], out.batch_size)

    def forward(self, x: SparseBatch | SparseTensor) -> torch.Tensor:
        """Sparse maps → (B, projector_dim) projections."""
        return self.projector(self.pool(x))
