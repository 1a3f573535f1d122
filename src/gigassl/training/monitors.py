"""Label-free monitors of Giga-SSL training, and the warning that the loss has stalled.

On a (B, D) batch of outputs (a torch tensor or a numpy array; a Python float, computed in float64):

- ``collapse_level``: 1 − √D · (mean over dims of the per-dim std of the L2-normalised rows);
  0 when the rows are spread like a uniform distribution on the sphere, 1 when all rows are
  the same vector (complete collapse). As in lightly's SimSiam example, unbiased std.
- ``rankme``: RankMe (Garrido et al., ICML 2023), shared with MoCo: :func:`extract.monitors.rankme`
  (ε = 1e-7); between 1 and min(B, D).
- ``odcorr``: kaiko.ai's off-diagonal correlation monitor: mean absolute Pearson correlation
  between different feature dimensions over the batch; 0 for decorrelated features, 1 when
  every dimension is an affine function of one. Constant dimensions count as uncorrelated.

:func:`monitor_metrics` computes them, with the loss and the positive-pair accuracy, on fixed
views of fixed slides each epoch (the rows of ``monitors.csv``); :func:`stall_warning` says when
the training loss sits at the level of a constant output.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn

from extract.monitors import monitor_batch, rankme
from gigassl.model import GigaSSLModel
from gigassl.training import loss as losses
from gigassl.training.data import SlideViewDataset, collate_slide_views

__all__ = ["batch_statistics", "collapse_level", "monitor_metrics", "odcorr", "rankme", "stall_warning"]

# share of log(2B − 1) above which an epoch's mean loss counts as "at the constant-output level"
STALL_LOSS_SHARE = 0.95


def collapse_level(z: torch.Tensor | np.ndarray) -> float:
    """1 − √D · mean_d std_b(z_b / ‖z_b‖)[d] for (B, D) outputs; 0 ≈ no collapse, 1 = collapse."""
    z = monitor_batch(z, "collapse_level")
    normalised = torch.nn.functional.normalize(z, dim=1)
    return float(1.0 - math.sqrt(z.shape[1]) * normalised.std(dim=0).mean().item())


def odcorr(z: torch.Tensor | np.ndarray) -> float:
    """Mean |Pearson correlation| over pairs of different dimensions of the (B, D) outputs."""
    z = monitor_batch(z, "odcorr")
    d = z.shape[1]
    if d < 2:
        raise ValueError(f"odcorr needs at least two dimensions, got {d}")
    centred = z - z.mean(dim=0, keepdim=True)
    norms = centred.norm(dim=0)
    # a constant dimension (up to rounding) correlates with nothing: zero it
    constant = norms <= 1e-9 * z.abs().amax(dim=0) * math.sqrt(z.shape[0])
    scaled = torch.where(constant, torch.zeros_like(centred), centred / torch.where(constant, torch.ones_like(norms), norms))
    correlation = scaled.T @ scaled  # (D, D)
    off_diagonal = correlation.abs().sum() - correlation.diagonal().abs().sum()
    return float(off_diagonal.item() / (d * (d - 1)))


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Batch norm normalising with the batch's statistics (as in training) while leaving the
    running statistics and every other buffer untouched."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    was_training = model.training
    model.train()
    for m in norms:
        m.momentum = 0.0  # running = 1·running + 0·batch: unchanged
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if m.num_batches_tracked is not None and tracked is not None:  # None: no running statistics
                m.num_batches_tracked.copy_(tracked)
        model.train(was_training)


@torch.no_grad()
def monitor_metrics(
    model: GigaSSLModel,
    dataset: SlideViewDataset,
    indices: list[int],
    temperature: float,
    device: torch.device,
    batch: int = 256,
) -> dict[str, float]:
    """Label-free monitors on fixed views of ``indices``, batch norm on batch statistics.

    Batch statistics rather than the running ones, so that the monitors measure the function
    the loss trains (the running statistics lag behind early in training). Under DDP every
    rank runs this on the same slides (its batch norm all-reduces identical statistics).
    """
    pooled, projected = [], []
    with batch_statistics(model):
        for start in range(0, len(indices), batch):
            chunk = indices[start : start + batch]
            views = collate_slide_views([dataset[(0, index)] for index in chunk])
            h = model.pool(views.sparse.to(device))  # (2b, W)
            pooled.append(h.float())
            projected.append(model.projector(h).float())
    n = len(indices)
    h = torch.cat([torch.cat([p[: len(p) // 2] for p in pooled]), torch.cat([p[len(p) // 2 :] for p in pooled])])
    z = torch.cat([torch.cat([p[: len(p) // 2] for p in projected]), torch.cat([p[len(p) // 2 :] for p in projected])])
    z1, z2 = z[:n], z[n:]
    return {
        "loss": float(losses.nt_xent(z1, z2, temperature)),
        "positive_pair_accuracy": float(losses.positive_pair_accuracy(z1, z2)),
        "collapse_level": float(collapse_level(z)),
        "rankme": float(rankme(h)),
        "odcorr": float(odcorr(h)),
    }


def stall_warning(train_loss: float, train_accuracy: float, batch: int) -> Optional[str]:
    """A message when an epoch's mean training loss sits at NT-Xent's constant-output level
    log(2B − 1) (:func:`gigassl.training.loss.constant_output_loss`), else None.

    Measured on the demo cohort (random tile encoder, A = 8, K = 16, batch 20): the loss goes
    from 5.8 to 3.57 ≈ log 39 = 3.66 within 10 epochs and stays there, collapse level 0.81,
    positive-pair accuracy 0.06: in those features a slide's bank augmentations differ more than
    slides do, so there is nothing for the loss to learn but a constant.
    """
    level = losses.constant_output_loss(batch)
    if not train_loss >= STALL_LOSS_SHARE * level:
        return None
    return (
        f"the training loss {train_loss:.3f} is at the level of a constant output, log(2B − 1) = {level:.3f} "
        f"for a batch of {batch} slides (train positive-pair accuracy {train_accuracy:.3f}, chance {1 / (2 * batch - 1):.3f}): "
        "the model does not tell a slide's two views from other slides' views and is collapsing. Usual causes: tile "
        "features whose bank augmentations move a slide more than slides differ (a random or weak tile encoder), "
        "too few tiles per view, or too high a learning rate"
    )
