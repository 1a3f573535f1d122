"""What a training run carries from step to step and epoch to epoch, whichever the job.

:class:`TrainingRun` holds what MoCo pre-training and Giga-SSL training have in common: where the
process stands under torchrun (:class:`extract.device.DistContext`), the model and what the steps
run (the model, or its DDP wrapper), the optimiser and the loss scaler, the plan (epochs, steps
per epoch), how far the run has got (epochs done, global step, one monitor row per epoch) and the
output folder. Each job extends it with its own fields (:class:`extract.moco.setup.MocoRun`,
:class:`gigassl.training.loop.Run`); its checkpoint functions take the run rather than its parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from extract.device import DistContext


@dataclass(kw_only=True)
class TrainingRun:
    """A training run's state; ``epoch`` counts the epochs done, ``global_step`` the steps done."""

    context: DistContext
    model: nn.Module
    trained: nn.Module  # what the steps run: the trained module, wrapped in DDP under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    out: Path
    epochs: int  # the epochs planned in all
    steps_per_epoch: int
    epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one monitor row per epoch

    @property
    def device(self) -> torch.device:
        return self.context.device

    @property
    def is_main(self) -> bool:
        return self.context.is_main

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs
