"""The training loop of ``gigassl train``: what a run carries, its optimiser, its epochs and steps.

The run is a :class:`extract.training.run_state.TrainingRun` (the state MoCo's loop carries too)
with stage 2's own fields (:class:`Run`).

:mod:`gigassl.train` sets a run up (cohort, model, data loader, output folder) and hands it to
:func:`run_epochs`; each step forwards two views per slide, takes NT-Xent over the global batch and
steps Adam under the warm-up + cosine schedule; each epoch appends a row to the monitors, writes the
monitors files and, every ``checkpoint_every`` epochs, a checkpoint (main rank only).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
from torch import nn

from extract.checkpoints.sealed import CheckpointIntegrityError
from extract.device import autocast, autocast_dtype
from extract.errors import UserError
from extract.monitors import write_monitors
from extract.training.run_state import TrainingRun
from extract.training.schedule import WarmupCosine, replan_schedule
from gigassl.config import TrainConfig
from gigassl.model import GigaSSLModel
from gigassl.training import loss as losses
from gigassl.training.checkpoint import LATEST_CHECKPOINT, rng_state, set_rng_state, write_checkpoint
from gigassl.training.data import EpochBatchSampler, SlideViewDataset, ViewBatch
from gigassl.training.distributed import all_reduce_mean
from gigassl.training.monitors import monitor_metrics, stall_warning

log = logging.getLogger(__name__)

MONITOR_COLUMNS = (
    "epoch",
    "global_step",
    "lr",
    "train_loss",
    "train_accuracy",
    "grad_norm",
    "data_share",
    "epoch_time_s",
    "loss",
    "positive_pair_accuracy",
    "collapse_level",
    "rankme",
    "odcorr",
)


class TrainingDivergedError(UserError):
    """The loss became NaN or inf; the run stopped and the last good checkpoint was kept."""


def needs_grad_scaling(amp_dtype: Optional[torch.dtype], sparse_backend: str) -> bool:
    """Loss scaling is needed when some of the forward pass runs in float16: autocast in fp16,
    or spconv under any CUDA autocast (its convolutions cast to fp16 even inside bf16 autocast)."""
    return amp_dtype == torch.float16 or (amp_dtype is not None and sparse_backend == "spconv")


def restore_scaler(scaler: torch.amp.GradScaler, saved: Mapping[str, Any]) -> None:
    """Load a checkpoint's GradScaler state when it has one; a run saved without scaling (on the
    CPU, or in bf16) resumed with scaling starts from a fresh scaler instead of an empty state."""
    if scaler.is_enabled() and saved:
        scaler.load_state_dict(dict(saved))


def _grad_norm(model: nn.Module) -> float:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


@dataclass
class Optimisation:
    """What steps the weights: Adam, its warm-up + cosine schedule, the loss scaler, the autocast dtype."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: Optional[torch.dtype]


def make_optimisation(
    config: TrainConfig, model: GigaSSLModel, batch: int, steps_per_epoch: int, device: torch.device
) -> Optimisation:
    """Adam at ``lr`` scaled linearly with the global batch, scheduled per step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr * batch / 256, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(config.warmup_epochs * steps_per_epoch, steps_per_epoch * config.epochs)
    )
    amp_dtype = autocast_dtype(device) if config.mixed_precision else None
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaling(amp_dtype, model.sparse_backend))
    return Optimisation(optimizer, scheduler, scaler, amp_dtype)


@dataclass(kw_only=True)
class Run(TrainingRun):
    """What a Giga-SSL run carries beyond :class:`extract.training.run_state.TrainingRun`: its
    settings, the schedule and autocast dtype, the global batch, the monitor slides, the checkpoint
    fields fixed for the run and whether the stall warning was given."""

    model: GigaSSLModel
    config: TrainConfig
    scheduler: torch.optim.lr_scheduler.LambdaLR
    amp_dtype: Optional[torch.dtype]
    batch: int  # the global batch
    monitor_dataset: SlideViewDataset
    monitor_indices: list[int]
    base: dict[str, Any] = field(default_factory=dict)  # the checkpoint fields fixed for the run
    stall_warned: bool = False

    @property
    def latest(self) -> Path:
        return self.out / LATEST_CHECKPOINT

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def monitors(self) -> dict[str, float]:
        """The monitor slides' columns of this epoch's row."""
        return monitor_metrics(self.model, self.monitor_dataset, self.monitor_indices, self.config.temperature, self.device)

    def checkpoint(self) -> dict[str, Any]:
        """Everything needed to continue exactly after the epochs done (plain data)."""
        return dict(
            self.base,
            epoch=self.epoch,
            global_step=self.global_step,
            history=self.history,
            model={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            rng=rng_state(),
        )


def restore_run(run: Run, resume: Mapping[str, Any]) -> int:
    """Continue from a checkpoint: weights, optimiser, schedule (re-planned when ``--epochs``
    changed), scaler, RNG and monitor rows; returns the epochs it had done."""
    config = run.config
    run.model.load_state_dict(resume["model"])
    run.optimizer.load_state_dict(resume["optimizer"])
    run.scheduler.load_state_dict(resume["scheduler"])
    restore_scaler(run.scaler, resume["scaler"])
    set_rng_state(resume["rng"])
    run.history = [dict(row) for row in resume["history"]]
    run.epoch, run.global_step = int(resume["epoch"]), int(resume["global_step"])
    log.info("resuming from %s at epoch %d (step %d)", config.resume, run.epoch, run.global_step)
    planned = int(resume["config"]["epochs"])
    if planned != config.epochs:
        before, now = replan_schedule(run.scheduler, config.warmup_epochs * run.steps_per_epoch, run.total_steps)
        log.info(
            "the run planned %d epochs, now %d: schedule re-planned over %d epochs; lr at step %d: %.4g → %.4g",
            planned,
            config.epochs,
            config.epochs,
            run.global_step,
            before,
            now,
        )
    return run.epoch


def run_epochs(run: Run, loader: torch.utils.data.DataLoader, sampler: EpochBatchSampler) -> None:
    """Train from epoch ``run.epoch`` + 1 to the last: steps, monitors, monitors files and checkpoints."""
    from extract.progress import progress as progress_bar

    config, context, start_epoch = run.config, run.context, run.epoch
    progress = progress_bar(
        total=run.total_steps, initial=run.global_step, unit="step", disable=not context.is_main, desc="gigassl train", log=log
    )
    run.trained.train()
    # One pass of the loader runs through all remaining epochs (the keys carry the epoch), so
    # workers prefetch across epoch boundaries and while the monitors are computed.
    sampler.set_epoch(start_epoch + 1, max(start_epoch + 1, config.epochs))
    batches = iter(loader) if start_epoch < config.epochs else iter(())
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            row = _train_epoch(run, batches, epoch, progress)
            row.update(run.monitors())
            run.history.append(row)
            run.epoch = epoch
            if context.is_main:
                _finish_epoch(run, epoch)
    finally:
        del batches  # shuts the workers down
        progress.close()
        run.monitor_dataset.close()


def _train_epoch(run: Run, batches: Iterator[ViewBatch], epoch: int, progress: Any) -> dict[str, float]:
    """The epoch's steps; returns its row of ``monitors.csv`` but the monitor slides' columns."""
    sums = dict(loss=0.0, accuracy=0.0, grad_norm=0.0)
    data_time = 0.0
    epoch_start = tick = time.perf_counter()
    for step in range(1, run.steps_per_epoch + 1):
        views = next(batches)
        data_time += time.perf_counter() - tick
        loss, accuracy = _step(run, views)
        if not math.isfinite(loss):
            raise TrainingDivergedError(
                f"the loss became {loss} at epoch {epoch}, step {step} (global step {run.global_step + 1}); "
                f"stopped. The last good checkpoint is {_last_good(run)}. "
                "Lower --lr, raise --temperature, or check the features"
            )
        sums["grad_norm"] += _grad_norm(run.model)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        run.global_step += 1
        sums["loss"] += loss
        sums["accuracy"] += accuracy
        progress.update(1)
        progress.set_postfix(epoch=epoch, loss=f"{loss:.4f}")
        tick = time.perf_counter()
    elapsed = time.perf_counter() - epoch_start
    n = run.steps_per_epoch
    return dict(
        epoch=epoch,
        global_step=run.global_step,
        lr=run.lr(),
        train_loss=sums["loss"] / n,
        train_accuracy=sums["accuracy"] / n,
        grad_norm=sums["grad_norm"] / n,
        data_share=data_time / max(elapsed, 1e-9),
        epoch_time_s=elapsed,
    )


def _finish_epoch(run: Run, epoch: int) -> None:
    """(Main rank) the epoch's monitors written and logged, the stall check, the checkpoint."""
    config, batch, row = run.config, run.batch, run.history[-1]
    write_monitors(run.out, run.history, MONITOR_COLUMNS)
    log.info(
        "epoch %d/%d: train loss %.4f (constant output %.4f), train positive-pair accuracy %.3f "
        "(chance %.3f, batches of %d slides); monitor loss %.4f, monitor positive-pair accuracy %.3f "
        "(chance %.3f, %d fixed slides), RankMe %.1f, data %.0f%%",
        epoch,
        config.epochs,
        row["train_loss"],
        losses.constant_output_loss(batch),
        row["train_accuracy"],
        1 / (2 * batch - 1),
        batch,
        row["loss"],
        row["positive_pair_accuracy"],
        1 / (2 * len(run.monitor_indices) - 1),
        len(run.monitor_indices),
        row["rankme"],
        100 * row["data_share"],
    )
    # once, after the warm-up, on the last epochs' mean (one epoch of few steps is noisy)
    if epoch == config.warmup_epochs + max(1, config.epochs // 10) or epoch == config.epochs:
        recent = [r for r in run.history if "train_loss" in r][-max(1, config.epochs // 10) :]
        warning = stall_warning(
            float(np.mean([r["train_loss"] for r in recent])), float(np.mean([r["train_accuracy"] for r in recent])), batch
        )
        if warning and not run.stall_warned:
            log.warning("epoch %d: %s", epoch, warning)
            run.stall_warned = True
    if epoch % config.checkpoint_every == 0 or epoch == config.epochs:
        try:
            write_checkpoint(run.out, epoch, run.checkpoint(), config.keep_checkpoints)
        except CheckpointIntegrityError as error:  # NaN or inf weights: never written, so never resumed from
            raise TrainingDivergedError(f"epoch {epoch}: {error}. The last good checkpoint is {_last_good(run)}") from error


def _last_good(run: Run) -> str:
    """The run's latest checkpoint (each is checked finite when written and verified when resumed
    from), or a note that there is none."""
    if run.latest.is_file():
        return str(run.latest)
    if run.config.resume is not None:  # resumed from outside ``out``: that file verified when it was loaded
        return str(run.config.resume)
    return "none (none written yet): start again with --overwrite"


def _step(run: Run, views: ViewBatch) -> tuple[float, float]:
    """Forward both views, NT-Xent over the global batch, backward (gradients left unscaled).

    Returns the global-batch loss and positive-pair accuracy (the same on every rank).
    """
    device = run.device
    n = views.n_slides
    run.optimizer.zero_grad(set_to_none=True)
    with autocast(device, enabled=run.amp_dtype is not None):
        z = run.trained(views.sparse.to(device, non_blocking=True))  # (2n, projector_dim)
    z = z.float()
    z1, z2 = z[:n], z[n:]
    loss = losses.nt_xent_distributed(z1, z2, run.config.temperature)  # = nt_xent on one process
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    with torch.no_grad():
        accuracy = losses.positive_pair_accuracy(
            losses.gather_with_gradient(z1.detach()), losses.gather_with_gradient(z2.detach())
        )
        reported = all_reduce_mean(loss.detach(), run.context)  # each rank's loss is its anchors' mean
    return float(reported), float(accuracy)
