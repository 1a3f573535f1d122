"""How attention-MIL is trained: input standardisation, the learning-rate schedule, the stop rule.

- **Standardisation.** Tile features of a frozen encoder (post-ReLU means of a ResNet block) are
  all positive, with per-dimension scales that differ by orders of magnitude; AverageMIL
  standard-scales them before its regression, and attention-MIL gets the same: the per-dimension
  mean and standard deviation over every tile of the *training* bags (never the test bags),
  applied before the first layer while training. After training the map is folded into that
  first layer (``W x' + b`` with ``x' = (x − m) / s`` is ``(W / s) x + (b − W m / s)``), so the
  fitted network takes raw features, exactly as before: ``gigassl fit``, ``predict``,
  ``explain`` and top-k fine-tuning read it unchanged.
- **Schedule.** ``constant`` (CLAM), ``cosine`` (decay to 0 over the planned steps) or
  ``one-cycle`` (STAMP: warm-up to ``lr`` over the first 30 % of the steps, from ``lr / 25``,
  then cosine annealing), stepped once per optimiser step.
- **Stop rule.** With a validation share > 0, training stops after ``patience`` epochs
  without a better validation loss, not before ``min_epochs``, and keeps the best weights; with
  0 (or too few bags per class for an inner split) it runs the fixed number of epochs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from gigassl.config import MIL_LR_SCHEDULES as LR_SCHEDULES

ONE_CYCLE_DIV_FACTOR = 25.0  # STAMP's div_factor: the cycle starts at lr / 25


def fit_standardisation(bags: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(D,) mean and (D,) standard deviation over every tile of ``bags`` (float64; a constant
    dimension gets scale 1, so it maps to 0 instead of dividing by 0)."""
    total = np.zeros(bags[0].shape[1], dtype=np.float64)
    squares = np.zeros_like(total)
    n = 0
    for bag in bags:  # one pass, one bag at a time: no concatenated copy of the cohort
        values = np.asarray(bag, dtype=np.float64)
        total += values.sum(axis=0)
        squares += np.square(values).sum(axis=0)
        n += len(values)
    mean = total / n
    variance = np.maximum(squares / n - np.square(mean), 0.0)
    scale = np.sqrt(variance)
    return mean, np.where(scale > 1e-12 * max(1.0, float(np.abs(mean).max())), scale, 1.0)


def fold_standardisation(first_layer: nn.Linear, mean: np.ndarray, scale: np.ndarray) -> None:
    """Fold ``x' = (x − mean) / scale`` into ``first_layer`` in place, so that it takes raw ``x``."""
    with torch.no_grad():
        weight = first_layer.weight.double()  # (H, D)
        inverse = torch.as_tensor(1.0 / scale, dtype=torch.float64, device=weight.device)
        shift = torch.as_tensor(mean, dtype=torch.float64, device=weight.device)
        folded = weight * inverse  # (H, D): W / s
        first_layer.bias.copy_((first_layer.bias.double() - folded @ shift).to(first_layer.bias.dtype))
        first_layer.weight.copy_(folded.to(first_layer.weight.dtype))


class Standardiser:
    """Applies a fitted (mean, scale) to padded (B, N, D) feature tensors; identity when unfitted."""

    def __init__(self, mean: np.ndarray | None, scale: np.ndarray | None, device: torch.device) -> None:
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32, device=device)
        self.scale = None if scale is None else torch.as_tensor(scale, dtype=torch.float32, device=device)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        if self.mean is None or self.scale is None:
            return features
        return (features - self.mean) / self.scale  # padded rows change too, but they are masked


def make_scheduler(
    optimiser: torch.optim.Optimizer, schedule: str, lr: float, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-step learning-rate schedule (None for ``constant``)."""
    if schedule == "constant":
        return None
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(1, total_steps))
    if schedule == "one-cycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimiser, max_lr=lr, total_steps=max(2, total_steps), div_factor=ONE_CYCLE_DIV_FACTOR
        )
    raise ValueError(f"attention-MIL lr schedule {schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")


class EarlyStopping:
    """Patience on the validation loss, not before ``min_epochs``; remembers the best weights."""

    def __init__(self, patience: int, min_epochs: int = 0) -> None:
        self.patience, self.min_epochs = patience, min_epochs
        self.best_loss, self.stale = float("inf"), 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int, loss: float, model: nn.Module) -> bool:
        """Record epoch ``epoch``'s validation loss; True when training should stop."""
        if loss < self.best_loss - 1e-4:
            self.best_loss, self.stale = loss, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.stale += 1
        return self.stale >= self.patience and epoch + 1 >= self.min_epochs
