"""What both training jobs monitor without labels, and the per-epoch files they write it to.

- :func:`rankme`: Garrido et al., "RankMe: Assessing the downstream performance of pretrained
  self-supervised representations by their rank", ICML 2023: exp of the entropy of the
  singular values σ of a (B, D) batch, normalised to sum to 1: p = σ / (‖σ‖₁ + ε) + ε with
  ε = 1e-7 (the paper's ε; the one in the denominator keeps an all-zero batch finite). Between
  1 and min(B, D). Used by MoCo (:mod:`extract.moco.pretrain`, tile features) and Giga-SSL training
  (:mod:`gigassl.training.monitors`, slide representations).
- :func:`alignment` and :func:`uniformity` (Wang & Isola 2020) of normalised views, and
  :func:`fresh_info_nce`, InfoNCE of view pairs against each other without a queue (MoCo).
- :func:`write_monitors`: ``monitors.json`` (the rows as they are) and ``monitors.csv`` (one
  row per epoch, a cell left empty where a row lacks a column).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

RANKME_EPS = 1e-7
MONITORS_CSV = "monitors.csv"
MONITORS_JSON = "monitors.json"


def monitor_batch(z: torch.Tensor | np.ndarray, name: str, min_rows: int = 2) -> torch.Tensor:
    """``z`` as a finite float64 (B, D) tensor with B ≥ ``min_rows``, or a ValueError naming the monitor."""
    z = torch.as_tensor(z).detach().to(dtype=torch.float64)
    if z.ndim != 2 or z.shape[0] < min_rows or z.shape[1] < 1:
        raise ValueError(f"{name} needs a (B, D) batch with B ≥ {min_rows}, got shape {tuple(z.shape)}")
    if not torch.isfinite(z).all():
        raise ValueError(f"{name}: the outputs hold NaN or inf")
    return z


def rankme(z: torch.Tensor | np.ndarray) -> float:
    """exp(entropy of σ / ‖σ‖₁) of the singular values σ of the (B, D) outputs (float64); 1 for one row."""
    z = monitor_batch(z, "rankme", min_rows=1)
    singular = torch.linalg.svdvals(z)
    p = singular / (singular.sum() + RANKME_EPS) + RANKME_EPS
    return float(torch.exp(-(p * torch.log(p)).sum()).item())


def write_monitors(out: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> tuple[Path, Path]:
    """``out/monitors.csv`` and ``out/monitors.json`` of the per-epoch ``rows``.

    ``columns``: the CSV's columns in order (keys a row lacks are empty cells, keys outside
    them are left out of the CSV); default the keys of the last row. Returns (csv, json).
    """
    csv_path, json_path = out / MONITORS_CSV, out / MONITORS_JSON
    json_path.write_text(json.dumps(list(rows), indent=1))
    fieldnames = list(columns) if columns is not None else list(rows[-1]) if rows else []
    if fieldnames:
        with open(csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return csv_path, json_path


def alignment(z1: torch.Tensor, z2: torch.Tensor) -> float:
    """Mean squared distance between normalised positive pairs (Wang & Isola 2020); lower is better."""
    return float((z1 - z2).norm(dim=1).pow(2).mean())


def uniformity(z: torch.Tensor, t: float = 2.0) -> float:
    """log E exp(−t‖zᵢ − zⱼ‖²) over distinct pairs of normalised (N, D); lower is more uniform."""
    return float(torch.pdist(z.double()).pow(2).mul(-t).exp().mean().log())


@torch.no_grad()
def fresh_info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """InfoNCE of normalised (N, D) view pairs against each other (no queue): every negative
    comes from the current encoder, so unlike the training loss it does not move with the queue."""
    logits = z1.double() @ z2.double().T / temperature
    return float(F.cross_entropy(logits, torch.arange(len(z1))))
