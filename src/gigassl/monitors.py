"""Label-free monitors of a self-supervised embedding, computed on a (B, D) batch of outputs.

- ``collapse_level``: 1 − √D · (mean over dims of the per-dim std of the L2-normalised rows);
  0 when the rows are spread like a uniform distribution on the sphere, 1 when all rows are
  the same vector (complete collapse). As in lightly's SimSiam example, unbiased std.
- ``rankme``: Garrido et al., "RankMe: Assessing the downstream performance of pretrained
  self-supervised representations by their rank", ICML 2023: exp of the entropy of the
  singular values normalised to sum to 1 (ε = 1e-7); between 1 and min(B, D).
- ``odcorr``: kaiko.ai's off-diagonal correlation monitor: mean absolute Pearson correlation
  between different feature dimensions over the batch; 0 for decorrelated features, 1 when
  every dimension is an affine function of one. Constant dimensions count as uncorrelated.

All take a torch tensor or a numpy array and return a Python float; computed in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch

RANKME_EPS = 1e-7


def _as_matrix(z: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    z = torch.as_tensor(z).detach().to(dtype=torch.float64)
    if z.ndim != 2 or z.shape[0] < 2 or z.shape[1] < 1:
        raise ValueError(f"{name} needs a (B, D) batch with B ≥ 2, got shape {tuple(z.shape)}")
    if not torch.isfinite(z).all():
        raise ValueError(f"{name}: the outputs hold NaN or inf")
    return z


def collapse_level(z: torch.Tensor | np.ndarray) -> float:
    """1 − √D · mean_d std_b(z_b / ‖z_b‖)[d] for (B, D) outputs; 0 ≈ no collapse, 1 = collapse."""
    z = _as_matrix(z, "collapse_level")
    normalised = torch.nn.functional.normalize(z, dim=1)
    return float(1.0 - math.sqrt(z.shape[1]) * normalised.std(dim=0).mean().item())


def rankme(z: torch.Tensor | np.ndarray) -> float:
    """exp(entropy of σ / ‖σ‖₁) of the singular values σ of the (B, D) outputs."""
    z = _as_matrix(z, "rankme")
    singular = torch.linalg.svdvals(z)
    p = singular / (singular.sum() + RANKME_EPS) + RANKME_EPS
    return float(torch.exp(-(p * torch.log(p)).sum()).item())


def odcorr(z: torch.Tensor | np.ndarray) -> float:
    """Mean |Pearson correlation| over pairs of different dimensions of the (B, D) outputs."""
    z = _as_matrix(z, "odcorr")
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
