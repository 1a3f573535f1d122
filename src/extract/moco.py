"""MoCo v2 pre-training of a ResNet tile encoder (He et al. 2020; Chen et al. 2020).

The model (:mod:`extract.moco_model`), with its defaults (``MocoConfig``; ``--profile
small-cpu`` changes some):

- query encoder ``encoder_q``: a full ResNet18 (``--arch resnet34|resnet50`` for the others)
  whose ``fc`` is the MLP head 512 → 512 → 128 (ResNet50: 2048 → 2048 → 128);
- key encoder ``encoder_k``: a copy, never back-propagated, moved after every step by
  θ_k ← m·θ_k + (1 − m)·θ_q with m = 0.999 (parameters only; its BatchNorm statistics come
  from its own forward passes, as in MoCo);
- ``queue``: K = 65536 L2-normalised keys of past batches, a ring buffer written at a
  pointer that wraps around (any K, any batch);
- loss: InfoNCE, logits [q·k⁺, q·queue] / τ with τ = 0.2, the positive at index 0;
- SGD, lr 0.03 · batch / 256, momentum 0.9, weight decay 1e-4, cosine decay to 0 per step;
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
  :func:`extract.encoder.load_encoder` accepts them as they are), ``optimizer``, ``scaler``,
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
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from extract.augment import TileAugmentation
from extract.checkpoint_io import write_epoch_snapshot
from extract.config import settings_dict, with_current_names
from extract.config import MocoConfig
from extract.device import autocast, autocast_dtype, init_distributed
from extract.encoder import load_weights_only, normalise, save_encoder_checkpoint
from extract.resnet import ResNet, build_resnet
from extract.moco_data import EpochTileBatches, IndexedSlide, epoch_plan, fixed_tiles, index_slides
from extract.moco_model import MoCo, all_gather, info_nce_logits, momentum_update
from extract.moco_probe import ProbeSet, probe_auc, probe_set, slide_mean_features
from extract.monitors import alignment, fresh_info_nce, rankme, uniformity, write_monitors
from extract.slide_list import list_slides

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "gigassl-moco-checkpoint"
CHECKPOINT_VERSION = 1
SGD_MOMENTUM = 0.9
# Settings that change what is computed: a resumed run must use the same ones to be exact.
RESUME_MUST_MATCH = (
    "arch",
    "target_mpp",
    "tile_size_px",
    "tissue_threshold",
    "epochs",
    "tiles_per_epoch",
    "tiles_per_visit",
    "batch_size",
    "queue_size",
    "momentum",
    "temperature",
    "lr",
    "weight_decay",
    "seed",
)
# Monitors: alignment needs two views per tile, computed on at most this many tiles.
MONITOR_VIEW_TILES = 256
MONITOR_BATCH = 256


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


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """``base_lr`` decayed to 0 along half a cosine over ``total_steps``."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


@dataclass
class StepResult:
    loss: float
    accuracy: float  # fraction of queries whose positive key has the largest logit
    positive_cosine: float = 0.0  # mean q·k⁺
    negative_cosine: float = 0.0  # mean q·queue: how close the (possibly stale) negatives are


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


# ----------------------------------------------------------------------------- monitors


def _embed_for_monitors(
    encoder: ResNet, images: torch.Tensor, device: torch.device, mixed_precision: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised (N, 3, H, W) → trunk (N, 256|1024), backbone (N, 512|2048), normalised head (N, 128)."""
    outputs: list[tuple[torch.Tensor, ...]] = []
    for chunk in images.split(MONITOR_BATCH):
        with autocast(device, mixed_precision):
            maps = encoder.forward_features(chunk)
            pooled = torch.flatten(encoder.avgpool(encoder.layer4(maps)), 1)
            head = encoder.fc(pooled)
        outputs.append((maps.float().mean(dim=(2, 3)), pooled.float(), F.normalize(head.float(), dim=1)))
    return tuple(torch.cat(parts).cpu() for parts in zip(*outputs))  # type: ignore[return-value]


def representation_monitors(
    encoder: ResNet,
    tiles: torch.Tensor,
    augmentation: TileAugmentation,
    device: torch.device,
    mixed_precision: bool = True,
    seed: int = 0,
    temperature: float = 0.2,
) -> dict[str, float]:
    """Label-free quality of ``encoder`` (query ResNet with MLP head) on fixed uint8 tiles."""
    was_training = encoder.training
    encoder.eval()
    try:
        images = tiles.to(device).float().div_(255.0)
        trunk, backbone, head = _embed_for_monitors(encoder, normalise(images), device, mixed_precision)
        generator = torch.Generator().manual_seed(seed)  # the same views every epoch
        subset = images[:MONITOR_VIEW_TILES]
        _, _, z1 = _embed_for_monitors(encoder, normalise(augmentation.independent(subset, generator)), device, mixed_precision)
        _, _, z2 = _embed_for_monitors(encoder, normalise(augmentation.independent(subset, generator)), device, mixed_precision)
    finally:
        encoder.train(was_training)
    return {
        "rankme_tile256": rankme(trunk),
        "rankme_backbone512": rankme(backbone),
        "alignment": alignment(z1, z2),
        "uniformity": uniformity(head),
        "fresh_infonce": fresh_info_nce(z1, z2, temperature),
    }


# ----------------------------------------------------------------------------- checkpoints


def settings_of(config: MocoConfig) -> dict[str, Any]:
    """The settings as plain data (paths as str), for checkpoints and logs."""
    return settings_dict(config)


def encoder_resnet(model: MoCo) -> ResNet:
    """The query encoder as a plain ResNet of its arch (the MLP head left out; ``fc`` a fixed Linear)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the unused 1000-class fc, reproducible, without touching the run's RNG
        resnet = build_resnet(model.arch)
    state = {k: v for k, v in model.encoder_q.state_dict().items() if not k.startswith("fc.")}
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"fc.weight", "fc.bias"}:
        raise RuntimeError(f"query encoder does not match {model.arch}: missing {missing}, unexpected {unexpected}")
    return resnet


encoder_resnet18 = encoder_resnet  # the name before ResNet34/50 existed


def save_encoder(model: MoCo, path: Path, config: MocoConfig, epoch: int) -> None:
    """``encoder.pt``: accepted by :func:`extract.encoder.load_encoder` (atomic write)."""
    temporary = path.with_name(f".{path.name}.partial")
    save_encoder_checkpoint(
        encoder_resnet(model),
        temporary,
        extra={"trained_by": "gigassl pretrain-tiles (MoCo v2)", "epoch": epoch, "config": settings_of(config)},
    )
    os.replace(temporary, path)


def _rng_states(generator: torch.Generator) -> dict[str, list[torch.Tensor]]:
    """This process's RNG states, gathered from every rank (rank order)."""
    states = {"augment": generator.get_state(), "torch": torch.random.get_rng_state()}
    if not (dist.is_available() and dist.is_initialized()):
        return {name: [state] for name, state in states.items()}
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return {
        name: [part.cpu() for part in all_gather(state.to(device)).chunk(dist.get_world_size())] for name, state in states.items()
    }


def checkpoint_payload(
    model: MoCo,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator,
    config: MocoConfig,
    epoch: int,
    step: int,
    monitors: list[dict[str, Any]],
    slide_names: list[str],
) -> dict[str, Any]:
    """Everything needed to continue exactly after ``epoch`` epochs (plain tensors and data)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": model.arch,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        "rng": _rng_states(generator),
        "epoch": epoch,
        "step": step,
        "config": settings_of(config),
        "monitors": monitors,
        "slides": slide_names,
    }


def load_training_checkpoint(path: Path, config: MocoConfig) -> dict[str, Any]:
    """Read and check a training checkpoint for ``--resume`` (weights_only)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--resume {path} does not exist; pass OUT/last.pt or OUT/checkpoints/epoch_NNNN.pt")
    raw = load_weights_only(path, f"--resume {path}")
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"--resume {path}: not a `gigassl pretrain-tiles` training checkpoint (OUT/last.pt)")
    if raw.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"--resume {path}: checkpoint version {raw.get('version')}, this package reads {CHECKPOINT_VERSION}")
    saved, current = {"arch": "resnet18", **with_current_names(raw["config"])}, settings_of(config)  # before --arch: resnet18
    differ = [
        f"--{k.replace('_', '-')} {saved.get(k)} (checkpoint) vs {current[k]}"
        for k in RESUME_MUST_MATCH
        if saved.get(k) != current[k]
    ]
    if differ:
        raise ValueError(f"--resume {path}: settings differ from the checkpoint's; pass the same values: " + "; ".join(differ))
    return raw


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


def _quality_monitors(
    encoder: ResNet,
    tiles: torch.Tensor | None,
    probe: ProbeSet | None,
    augmentation: TileAugmentation,
    device: torch.device,
    config: MocoConfig,
) -> dict[str, float]:
    """The epoch's label-free monitors on the fixed tiles, and the probe AUC when labels were given."""
    row: dict[str, float] = {}
    if tiles is not None:
        row.update(
            representation_monitors(encoder, tiles, augmentation, device, config.mixed_precision, config.seed, config.temperature)
        )
    if probe is not None:
        row["probe_auc"] = probe_auc(
            slide_mean_features(encoder, probe, device, config.mixed_precision), probe.labels, config.seed
        )
    return row


def _epoch_row(epoch: int, step: int, steps: list[StepResult], lr: float, batch_size: int, seconds: float) -> dict[str, Any]:
    """The epoch's means of the per-step figures, with the last lr and the throughput."""

    def mean(name: str) -> float:
        return sum(getattr(r, name) for r in steps) / max(len(steps), 1)

    return {
        "epoch": epoch + 1,
        "step": step,
        "loss": mean("loss"),
        "positive_accuracy": mean("accuracy"),
        "positive_cosine": mean("positive_cosine"),
        "negative_cosine": mean("negative_cosine"),
        "lr": lr,
        "tiles_per_s": len(steps) * batch_size / max(seconds, 1e-9),
        "seconds": seconds,
    }


def _list_slide_files(folder: Path) -> list[Path]:
    slides, others = list_slides(Path(folder))
    if others:
        logger.info("ignoring %d files that are not slides in %s", len(others), folder)
    return slides


def run_pretraining(config: MocoConfig) -> PretrainingResult:
    """Train MoCo v2 on tiles sampled online from ``config.slides``; write OUT (see module doc)."""
    config = config.resolved()
    context = init_distributed(config.device)
    rank, world, device, initialised_here = context.rank, context.world_size, context.device, context.initialised_here
    main_process = rank == 0
    out = Path(config.out)
    try:
        if main_process:
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
            progress=main_process,
        )
        if not slides:
            raise ValueError(f"--slides {config.slides}: none of the {len(paths)} files gave tissue tiles (see warnings)")
        logger.info(
            "%d slides, %d tissue tiles of %d px at %g µm/px",
            len(slides),
            sum(map(len, slides)),
            config.tile_size_px,
            config.target_mpp,
        )
        return _train(config, slides, skipped, rank, world, device, out)
    finally:
        if initialised_here:
            dist.destroy_process_group()


def _train(
    config: MocoConfig,
    slides: list[IndexedSlide],
    skipped: list[tuple[Path, str]],
    rank: int,
    world: int,
    device: torch.device,
    out: Path,
) -> PretrainingResult:
    main_process = rank == 0
    slide_names = [s.path.name for s in slides]
    torch.manual_seed(config.seed)
    model = MoCo(config.queue_size, seed=config.seed, arch=config.arch).to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's Module.to overloads omit memory_format
    base_lr = config.lr * config.batch_size / 256
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=base_lr, momentum=SGD_MOMENTUM, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=config.mixed_precision and autocast_dtype(device) == torch.float16)
    generator = torch.Generator().manual_seed(config.seed * 1000 + rank)  # views differ across ranks
    augmentation = TileAugmentation()
    start_epoch, step, monitors = 0, 0, []
    if config.resume is not None:
        raw = load_training_checkpoint(config.resume, config)
        model.load_state_dict(raw["state_dict"])
        optimizer.load_state_dict(raw["optimizer"])
        if raw["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(raw["scaler"])
        if len(raw["rng"]["augment"]) == world:
            generator.set_state(raw["rng"]["augment"][rank])
            torch.random.set_rng_state(raw["rng"]["torch"][rank])
        else:
            logger.warning(
                "checkpoint written by %d processes, resuming with %d: RNG streams restart (not exact)",
                len(raw["rng"]["augment"]),
                world,
            )
        if raw.get("slides") != slide_names:
            logger.warning("the slide set differs from the checkpoint's; tile plans will differ")
        start_epoch, step, monitors = int(raw["epoch"]), int(raw["step"]), list(raw["monitors"])
        logger.info("resuming %s after epoch %d (step %d)", config.resume, start_epoch, step)
    query_encoder: nn.Module = model.encoder_q
    if world > 1:
        query_encoder = DistributedDataParallel(model.encoder_q, device_ids=[device.index] if device.type == "cuda" else None)
    monitor_tiles = (
        fixed_tiles(slides, config.monitor_tiles, config.tile_size_px, config.seed)
        if config.monitor_tiles and main_process
        else None
    )
    probe = (
        probe_set(slides, config.probe_labels, config.probe_tiles_per_slide, config.tile_size_px, config.seed)
        if config.probe_labels is not None and main_process
        else None
    )
    steps_per_epoch = config.tiles_per_epoch // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"--tiles-per-epoch {config.tiles_per_epoch} is smaller than --batch-size {config.batch_size}")
    total_steps = steps_per_epoch * config.epochs
    checkpoint_path, encoder_path = out / "last.pt", out / "encoder.pt"
    for epoch in range(start_epoch, config.epochs):
        plan = epoch_plan([len(s) for s in slides], config.tiles_per_epoch, config.tiles_per_visit, config.seed, epoch)
        dataset = EpochTileBatches(slides, plan, config.batch_size, config.tile_size_px, rank, world)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=config.num_workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if config.num_workers else None,
        )
        started, steps = time.perf_counter(), []
        bar = tqdm(loader, total=len(dataset), desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", disable=not main_process)
        for tiles in bar:
            lr = cosine_lr(base_lr, step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            view_q, view_k = make_views(tiles, augmentation, generator, device)
            result = train_step(
                model,
                view_q,
                view_k,
                optimizer,
                config.momentum,
                config.temperature,
                device,
                config.mixed_precision,
                scaler,
                query_encoder,
            )
            if not math.isfinite(result.loss):
                raise FloatingPointError(
                    f"MoCo loss became {result.loss} at epoch {epoch + 1} step {step}; lower --lr or disable --mixed-precision"
                )
            steps.append(result)
            step += 1
            bar.set_postfix(loss=f"{result.loss:.3f}", acc=f"{result.accuracy:.2f}", lr=f"{lr:.2g}")
        seconds = time.perf_counter() - started
        row = _epoch_row(epoch, step, steps, lr, config.batch_size, seconds)
        row.update(_quality_monitors(model.encoder_q, monitor_tiles, probe, augmentation, device, config))
        monitors.append(row)
        last = epoch + 1 == config.epochs
        if (epoch + 1) % config.checkpoint_every == 0 or last:
            payload = checkpoint_payload(model, optimizer, scaler, generator, config, epoch + 1, step, monitors, slide_names)
            if main_process:
                write_epoch_snapshot(out / "checkpoints", epoch + 1, payload, checkpoint_path, config.keep_checkpoints)
                save_encoder(model, encoder_path, config, epoch + 1)
        if main_process:
            write_monitors(out, monitors)
            logger.info(
                "epoch %d: %s", epoch + 1, ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "step"))
            )
    return PretrainingResult(
        out=out,
        encoder_path=encoder_path,
        checkpoint_path=checkpoint_path,
        epochs_done=config.epochs,
        n_slides=len(slides),
        skipped=[(str(p), reason) for p, reason in skipped],
        monitors=monitors,
    )
