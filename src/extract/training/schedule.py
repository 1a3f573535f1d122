"""The learning-rate schedule of both training jobs: linear warm-up, then cosine decay to 0.

Per step, as the original code: over the first ``warmup`` steps the factor on the peak learning
rate rises linearly to 1, then follows half a cosine to 0 at the last step (:class:`WarmupCosine`).
Giga-SSL training (``--warmup-epochs`` × steps-per-epoch warm-up steps) uses it as the factor of a
``LambdaLR``; MoCo pre-training (no warm-up) sets each step's learning rate from
:meth:`WarmupCosine.lr`. A resumed Giga-SSL run whose ``--epochs`` changed is re-planned
(:func:`replan_schedule`): from the resumed step on, the learning rate is the one a run started
with the new total would use at that step.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


class WarmupCosine:
    """lr factor at step s: linear warm-up over ``warmup`` steps, then cosine to 0 at ``total``.

    A callable object (not a lambda) so that ``LambdaLR.state_dict`` stores its plain fields.
    """

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def lr(self, peak_lr: float, step: int) -> float:
        """The learning rate at ``step``: ``peak_lr`` × the factor (as ``LambdaLR`` computes it)."""
        return peak_lr * self(step)


def warmup_warning(warmup_epochs: int, epochs: int) -> Optional[str]:
    """A message when the run ends inside its linear warm-up, else None."""
    if warmup_epochs < max(epochs, 1) or warmup_epochs == 0:
        return None
    return (
        f"--warmup-epochs {warmup_epochs} ≥ --epochs {epochs}: the run ends during the linear warm-up, so the "
        f"learning rate reaches only {100 * min(1.0, epochs / warmup_epochs):.0f}% of --lr and the cosine decay "
        "never starts; lower --warmup-epochs (the original: 10 of 1000 epochs)"
    )


def replan_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, warmup_steps: int, total_steps: int) -> tuple[float, float]:
    """Plan a loaded scheduler over ``total_steps`` (``load_state_dict`` restores the saved run's
    total) and set the learning rate of the resumed step; returns (lr before, lr now)."""
    before = float(scheduler.get_last_lr()[0])
    lrs = []
    for group, schedule in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        if not isinstance(schedule, WarmupCosine):
            raise TypeError(f"replan_schedule needs a LambdaLR of WarmupCosine, got {schedule!r}")
        schedule.warmup_steps, schedule.total_steps = warmup_steps, total_steps
        group["lr"] = group["initial_lr"] * schedule(scheduler.last_epoch)
        lrs.append(group["lr"])
    scheduler._last_lr = lrs  # what get_last_lr() reports until the next step
    return before, float(lrs[0])
