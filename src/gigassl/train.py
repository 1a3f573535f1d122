"""``gigassl train``: NT-Xent training of the sparse layer4 + projector on two views per slide.

Defaults follow the paper and the original code (DESIGN.md §2): Adam, lr 0.03 at batch 256
scaled linearly with the global batch, no weight decay, a linear warm-up of ``warmup_epochs``
then a cosine decay to 0, both per step; temperature 0.05; T = 5.

Outputs in ``config.out``:

- ``checkpoint.pt``: the latest checkpoint; ``checkpoints/epoch_NNNN.pt`` every
  ``checkpoint_every`` epochs and at the end (the newest ``keep_checkpoints`` kept); plain
  data, written atomically (:mod:`gigassl.checkpoint`).
- ``monitors.csv`` / ``monitors.json``: one row per epoch (row 0 = before training) with the
  training loss, positive-pair accuracy and gradient norm of the epoch's steps, the share of
  the step time spent waiting for data, and, on a fixed set of ``monitor_slides`` slides with
  fixed views (model in eval mode): loss, positive-pair top-1 accuracy, collapse level,
  RankMe and ODCorr of the slide representations (512-d, 2048-d for ResNet50). ``curves.png`` at the end.

An ``out`` folder that already holds a run (``checkpoint.pt``, ``checkpoints/``, monitors) is
refused unless ``--resume`` continues it or ``--overwrite`` deletes it first.

Resuming: every setting must be the checkpoint's except where outputs go (see
:data:`gigassl.checkpoint.RESUME_FREE_KEYS`) and ``epochs``, which may grow (train a finished
run longer) or shrink down to the epochs already done. The schedule is then re-planned, not
continued: from the resumed step on, the learning rate is the one a run started with the new
``--epochs`` would use at that step (same warm-up, cosine stretched over the new total). So
extending an unfinished run follows exactly the longer run's schedule (views depend only on
the seed and the epoch); extending a finished run raises its learning rate again from ~0 to
the new schedule's value at that step (logged), e.g. from 1000 to 2000 epochs to half the peak.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is joined
(:func:`extract.device.init_distributed`), each rank takes its contiguous share of every global batch,
the loss is NT-Xent over the global batch (embeddings gathered with gradients), gradients
are averaged by DDP, and batch norm uses the statistics of the global batch, so a step equals
the one-process step on the same global batch (:mod:`gigassl.distributed`). ``batch_size`` is
the global batch.

Where the parts live: the settings and their checks in :class:`gigassl.config.TrainConfig`; the
head's initialisation in :mod:`gigassl.initialisation`; the schedule in :mod:`gigassl.schedule`;
the monitors and the stall warning in :mod:`gigassl.monitors` (RankMe and the monitors files in
:mod:`extract.monitors`, shared with MoCo); the run folder and resuming in
:mod:`gigassl.checkpoint`; ``curves.png`` in :mod:`gigassl.plots`.
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
import torch.distributed as dist
from torch import nn

from extract import __version__
from extract.config import settings_dict
from extract.device import DistContext, autocast, autocast_dtype, init_distributed
from extract.encoder import EncoderInfo
from extract.errors import UserError
from extract.monitors import MONITORS_CSV, MONITORS_JSON, write_monitors
from gigassl import loss as losses
from gigassl.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    LATEST_CHECKPOINT,
    check_resume,
    claim_output_folder,
    load_checkpoint,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from gigassl.config import TrainConfig
from gigassl.data import (
    STREAM_MONITOR,
    Cohort,
    EpochBatchSampler,
    SlideViewDataset,
    ViewBatch,
    collate_slide_views,
    global_batch_size,
    scan_features_folder,
)
from gigassl.distributed import all_reduce_mean, use_global_batch_norm
from gigassl.initialisation import initial_head
from gigassl.model import GigaSSLModel
from gigassl.monitors import monitor_metrics, stall_warning
from gigassl.plots import plot_curves
from gigassl.schedule import WarmupCosine, replan_schedule, warmup_warning

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
CURVES_PNG = "curves.png"


class TrainingDivergedError(UserError):
    """The loss became NaN or inf; the run stopped and the last good checkpoint was kept."""


@dataclass(frozen=True)
class TrainResult:
    """What a training run wrote and where it ended."""

    checkpoint: Path
    monitors_csv: Path
    monitors_json: Path
    curves: Optional[Path]
    epochs: int
    global_step: int
    final: dict[str, float]
    exit_code: int = 0

    def format(self) -> str:
        """Where the run ended and what it wrote."""
        labels = dict(train_loss="train loss", positive_pair_accuracy="monitor positive-pair accuracy", rankme="RankMe")
        monitored = ", ".join(f"{label} {self.final[key]:.4g}" for key, label in labels.items() if key in self.final)
        return (
            f"trained {self.epochs} epochs ({self.global_step} steps){': ' + monitored if monitored else ''}\n"
            f"written: {self.checkpoint}, {self.monitors_csv}" + (f", {self.curves}" if self.curves else "")
        )


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The settings as plain JSON-able data (paths as strings)."""
    return settings_dict(config)


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
class _Optimisation:
    """What steps the weights: Adam, its warm-up + cosine schedule, the loss scaler, the autocast dtype."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: Optional[torch.dtype]


def _optimisation(
    config: TrainConfig, model: GigaSSLModel, batch: int, steps_per_epoch: int, device: torch.device
) -> _Optimisation:
    """Adam at ``lr`` scaled linearly with the global batch, scheduled per step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr * batch / 256, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(config.warmup_epochs * steps_per_epoch, steps_per_epoch * config.epochs)
    )
    amp_dtype = autocast_dtype(device) if config.mixed_precision else None
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaling(amp_dtype, model.sparse_backend))
    return _Optimisation(optimizer, scheduler, scaler, amp_dtype)


@dataclass
class _Run:
    """What a training run carries from step to step and epoch to epoch."""

    config: TrainConfig
    context: DistContext
    model: GigaSSLModel
    trained: nn.Module  # the model, or its DDP wrapper under torchrun
    optimisation: _Optimisation
    batch: int  # the global batch
    steps_per_epoch: int
    out: Path
    monitor_dataset: SlideViewDataset
    monitor_indices: list[int]
    base: dict[str, Any] = field(default_factory=dict)  # the checkpoint fields fixed for the run
    history: list[dict[str, float]] = field(default_factory=list)  # the rows of monitors.csv
    global_step: int = 0
    stall_warned: bool = False

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs

    @property
    def latest(self) -> Path:
        return self.out / LATEST_CHECKPOINT

    def lr(self) -> float:
        return float(self.optimisation.scheduler.get_last_lr()[0])

    def monitors(self) -> dict[str, float]:
        """The monitor slides' columns of this epoch's row."""
        return monitor_metrics(
            self.model, self.monitor_dataset, self.monitor_indices, self.config.temperature, self.context.device
        )

    def checkpoint(self, epoch: int) -> dict[str, Any]:
        """Everything needed to continue exactly after ``epoch`` (plain data)."""
        opt = self.optimisation
        return dict(
            self.base,
            epoch=epoch,
            global_step=self.global_step,
            history=self.history,
            model={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            optimizer=opt.optimizer.state_dict(),
            scheduler=opt.scheduler.state_dict(),
            scaler=opt.scaler.state_dict(),
            rng=rng_state(),
        )


def _extraction_seed(cohort: Cohort) -> int:
    """The seed `gigassl extract` ran with (a random tile encoder is drawn from it); 0 if unrecorded."""
    from extract.features_file import SlideFeatures

    with SlideFeatures(cohort.slides[0].path) as slide:
        return int(slide.settings.get("seed", 0))


def _build_model(
    config: TrainConfig, cohort: Cohort, context: DistContext
) -> tuple[GigaSSLModel, nn.Module, Optional[EncoderInfo]]:
    """(the model, what the steps run: the model or its DDP wrapper, the layer4's provenance)."""
    torch.manual_seed(config.seed)  # the projector's initial weights
    resnet, head, init_info = initial_head(config.init, cohort.encoder, cohort.folder, _extraction_seed(cohort))
    model = GigaSSLModel(resnet, config.projector_dim, context.device, config.sparse_backend, head)
    del resnet
    if context.world_size <= 1:
        return model, model, init_info
    use_global_batch_norm(model)
    device = context.device
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, ddp, init_info


def _monitor_slides(cohort: Cohort, config: TrainConfig) -> tuple[SlideViewDataset, list[int]]:
    """The fixed views of ``monitor_slides`` fixed slides (at least 2) the monitors are computed on."""
    dataset = SlideViewDataset(cohort, config.n_tiles_per_view, (config.scale_min, config.scale_max), config.seed, STREAM_MONITOR)
    order = np.random.default_rng([config.seed, STREAM_MONITOR]).permutation(len(cohort.slides))
    return dataset, sorted(int(i) for i in order[: max(2, min(config.monitor_slides, len(cohort.slides)))])


def _restore(run: _Run, resume: Mapping[str, Any]) -> int:
    """Continue from a checkpoint: weights, optimiser, schedule (re-planned when ``--epochs``
    changed), scaler, RNG and monitor rows; returns the epochs it had done."""
    config, opt = run.config, run.optimisation
    run.model.load_state_dict(resume["model"])
    opt.optimizer.load_state_dict(resume["optimizer"])
    opt.scheduler.load_state_dict(resume["scheduler"])
    restore_scaler(opt.scaler, resume["scaler"])
    set_rng_state(resume["rng"])
    run.history = [dict(row) for row in resume["history"]]
    start_epoch, run.global_step = int(resume["epoch"]), int(resume["global_step"])
    log.info("resuming from %s at epoch %d (step %d)", config.resume, start_epoch, run.global_step)
    planned = int(resume["config"]["epochs"])
    if planned != config.epochs:
        before, now = replan_schedule(opt.scheduler, config.warmup_epochs * run.steps_per_epoch, run.total_steps)
        log.info(
            "the run planned %d epochs, now %d: schedule re-planned over %d epochs; lr at step %d: %.4g → %.4g",
            planned,
            config.epochs,
            config.epochs,
            run.global_step,
            before,
            now,
        )
    return start_epoch


def _start_output(out: Path, previous_run: list[Path], config: TrainConfig) -> None:
    """(Main rank) delete the run ``--overwrite`` replaces, report a warm-up as long as the run, create ``out``."""
    if previous_run:
        log.warning("--overwrite: deleting the previous run in %s (%d files)", out, len(previous_run))
        for path in previous_run:
            path.unlink(missing_ok=True)
    if (warning := warmup_warning(config.warmup_epochs, config.epochs)) is not None:
        log.warning("%s", warning)
    out.mkdir(parents=True, exist_ok=True)


def run_training(config: TrainConfig) -> TrainResult:
    """Train, checkpoint and monitor as described in the module docstring."""
    context = init_distributed(config.device)
    try:
        return _train(config, context)
    finally:
        if context.initialised_here:
            dist.destroy_process_group()


def _train(config: TrainConfig, context: DistContext) -> TrainResult:
    out = Path(config.out)
    previous_run = claim_output_folder(out, config)
    cohort = scan_features_folder(
        config.features,
        config.n_tiles_per_view,
        skip_bad_files=config.skip_bad_files,
        check_finite=config.check_finite,
        allow_mixed_grids=config.allow_mixed_grids,
    )
    batch = global_batch_size(config.batch_size, len(cohort.slides), context.world_size)
    resume = load_checkpoint(config.resume) if config.resume is not None else None
    if resume is not None:
        check_resume(resume, config, cohort.slide_ids)
    model, trained, init_info = _build_model(config, cohort, context)
    dataset = SlideViewDataset(cohort, config.n_tiles_per_view, (config.scale_min, config.scale_max), config.seed)
    sampler = EpochBatchSampler(len(cohort.slides), batch, config.seed, context.rank, context.world_size)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_slide_views,
        num_workers=config.num_workers,
        pin_memory=context.device.type == "cuda",
        prefetch_factor=4 if config.num_workers > 0 else None,
    )
    optimisation = _optimisation(config, model, batch, sampler.steps_per_epoch, context.device)
    run = _Run(
        config, context, model, trained, optimisation, batch, sampler.steps_per_epoch, out, *_monitor_slides(cohort, config)
    )
    start_epoch = _restore(run, resume) if resume is not None else 0
    run.base = dict(
        format=CHECKPOINT_FORMAT,
        format_version=CHECKPOINT_VERSION,
        package_version=__version__,
        config=config_to_dict(config),
        slide_ids=cohort.slide_ids,
        world_size=context.world_size,
        encoder=cohort.encoder.to_dict(),
        init=None if init_info is None else init_info.to_dict(),
        architecture=model.head.to_dict(),
        grids=cohort.grids(),
    )
    if context.is_main:
        _start_output(out, previous_run, config)
        log.info(
            "training on %d slides (%s), %d ranks, global batch %d, %d steps/epoch, lr %.4g, device %s",
            len(cohort.slides),
            cohort.folder,
            context.world_size,
            batch,
            run.steps_per_epoch,
            optimisation.optimizer.param_groups[0]["initial_lr"],
            context.device,
        )
    if not run.history:
        run.history.append(dict(epoch=0, global_step=0, lr=run.lr(), **run.monitors()))
    if context.is_main:
        write_monitors(out, run.history, MONITOR_COLUMNS)

    from tqdm.auto import tqdm

    progress = tqdm(
        total=run.total_steps,
        initial=run.global_step,
        unit="step",
        disable=not context.is_main,
        desc="gigassl train",
        dynamic_ncols=True,
    )
    trained.train()
    # One pass of the loader runs through all remaining epochs (the keys carry the epoch), so
    # workers prefetch across epoch boundaries and while the monitors are computed.
    sampler.set_epoch(start_epoch + 1, max(start_epoch + 1, config.epochs))
    batches = iter(loader) if start_epoch < config.epochs else iter(())
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            row = _train_epoch(run, batches, epoch, progress)
            row.update(run.monitors())
            run.history.append(row)
            if context.is_main:
                _finish_epoch(run, epoch)
    finally:
        del batches  # shuts the workers down
        progress.close()
        dataset.close()
        run.monitor_dataset.close()
    if context.world_size > 1:
        dist.barrier()
    curves = plot_curves(run.history, out / CURVES_PNG) if context.is_main else None
    final = {key: float(value) for key, value in run.history[-1].items()} if run.history else {}
    return TrainResult(run.latest, out / MONITORS_CSV, out / MONITORS_JSON, curves, config.epochs, run.global_step, final)


def _train_epoch(run: _Run, batches: Iterator[ViewBatch], epoch: int, progress: Any) -> dict[str, float]:
    """The epoch's steps; returns its row of ``monitors.csv`` but the monitor slides' columns."""
    opt = run.optimisation
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
                f"stopped. The last good checkpoint is {run.latest if run.latest.exists() else 'none (none written yet)'}. "
                "Lower --lr, raise --temperature, or check the features"
            )
        sums["grad_norm"] += _grad_norm(run.model)
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        opt.scheduler.step()
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


def _finish_epoch(run: _Run, epoch: int) -> None:
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
        write_checkpoint(run.out, epoch, run.checkpoint(epoch), config.keep_checkpoints)


def _step(run: _Run, views: ViewBatch) -> tuple[float, float]:
    """Forward both views, NT-Xent over the global batch, backward (gradients left unscaled).

    Returns the global-batch loss and positive-pair accuracy (the same on every rank).
    """
    opt, device = run.optimisation, run.context.device
    n = views.n_slides
    opt.optimizer.zero_grad(set_to_none=True)
    with autocast(device, enabled=opt.amp_dtype is not None):
        z = run.trained(views.sparse.to(device, non_blocking=True))  # (2n, projector_dim)
    z = z.float()
    z1, z2 = z[:n], z[n:]
    loss = losses.nt_xent_distributed(z1, z2, run.config.temperature)  # = nt_xent on one process
    opt.scaler.scale(loss).backward()
    opt.scaler.unscale_(opt.optimizer)
    with torch.no_grad():
        accuracy = losses.positive_pair_accuracy(
            losses.gather_with_gradient(z1.detach()), losses.gather_with_gradient(z2.detach())
        )
        reported = all_reduce_mean(loss.detach(), run.context)  # each rank's loss is its anchors' mean
    return float(reported), float(accuracy)
