"""``gigassl train``: NT-Xent training of the sparse layer4 + projector on two views per slide.

Defaults follow the paper and the original code (docs/design.md §2.2): Adam, lr 0.03 at batch 256
scaled linearly with the global batch, no weight decay, a linear warm-up of ``warmup_epochs``
then a cosine decay to 0, both per step; temperature 0.05; T = 5.

Outputs in ``config.out``:

- ``checkpoint.pt``: the latest checkpoint; ``checkpoints/epoch_NNNN.pt`` every
  ``checkpoint_every`` epochs and at the end (the newest ``keep_checkpoints`` kept); plain
  data, written atomically (:mod:`gigassl.training.checkpoint`).
- ``monitors.csv`` / ``monitors.json``: one row per epoch (row 0 = before training) with the
  training loss, positive-pair accuracy and gradient norm of the epoch's steps, the share of
  the step time spent waiting for data, and, on a fixed set of ``monitor_slides`` slides with
  fixed views (model in eval mode): loss, positive-pair top-1 accuracy, collapse level,
  RankMe and ODCorr of the slide representations (512-d, 2048-d for ResNet50). ``curves.png`` at the end.

An ``out`` folder that already holds a run (``checkpoint.pt``, ``checkpoints/``, monitors) is
refused unless ``--resume`` continues it or ``--overwrite`` deletes it first.

Resuming: every setting must be the checkpoint's except where outputs go (see
:data:`gigassl.training.checkpoint.RESUME_FREE_KEYS`) and ``epochs``, which may grow (train a finished
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
the one-process step on the same global batch (:mod:`gigassl.training.distributed`). ``batch_size`` is
the global batch.

Where the parts live: the settings and their checks in :class:`gigassl.config.TrainConfig`; the
head's initialisation in :mod:`gigassl.training.initialisation`; the schedule in :mod:`extract.training.schedule` (shared with MoCo);
the monitors and the stall warning in :mod:`gigassl.training.monitors` (RankMe and the monitors files in
:mod:`extract.monitors`, shared with MoCo); the run folder and resuming in
:mod:`gigassl.training.checkpoint`; ``curves.png`` in :mod:`gigassl.plots`; the optimiser, the epochs and
the steps in :mod:`gigassl.training.loop`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from extract import __version__
from extract.batch.output_folder import ensure_writable
from extract.device import DistContext, init_distributed
from extract.encoders.tile_encoder import EncoderInfo
from extract.monitors import MONITORS_CSV, MONITORS_JSON, write_monitors
from extract.settings import settings_dict
from extract.training.schedule import warmup_warning
from gigassl.config import TrainConfig
from gigassl.model import GigaSSLModel
from gigassl.plots import plot_curves
from gigassl.training.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    check_resume,
    claim_output_folder,
    load_checkpoint,
    remove_stale_run_partials,
)
from gigassl.training.data import (
    STREAM_MONITOR,
    Cohort,
    EpochBatchSampler,
    SlideViewDataset,
    collate_slide_views,
    global_batch_size,
    scan_features_folder,
)
from gigassl.training.distributed import use_global_batch_norm
from gigassl.training.initialisation import initial_head
from gigassl.training.loop import MONITOR_COLUMNS, Run, TrainingDivergedError, make_optimisation, restore_run, run_epochs

__all__ = ["MONITOR_COLUMNS", "TrainingDivergedError", "TrainResult", "run_training"]

log = logging.getLogger(__name__)

CURVES_PNG = "curves.png"


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


def _extraction_seed(cohort: Cohort) -> int:
    """The seed `gigassl extract` ran with (a random tile encoder is drawn from it); 0 if unrecorded."""
    from extract.features.slide_file import SlideFeatures

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


def _checkpoint_fields(
    config: TrainConfig, context: DistContext, cohort: Cohort, model: GigaSSLModel, init_info: Optional[EncoderInfo]
) -> dict[str, Any]:
    """The checkpoint fields fixed for the whole run (:mod:`gigassl.training.checkpoint`)."""
    return dict(
        format=CHECKPOINT_FORMAT,
        format_version=CHECKPOINT_VERSION,
        package_version=__version__,
        config=settings_dict(config),
        slide_ids=cohort.slide_ids,
        world_size=context.world_size,
        encoder=cohort.encoder.to_dict(),
        init=None if init_info is None else init_info.to_dict(),
        architecture=model.head.to_dict(),
        grids=cohort.grids(),
    )


def _train(config: TrainConfig, context: DistContext) -> TrainResult:
    out = Path(config.out)
    if context.is_main:  # a read-only --out is one line before any work, not a traceback at the first epoch
        ensure_writable(out)
        remove_stale_run_partials(out)
    previous_run = claim_output_folder(out, config)
    cohort = scan_features_folder(
        config.features,
        config.n_tiles_per_view,
        skip_bad_files=config.skip_bad_files,
        check_finite=config.check_finite,
        allow_mixed_grids=config.allow_mixed_grids,
        recheck_finite=config.recheck_finite,
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
    opt = make_optimisation(config, model, batch, sampler.steps_per_epoch, context.device)
    monitor_dataset, monitor_indices = _monitor_slides(cohort, config)
    run = Run(
        context=context,
        model=model,
        trained=trained,
        optimizer=opt.optimizer,
        scaler=opt.scaler,
        out=out,
        epochs=config.epochs,
        steps_per_epoch=sampler.steps_per_epoch,
        config=config,
        scheduler=opt.scheduler,
        amp_dtype=opt.amp_dtype,
        batch=batch,
        monitor_dataset=monitor_dataset,
        monitor_indices=monitor_indices,
        base=_checkpoint_fields(config, context, cohort, model, init_info),
    )
    if resume is not None:
        restore_run(run, resume)
    if context.is_main:
        _start_output(out, previous_run, config)
        log.info(
            "training on %d slides (%s), %d ranks, global batch %d, %d steps/epoch, lr %.4g, device %s",
            len(cohort.slides),
            cohort.folder,
            context.world_size,
            batch,
            run.steps_per_epoch,
            run.optimizer.param_groups[0]["initial_lr"],
            context.device,
        )
    if not run.history:
        run.history.append(dict(epoch=0, global_step=0, lr=run.lr(), **run.monitors()))
    if context.is_main:
        write_monitors(out, run.history, MONITOR_COLUMNS)
    try:
        run_epochs(run, loader, sampler)
    finally:
        dataset.close()
    if context.world_size > 1:
        dist.barrier()
    curves = plot_curves(run.history, out / CURVES_PNG) if context.is_main else None
    final = {key: float(value) for key, value in run.history[-1].items()} if run.history else {}
    return TrainResult(run.latest, out / MONITORS_CSV, out / MONITORS_JSON, curves, config.epochs, run.global_step, final)
