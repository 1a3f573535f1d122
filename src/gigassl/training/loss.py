"""NT-Xent (SimCLR's normalised temperature-scaled cross-entropy), direct and DDP-aware.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020.
For a batch of B slides with two views each, every one of the 2B views is an anchor whose
positive is the other view of its slide and whose negatives are the 2B − 2 other views; the loss
is the mean over the 2B anchors of the cross-entropy of cosine similarities / temperature. This
is pytorch-metric-learning's ``NTXentLoss`` with labels ``arange(B)`` repeated twice (it averages
over the 2B positive pairs), computed without PML's pair mining: one (2B, 2B) matrix product.

Under ``torch.distributed`` the embeddings of every rank are gathered (the local slice keeps its
gradient), each rank computes the loss of its own anchors against the global batch, and DDP's
gradient averaging then gives exactly the gradient of the single-process loss on the global
batch. Without an initialised process group the rank is 0 and the world size 1.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx

from extract.device import rank, world_size


class _GatherWithGradient(torch.autograd.Function):
    """all_gather whose backward returns this rank's share of the summed gradients."""

    @staticmethod
    def forward(ctx: FunctionCtx, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        gathered = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return tuple(gathered)

    @staticmethod
    def backward(ctx: FunctionCtx, *grads: torch.Tensor) -> torch.Tensor:
        # every rank's loss depends on every rank's embeddings: sum the gradients of all ranks
        stacked = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return stacked[rank()]


def gather_with_gradient(tensor: torch.Tensor) -> torch.Tensor:
    """(b, D) per rank → (world·b, D), rank order; gradients flow back to each rank's slice.

    Every rank must pass the same b (use ``drop_last=True``). Identity without distributed.
    """
    if world_size() == 1:
        return tensor
    return torch.cat(_GatherWithGradient.apply(tensor), dim=0)


def _nt_xent_anchors(z1_all: torch.Tensor, z2_all: torch.Tensor, offset: int, b: int, temperature: float) -> torch.Tensor:
    """Mean NT-Xent of the 2b anchors at rows offset … offset + b of each view, against all 2N views."""
    n_global = len(z1_all)
    views = torch.cat([z1_all, z2_all])  # (2N, D)
    if views.dtype in (torch.float16, torch.bfloat16):
        views = views.float()  # cosines scaled by 1/0.05 need fp32: half precision errs by ~0.02
    local = torch.arange(offset, offset + b, device=views.device)
    self_column = torch.cat([local, local + n_global])  # an anchor is not its own negative
    positive_column = torch.cat([local + n_global, local])
    with torch.autocast(views.device.type, enabled=False):
        views = F.normalize(views, dim=1)
        anchors = views if b == n_global else views[self_column]  # (2b, D)
        logits = anchors @ views.T / temperature  # (2b, 2N)
    rows = torch.arange(2 * b, device=views.device)
    logits = logits.index_put((rows, self_column), torch.tensor(float("-inf"), dtype=logits.dtype, device=views.device))
    return F.cross_entropy(logits, positive_column)


def _check_pair(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> None:
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both have shape (B, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if len(z1) < 1:
        raise ValueError("NT-Xent needs at least one pair of views")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """NT-Xent of two views, one process. Shape: z1, z2 (B, D), row i = the same slide → scalar.

    With B = 1 the only candidate is the positive and the loss is 0.
    """
    _check_pair(z1, z2, temperature)
    return _nt_xent_anchors(z1, z2, 0, len(z1), temperature)


def nt_xent_distributed(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """NT-Xent over the global batch of all ranks. Shape: z1, z2 (b, D) local → scalar.

    Returns this rank's anchors' mean loss; the mean of that value over ranks equals
    :func:`nt_xent` on the concatenated global batch, and after DDP's gradient averaging the
    parameter gradients are those of the single-process loss. Equals :func:`nt_xent` when not
    distributed.
    """
    _check_pair(z1, z2, temperature)
    if world_size() == 1:
        return nt_xent(z1, z2, temperature)
    z1_all, z2_all = gather_with_gradient(z1), gather_with_gradient(z2)
    return _nt_xent_anchors(z1_all, z2_all, rank() * len(z1), len(z1), temperature)


def constant_output_loss(n_slides: int) -> float:
    """NT-Xent of B slides whose 2B views all map to one vector: log(2B − 1).

    Every candidate is then as likely as the positive. A loss that settles here means the model
    found nothing that tells a slide's two views from the other slides' views: unrelated
    positives score higher than this (more so at low temperature), so a constant output is the
    loss's optimum when the views carry no slide signal.
    """
    if n_slides < 1:
        raise ValueError(f"need at least one slide, got {n_slides}")
    return math.log(max(2 * n_slides - 1, 1))


@torch.no_grad()
def positive_pair_accuracy(z1: torch.Tensor, z2: torch.Tensor) -> float:
    """Share of the 2B views whose most similar other view (cosine) is their positive. z1, z2 (B, D)."""
    _check_pair(z1, z2, 1.0)
    b = len(z1)
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    similarity = z @ z.T  # (2B, 2B)
    similarity.fill_diagonal_(float("-inf"))
    positive = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return (similarity.argmax(dim=1) == positive).float().mean().item()
