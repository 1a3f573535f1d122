"""MoCo v2 pre-training of a ResNet tile encoder (He et al. 2020; Chen et al. 2020).

The model (:mod:`extract.moco.model`), with its defaults (``MocoConfig``; ``--profile
small-cpu`` changes some):

- query encoder ``encoder_q``: a full ResNet18 (``--arch resnet34|resnet50`` for the others)
  whose ``fc`` is the MLP head 512 → 512 → 128 (ResNet50: 2048 → 2048 → 128);
- key encoder ``encoder_k``: a copy, never back-propagated, moved after every step by
  θ_k ← m·θ_k + (1 − m)·θ_q with m = 0.999 (parameters only; its BatchNorm statistics come
  from its own forward passes, as in MoCo);
- ``queue``: K = 65536 L2-normalised keys of past batches, a ring buffer written at a
  pointer that wraps around (any K, any batch);
- loss: InfoNCE, logits [q·k⁺, q·queue] / τ with τ = 0.2, the positive at index 0;
- SGD, lr 0.03 · batch / 256, momentum 0.9, weight decay 1e-4, cosine decay to 0 per step
  (:mod:`extract.training.schedule`, shared with stage 2; the run state is :class:`extract.moco.setup.MocoRun`);
- views: two independent draws of the histology augmentation of :mod:`extract.augment`
  (one per tile), made on the device from one explicit generator.

Under torchrun (``WORLD_SIZE`` > 1) the query encoder runs in DistributedDataParallel (NCCL
on CUDA, gloo on CPU) with per-process BatchNorm, and the key encoder uses MoCo's
*shuffle-BN*: the key batch is gathered from all processes, permuted, encoded in slices and
un-permuted, so a query and its key never share BatchNorm statistics (the "cheating" shuffle-BN
prevents). The queue receives the keys of all processes and stays identical on every rank.
On one process there is nothing to shuffle across; the query and key batches still pass
through different encoders.

Outputs in ``OUT``:

- ``last.pt`` and ``checkpoints/epoch_NNNN.pt``: training checkpoints, plain dicts readable with
  ``torch.load(weights_only=True)``: ``state_dict`` (``encoder_q.*``, ``encoder_k.*``,
  ``queue.keys``, ``queue.ptr`` — the original MoCo layout, so
  :func:`extract.encoders.kinds.load_encoder` accepts them as they are), ``optimizer``, ``scaler``,
  per-rank RNG states, ``epoch``, ``step``, ``config``, ``monitors``;
- ``encoder.pt``: the query encoder's ResNet in the package's encoder format (with its ``arch``)
  (``gigassl extract --encoder OUT/encoder.pt``, and stage 2's layer4 initialisation);
- ``monitors.csv`` / ``monitors.json``: per epoch loss, positive-key accuracy, lr, tiles/s
  and label-free quality monitors on a fixed set of tiles (RankMe of the tile features and of
  the backbone output — columns named after ResNet18's widths, ``rankme_tile256`` and
  ``rankme_backbone512``, whatever the architecture; alignment and uniformity of the head's output).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from extract.augment import TileAugmentation
from extract.batch.slide_list import list_slides
from extract.checkpoints.moco import checkpoint_payload, load_training_checkpoint, restore_training_state, save_encoder
from extract.checkpoints.sealed import write_epoch_snapshot
from extract.config import MocoConfig
from extract.device import DistContext, autocast, init_distributed
from extract.encoders.tile_encoder import normalise
from extract.errors import UserError
from extract.moco.data import EpochTileBatches, IndexedSlide, epoch_plan, fixed_tiles, index_slides
from extract.moco.model import MoCo, info_nce_logits, momentum_update
from extract.moco.monitors import StepResult, epoch_row, quality_monitors
from extract.moco.probe import ProbeSet, probe_set
from extract.moco.setup import MocoRun, set_up
from extract.monitors import write_monitors
from extract.progress import progress

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- one step


def make_views(
    tiles: torch.Tensor, augmentation: TileAugmentation, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) uint8 tiles → two independently augmented, normalised views on ``device``."""
    images = tiles.to(device, non_blocking=True).float().div_(255.0)
    return (
        normalise(augmentation.independent(images, generator)),
        normalise(augmentation.independent(images, generator)),
    )


def train_step(
    model: MoCo,
    view_q: torch.Tensor,
    view_k: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    momentum: float,
    temperature: float,
    device: torch.device,
    mixed_precision: bool = True,
    scaler: torch.amp.GradScaler | None = None,
    query_encoder: nn.Module | None = None,
) -> StepResult:
    """One MoCo step: momentum update, keys, queries, InfoNCE, SGD step, enqueue."""
    model.encoder_q.train()
    model.encoder_k.train()
    momentum_update(model.encoder_k, model.encoder_q, momentum)
    with autocast(device, mixed_precision):
        q = model.query(view_q, query_encoder)
        k, all_keys = model.keys(view_k)
    logits = info_nce_logits(q, k, model.queue.keys, temperature)  # (B, 1 + K), fp32
    loss = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    model.queue.enqueue(all_keys)
    accuracy = (logits.argmax(dim=1) == 0).float().mean()
    cosines = logits.detach() * temperature
    return StepResult(float(loss.detach()), float(accuracy), float(cosines[:, 0].mean()), float(cosines[:, 1:].mean()))


# ----------------------------------------------------------------------------- the job


@dataclass
class PretrainingResult:
    """What ``run_pretraining`` did; ``exit_code`` for the CLI."""

    out: Path
    encoder_path: Path
    checkpoint_path: Path
    epochs_done: int
    n_slides: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    monitors: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int = 0

    def format(self) -> str:
        """Where the tile encoder was written, and the slides left out."""
        lines = [
            f"MoCo: {self.epochs_done} epochs on {self.n_slides} slides → encoder {self.encoder_path} "
            f"(resumable checkpoint {self.checkpoint_path})"
        ]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _list_slide_files(folder: Path) -> list[Path]:
    slides, others = list_slides(Path(folder))
    if others:
        logger.info("ignoring %d files that are not slides in %s", len(others), folder)
    return slides


def run_pretraining(config: MocoConfig) -> PretrainingResult:
    """Train MoCo v2 on tiles sampled online from ``config.slides``; write OUT (see module doc)."""
    context = init_distributed(config.device)
    out = Path(config.out)
    try:
        if context.is_main:
            (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        paths = _list_slide_files(config.slides)
        if not paths:
            raise FileNotFoundError(f"--slides {config.slides}: no slide or image files found")
        slides, skipped = index_slides(
            paths,
            config.target_mpp,
            config.tile_size_px,
            config.tissue_threshold,
            config.mpp_csv,
            config.default_mpp,
            progress=context.is_main,
        )
        if not slides:
            raise UserError(f"--slides {config.slides}: none of the {len(paths)} files gave tissue tiles (see warnings)")
        logger.info(
            "%d slides, %d tissue tiles of %d px at %g µm/px",
            len(slides),
            sum(map(len, slides)),
            config.tile_size_px,
            config.target_mpp,
        )
        return _train(config, slides, skipped, context)
    finally:
        if context.initialised_here:
            dist.destroy_process_group()


def _run_epoch(run: MocoRun, slides: list[IndexedSlide]) -> tuple[list[StepResult], float]:
    """Epoch ``run.epoch`` + 1 of MoCo steps from ``run.global_step`` → the step results and the last lr."""
    config, device, context, epoch, step = run.config, run.device, run.context, run.epoch, run.global_step
    plan = epoch_plan([len(s) for s in slides], config.tiles_per_epoch, config.tiles_per_visit, config.seed, epoch)
    dataset = EpochTileBatches(slides, plan, config.batch_size, config.tile_size_px, context.rank, context.world_size)
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if config.num_workers else None,
    )
    steps: list[StepResult] = []
    schedule = run.schedule
    lr = schedule.lr(run.base_lr, step)
    bar = progress(
        loader, total=len(dataset), desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", disable=not run.is_main, log=logger
    )
    for tiles in bar:
        lr = schedule.lr(run.base_lr, step + len(steps))
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        view_q, view_k = make_views(tiles, run.augmentation, run.generator, device)
        result = train_step(
            run.model,
            view_q,
            view_k,
            run.optimizer,
            config.momentum,
            config.temperature,
            device,
            config.mixed_precision,
            run.scaler,
            run.trained,
        )
        if not math.isfinite(result.loss):
            raise UserError(
                f"MoCo loss became {result.loss} at epoch {epoch + 1} step {step + len(steps)}; "
                "lower --lr or disable --mixed-precision"
            )
        steps.append(result)
        bar.set_postfix(loss=f"{result.loss:.3f}", acc=f"{result.accuracy:.2f}", lr=f"{lr:.2g}")
    return steps, lr


def _train(
    config: MocoConfig, slides: list[IndexedSlide], skipped: list[tuple[Path, str]], context: DistContext
) -> PretrainingResult:
    run = set_up(config, context, Path(config.out), [s.path.name for s in slides])
    if config.resume is not None:
        restore_training_state(load_training_checkpoint(config.resume, config), run)
        logger.info("resuming %s after epoch %d (step %d)", config.resume, run.epoch, run.global_step)
    monitor_tiles = (
        fixed_tiles(slides, config.monitor_tiles, config.tile_size_px, config.seed)
        if config.monitor_tiles and run.is_main
        else None
    )
    probe: ProbeSet | None = (
        probe_set(slides, config.probe_labels, config.probe_tiles_per_slide, config.tile_size_px, config.seed)
        if config.probe_labels is not None and run.is_main
        else None
    )
    checkpoint_path, encoder_path = run.out / "last.pt", run.out / "encoder.pt"
    while run.epoch < config.epochs:
        started = time.perf_counter()
        steps, lr = _run_epoch(run, slides)
        run.global_step += len(steps)
        row = epoch_row(run.epoch, run.global_step, steps, lr, config.batch_size, time.perf_counter() - started)
        row.update(quality_monitors(run.model.encoder_q, monitor_tiles, probe, run.augmentation, run.device, config))
        run.history.append(row)
        run.epoch += 1
        if run.epoch % config.checkpoint_every == 0 or run.epoch == config.epochs:
            payload = checkpoint_payload(run)
            if run.is_main:
                write_epoch_snapshot(run.out / "checkpoints", run.epoch, payload, checkpoint_path, config.keep_checkpoints)
                save_encoder(run.model, encoder_path, config, run.epoch)
        if run.is_main:
            write_monitors(run.out, run.history)
            logger.info(
                "epoch %d: %s", run.epoch, ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "step"))
            )
    return PretrainingResult(
        out=run.out,
        encoder_path=encoder_path,
        checkpoint_path=checkpoint_path,
        epochs_done=config.epochs,
        n_slides=len(slides),
        skipped=[(str(p), reason) for p, reason in skipped],
        monitors=run.history,
    )
