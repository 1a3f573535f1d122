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
(:mod:`gigassl.distributed`), each rank takes its contiguous share of every global batch,
the loss is NT-Xent over the global batch (embeddings gathered with gradients), gradients
are averaged by DDP, and batch norm uses the statistics of the global batch, so a step equals
the one-process step on the same global batch. ``batch_size`` is the global batch.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from extract import __version__
from extract.device import autocast, autocast_dtype
from extract.encoder import ARCHITECTURES, EncoderInfo, ResNet, load_resnet
from extract.config import settings_dict
from extract.errors import UserError
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
from gigassl import loss as losses
from gigassl import monitors
from gigassl.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    LATEST_CHECKPOINT,
    config_differences,
    load_checkpoint,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from gigassl.distributed import (
    DistContext,
    all_reduce_mean,
    init_distributed,
    use_global_batch_norm,
)
from gigassl.model import GigaSSLModel, HeadSpec
from gigassl.sparse_conv import BACKENDS

log = logging.getLogger(__name__)

MONITOR_COLUMNS = (
    "epoch", "global_step", "lr", "train_loss", "train_accuracy", "grad_norm", "data_share",
    "epoch_time_s", "loss", "positive_pair_accuracy", "collapse_level", "rankme", "odcorr",
)


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
        return (f"trained {self.epochs} epochs ({self.global_step} steps){': ' + monitored if monitored else ''}\n"
                f"written: {self.checkpoint}, {self.monitors_csv}" + (f", {self.curves}" if self.curves else ""))


# ------------------------------------------------------------------------------ set-up


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The settings as plain JSON-able data (paths as strings)."""
    return settings_dict(config)


def check_config(config: TrainConfig) -> None:
    """Refuse settings that cannot train, naming the flag."""
    problems = []
    if config.n_tiles_per_view < 1:
        problems.append(f"--n-tiles-per-view must be ≥ 1 (got {config.n_tiles_per_view})")
    if config.batch_size < 2:
        problems.append(f"--batch-size must be ≥ 2 slides (got {config.batch_size})")
    if config.epochs < 1:
        problems.append(f"--epochs must be ≥ 1 (got {config.epochs})")
    if not config.lr > 0:
        problems.append(f"--lr must be > 0 (got {config.lr})")
    if config.warmup_epochs < 0:
        problems.append(f"--warmup-epochs must be ≥ 0 (got {config.warmup_epochs})")
    if not config.temperature > 0:
        problems.append(f"--temperature must be > 0 (got {config.temperature})")
    if not 0 < config.scale_min <= config.scale_max:
        problems.append(f"need 0 < --scale-min ≤ --scale-max (got {config.scale_min}, {config.scale_max})")
    if config.checkpoint_every < 1 or config.keep_checkpoints < 1:
        problems.append("--checkpoint-every and --keep-checkpoints must be ≥ 1")
    if config.num_workers < 0:
        problems.append(f"--num-workers must be ≥ 0 (got {config.num_workers})")
    if config.sparse_backend not in BACKENDS:
        problems.append(f"--sparse-backend must be one of {', '.join(BACKENDS)} (got {config.sparse_backend!r})")
    if problems:
        raise UserError("invalid training settings: " + "; ".join(problems))


def warmup_warning(warmup_epochs: int, epochs: int) -> Optional[str]:
    """A message when the run ends inside its linear warm-up, else None."""
    if warmup_epochs < max(epochs, 1) or warmup_epochs == 0:
        return None
    return (f"--warmup-epochs {warmup_epochs} ≥ --epochs {epochs}: the run ends during the linear warm-up, so the "
            f"learning rate reaches only {100 * min(1.0, epochs / warmup_epochs):.0f}% of --lr and the cosine decay "
            "never starts; lower --warmup-epochs (the original: 10 of 1000 epochs)")


# Run files in ``out``; a folder holding any of them holds a run (see claim_output_folder).
RUN_FILES = (LATEST_CHECKPOINT, "monitors.csv", "monitors.json", "curves.png")
# Settings a resume may change beyond gigassl.checkpoint.RESUME_FREE_KEYS: permissions that
# do not change what is learned (the slides are checked by id), and ``epochs`` (re-planned).
RESUME_EXTRA_FREE_KEYS = frozenset({"epochs", "overwrite", "allow_mixed_grids"})


def existing_run(out: Path) -> list[Path]:
    """The files of a training run already in ``out`` (empty when there is none)."""
    found = [out / name for name in RUN_FILES if (out / name).exists()]
    if (out / "checkpoints").is_dir():
        found += sorted((out / "checkpoints").glob("epoch_*.pt"))
    return found


def claim_output_folder(out: Path, config: TrainConfig) -> list[Path]:
    """The files ``--overwrite`` will delete; refuses a folder that holds another run unless
    ``--overwrite``, or ``--resume`` from a checkpoint inside it."""
    found = existing_run(out)
    if not found:
        return []
    if config.resume is not None and Path(config.resume).resolve().is_relative_to(out.resolve()):
        return []
    if config.overwrite:
        return found
    try:
        payload = load_checkpoint(out / LATEST_CHECKPOINT)
        what = f"epoch {payload['epoch']} of {payload['config']['epochs']}"
    except (OSError, ValueError, KeyError):
        what = f"{len(found)} files"
    raise UserError(f"{out} already holds a training run ({what}); pass --resume {out / LATEST_CHECKPOINT} to continue "
                    "it (with a larger --epochs to train it longer), --overwrite to replace it, or another --out")


def check_resume(resume: dict[str, Any], config: TrainConfig, cohort: Cohort) -> None:
    """Refuse a resume whose settings (but ``epochs``) or slides differ from the checkpoint's,
    or whose ``epochs`` is fewer than the epochs already trained."""
    saved = {k: v for k, v in resume["config"].items() if k not in RESUME_EXTRA_FREE_KEYS}
    current = {k: v for k, v in config_to_dict(config).items() if k not in RESUME_EXTRA_FREE_KEYS}
    differences = config_differences(saved, current)
    if differences:
        raise UserError(f"cannot resume from {config.resume}: its settings differ from these ("
                        + "; ".join(differences) + "); resume with the same settings (only --epochs may change) "
                        "or start a new run")
    if list(resume["slide_ids"]) != cohort.slide_ids:
        raise UserError(f"cannot resume from {config.resume}: it was trained on other slides "
                        f"({len(resume['slide_ids'])} slides, now {len(cohort.slides)})")
    done = int(resume["epoch"])
    if config.epochs < done:
        raise UserError(f"cannot resume from {config.resume}: it has trained {done} epochs, more than --epochs "
                        f"{config.epochs}; --epochs is the total, pass --epochs ≥ {done}")


def replan_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, warmup_steps: int, total_steps: int) -> tuple[float, float]:
    """Plan a loaded scheduler over ``total_steps`` (``load_state_dict`` restores the saved run's
    total) and set the learning rate of the resumed step; returns (lr before, lr now)."""
    before = float(scheduler.get_last_lr()[0])
    lrs = []
    for group, schedule in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        schedule.warmup_steps, schedule.total_steps = warmup_steps, total_steps
        group["lr"] = group["initial_lr"] * schedule(scheduler.last_epoch)
        lrs.append(group["lr"])
    scheduler._last_lr = lrs  # what get_last_lr() reports until the next step
    return before, float(lrs[0])


def _extraction_seed(cohort: Cohort) -> int:
    """The seed `gigassl extract` ran with (a random tile encoder is drawn from it); 0 if unrecorded."""
    from extract.features_file import SlideFeatures

    with SlideFeatures(cohort.slides[0].path) as slide:
        return int(slide.settings.get("seed", 0))


def _resnet_of(encoder: EncoderInfo) -> str | None:
    """The ResNet architecture of a tile encoder whose features are that ResNet's trunk, else None."""
    spec = ARCHITECTURES.get(encoder.arch)
    if spec is None or encoder.source == "export" or encoder.width != spec.trunk_width:
        return None
    return encoder.arch


def initial_head(config: TrainConfig, cohort: Cohort) -> tuple[ResNet | None, HeadSpec, EncoderInfo | None]:
    """(the ResNet whose dense layer4 initialises the sparse head or None, the head, its provenance).

    Features of a ResNet tile encoder (R18/R34/R50): that network's own layer4 — ``config.init``
    when given (a checkpoint path, ``random`` or ``random:ARCH``), else the encoder recorded in
    the feature files, which can be re-created only when it was random (``load_resnet`` with its
    default seed 0, as extraction uses it). Features of any other encoder (an exported program):
    the generic head of :class:`~gigassl.model.HeadSpec`, randomly initialised, unless ``init``
    names a ResNet whose layer4 takes features of their width.
    """
    features_encoder, width = cohort.encoder, cohort.encoder.width
    arch = _resnet_of(features_encoder)
    if config.init is not None and not (arch is None and config.init == "random"):
        source = f"random:{arch}" if config.init == "random" and arch is not None else config.init
        resnet, info = load_resnet(source)
        if resnet.trunk_width != width:
            raise UserError(
                f"--init {config.init}: its {info.arch} layer4 takes {resnet.trunk_width}-d tile features, but the "
                f"features in {cohort.folder} are {width}-d ({features_encoder.name}); pass the checkpoint of the "
                "encoder that embedded them" + (", or --init random for a randomly initialised head" if arch is None else ""))
        if info.sha256 != features_encoder.sha256:
            log.warning("layer4 initialised from %s (sha256 %.12s) while the features were embedded by %s "
                        "(sha256 %.12s)", info.name, info.sha256, features_encoder.name, features_encoder.sha256)
        return resnet, HeadSpec.of_layer4(resnet.layer4), info
    if arch is None:
        log.info("features of %s (%s, %d-d) are not a ResNet trunk's: training a randomly initialised %d-channel "
                 "sparse head", features_encoder.name, features_encoder.arch, width, width)
        return None, HeadSpec.generic(width), None
    if features_encoder.name != "random" and not features_encoder.name.startswith("random:"):
        raise UserError(
            f"the features in {cohort.folder} were embedded by the tile encoder {features_encoder.name!r} "
            f"(sha256 {features_encoder.sha256[:12]}…); pass --init PATH to that checkpoint so that its "
            "layer4 initialises the sparse layer4 (or --init random)"
        )
    resnet, info = load_resnet(features_encoder.name, seed=_extraction_seed(cohort))
    if info.sha256 != features_encoder.sha256:
        raise UserError(
            f"the features in {cohort.folder} say encoder {features_encoder.name!r} with sha256 {features_encoder.sha256[:12]}…, "
            f"but load_resnet({features_encoder.name!r}) with the extraction's seed gives {info.sha256[:12]}…; they were embedded with another "
            "seed or torch version. Pass --init random to accept a different random layer4, or --init PATH"
        )
    return resnet, HeadSpec.of_layer4(resnet.layer4), info


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


# ------------------------------------------------------------------------------ monitors


def write_monitors(history: list[dict[str, float]], out: Path) -> tuple[Path, Path]:
    """``monitors.csv`` and ``monitors.json`` (one row per epoch)."""
    csv_path, json_path = out / "monitors.csv", out / "monitors.json"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(MONITOR_COLUMNS))
        writer.writeheader()
        for row in history:
            writer.writerow({key: row.get(key, "") for key in MONITOR_COLUMNS})
    json_path.write_text(json.dumps(history, indent=1))
    return csv_path, json_path


def plot_curves(history: list[dict[str, float]], path: Path) -> Path:
    """A PNG with one panel per monitor against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("train_loss", "loss"), ("train_accuracy", "positive_pair_accuracy"), ("collapse_level",),
              ("rankme",), ("odcorr",), ("lr",)]
    figure, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    epochs = [row["epoch"] for row in history]
    for axis, keys in zip(axes.ravel(), panels):
        for key in keys:
            values = [row.get(key, float("nan")) for row in history]
            axis.plot(epochs, values, marker="." if len(epochs) < 30 else None, label=key)
        axis.set_title(" / ".join(keys), fontsize=9)
        axis.set_xlabel("epoch")
        if len(keys) > 1:
            axis.legend(fontsize=7)
    figure.suptitle("Giga-SSL training (train_* = epoch's steps; others = fixed monitor slides, eval mode)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Batch norm normalising with the batch's statistics (as in training) while leaving the
    running statistics and every other buffer untouched."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    was_training = model.training
    model.train()
    for m in norms:
        m.momentum = 0.0  # running = 1·running + 0·batch: unchanged
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)
        model.train(was_training)


@torch.no_grad()
def monitor_metrics(
    model: GigaSSLModel, dataset: SlideViewDataset, indices: list[int], temperature: float,
    device: torch.device, batch: int = 256,
) -> dict[str, float]:
    """Label-free monitors on fixed views of ``indices``, batch norm on batch statistics.

    Batch statistics rather than the running ones, so that the monitors measure the function
    the loss trains (the running statistics lag behind early in training). Under DDP every
    rank runs this on the same slides (its batch norm all-reduces identical statistics).
    """
    pooled, projected = [], []
    with batch_statistics(model):
        for start in range(0, len(indices), batch):
            chunk = indices[start : start + batch]
            views = collate_slide_views([dataset[(0, index)] for index in chunk])
            h = model.pool(views.sparse.to(device))  # (2b, W)
            pooled.append(h.float())
            projected.append(model.projector(h).float())
    n = len(indices)
    h = torch.cat([torch.cat([p[: len(p) // 2] for p in pooled]), torch.cat([p[len(p) // 2 :] for p in pooled])])
    z = torch.cat([torch.cat([p[: len(p) // 2] for p in projected]), torch.cat([p[len(p) // 2 :] for p in projected])])
    z1, z2 = z[:n], z[n:]
    return {
        "loss": float(losses.nt_xent(z1, z2, temperature)),
        "positive_pair_accuracy": float(losses.positive_pair_accuracy(z1, z2)),
        "collapse_level": float(monitors.collapse_level(z)),
        "rankme": float(monitors.rankme(h)),
        "odcorr": float(monitors.odcorr(h)),
    }


# ------------------------------------------------------------------------------ training

# share of log(2B − 1) above which an epoch's mean loss counts as "at the constant-output level"
STALL_LOSS_SHARE = 0.95


def stall_warning(train_loss: float, train_accuracy: float, batch: int) -> Optional[str]:
    """A message when an epoch's mean training loss sits at NT-Xent's constant-output level
    log(2B − 1) (:func:`gigassl.loss.constant_output_loss`), else None.

    Measured on the demo cohort (random tile encoder, A = 8, K = 16, batch 20): the loss goes
    from 5.8 to 3.57 ≈ log 39 = 3.66 within 10 epochs and stays there, collapse level 0.81,
    positive-pair accuracy 0.06: in those features a slide's bank augmentations differ more than
    slides do, so there is nothing for the loss to learn but a constant.
    """
    level = losses.constant_output_loss(batch)
    if not train_loss >= STALL_LOSS_SHARE * level:
        return None
    return (
        f"the training loss {train_loss:.3f} is at the level of a constant output, log(2B − 1) = {level:.3f} "
        f"for a batch of {batch} slides (train positive-pair accuracy {train_accuracy:.3f}, chance {1 / (2 * batch - 1):.3f}): "
        "the model does not tell a slide's two views from other slides' views and is collapsing. Usual causes: tile "
        "features whose bank augmentations move a slide more than slides differ (a random or weak tile encoder), "
        "too few tiles per view, or too high a learning rate"
    )


def needs_grad_scaling(amp_dtype: Optional[torch.dtype], sparse_backend: str) -> bool:
    """Loss scaling is needed when some of the forward pass runs in float16: autocast in fp16,
    or spconv under any CUDA autocast (its convolutions cast to fp16 even inside bf16 autocast)."""
    return amp_dtype == torch.float16 or (amp_dtype is not None and sparse_backend == "spconv")


def restore_scaler(scaler: torch.amp.GradScaler, saved: Mapping[str, Any]) -> None:
    """Load a checkpoint's GradScaler state when it has one; a run saved without scaling (on the
    CPU, or in bf16) resumed with scaling starts from a fresh scaler instead of an empty state."""
    if scaler.is_enabled() and saved:
        scaler.load_state_dict(saved)


def _grad_norm(model: nn.Module) -> float:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


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
    check_config(config)
    context = init_distributed(config.device)
    try:
        return _train(config, context)
    finally:
        if context.initialised_here:
            dist.destroy_process_group()


def _train(config: TrainConfig, context: DistContext) -> TrainResult:
    device = context.device
    out = Path(config.out)
    previous_run = claim_output_folder(out, config)
    cohort = scan_features_folder(config.features, config.n_tiles_per_view, skip_bad_files=config.skip_bad_files,
                                  check_finite=config.check_finite, allow_mixed_grids=config.allow_mixed_grids)
    batch = global_batch_size(config.batch_size, len(cohort.slides), context.world_size)
    resume = load_checkpoint(config.resume) if config.resume is not None else None
    if resume is not None:
        check_resume(resume, config, cohort)

    torch.manual_seed(config.seed)  # the projector's initial weights
    resnet, head, init_info = initial_head(config, cohort)
    model = GigaSSLModel(resnet, config.projector_dim, device, config.sparse_backend, head)
    del resnet
    if context.world_size > 1:
        use_global_batch_norm(model)
        trained: nn.Module = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        trained = model

    scale_range = (config.scale_min, config.scale_max)
    dataset = SlideViewDataset(cohort, config.n_tiles_per_view, scale_range, config.seed)
    sampler = EpochBatchSampler(len(cohort.slides), batch, config.seed, context.rank, context.world_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_slide_views, num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if config.num_workers > 0 else None,
    )
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr * batch / 256, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(config.warmup_epochs * steps_per_epoch, total_steps))
    amp_dtype = autocast_dtype(device) if config.mixed_precision else None
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaling(amp_dtype, model.sparse_backend))

    monitor_dataset = SlideViewDataset(cohort, config.n_tiles_per_view, scale_range, config.seed, STREAM_MONITOR)
    monitor_order = np.random.default_rng([config.seed, STREAM_MONITOR]).permutation(len(cohort.slides))
    monitor_indices = sorted(int(i) for i in monitor_order[: max(2, min(config.monitor_slides, len(cohort.slides)))])

    history: list[dict[str, float]] = []
    start_epoch, global_step = 0, 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        restore_scaler(scaler, resume["scaler"])
        set_rng_state(resume["rng"])
        history = [dict(row) for row in resume["history"]]
        start_epoch, global_step = int(resume["epoch"]), int(resume["global_step"])
        log.info("resuming from %s at epoch %d (step %d)", config.resume, start_epoch, global_step)
        if int(resume["config"]["epochs"]) != config.epochs:
            before, now = replan_schedule(scheduler, config.warmup_epochs * steps_per_epoch, total_steps)
            log.info("the run planned %d epochs, now %d: schedule re-planned over %d epochs; lr at step %d: %.4g → %.4g",
                     int(resume["config"]["epochs"]), config.epochs, config.epochs, global_step, before, now)

    base = dict(
        format=CHECKPOINT_FORMAT, format_version=CHECKPOINT_VERSION, package_version=__version__,
        config=config_to_dict(config), slide_ids=cohort.slide_ids, world_size=context.world_size,
        encoder=cohort.encoder.to_dict(), init=None if init_info is None else init_info.to_dict(),
        architecture=model.head.to_dict(), grids=cohort.grids(),
    )
    latest = out / LATEST_CHECKPOINT
    if context.is_main:
        _start_output(out, previous_run, config)
        log.info("training on %d slides (%s), %d ranks, global batch %d, %d steps/epoch, lr %.4g, device %s",
                 len(cohort.slides), cohort.folder, context.world_size, batch, steps_per_epoch,
                 optimizer.param_groups[0]["initial_lr"], device)
    if not history:
        row = dict(epoch=0, global_step=0, lr=float(scheduler.get_last_lr()[0]))
        row.update(monitor_metrics(model, monitor_dataset, monitor_indices, config.temperature, device))
        history.append(row)
    if context.is_main:
        write_monitors(history, out)

    from tqdm.auto import tqdm

    progress = tqdm(total=total_steps, initial=global_step, unit="step", disable=not context.is_main,
                    desc="gigassl train", dynamic_ncols=True)
    trained.train()
    stall_warned = False
    # One pass of the loader runs through all remaining epochs (the keys carry the epoch), so
    # workers prefetch across epoch boundaries and while the monitors are computed.
    sampler.set_epoch(start_epoch + 1, max(start_epoch + 1, config.epochs))
    batches = iter(loader) if start_epoch < config.epochs else iter(())
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            sums = dict(loss=0.0, accuracy=0.0, grad_norm=0.0)
            data_time = 0.0
            epoch_start = tick = time.perf_counter()
            for step in range(1, steps_per_epoch + 1):
                views = next(batches)
                data_time += time.perf_counter() - tick
                loss, accuracy = _step(trained, views, optimizer, scaler, config, device, amp_dtype, context)
                if not math.isfinite(loss):
                    raise TrainingDivergedError(
                        f"the loss became {loss} at epoch {epoch}, step {step} (global step {global_step + 1}); "
                        f"stopped. The last good checkpoint is {latest if latest.exists() else 'none (none written yet)'}. "
                        "Lower --lr, raise --temperature, or check the features"
                    )
                sums["grad_norm"] += _grad_norm(model)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                global_step += 1
                sums["loss"] += loss
                sums["accuracy"] += accuracy
                progress.update(1)
                progress.set_postfix(epoch=epoch, loss=f"{loss:.4f}")
                tick = time.perf_counter()
            elapsed = time.perf_counter() - epoch_start
            row = dict(epoch=epoch, global_step=global_step, lr=float(scheduler.get_last_lr()[0]),
                       train_loss=sums["loss"] / steps_per_epoch, train_accuracy=sums["accuracy"] / steps_per_epoch,
                       grad_norm=sums["grad_norm"] / steps_per_epoch, data_share=data_time / max(elapsed, 1e-9),
                       epoch_time_s=elapsed)
            row.update(monitor_metrics(model, monitor_dataset, monitor_indices, config.temperature, device))
            history.append(row)
            if context.is_main:
                write_monitors(history, out)
                log.info("epoch %d/%d: train loss %.4f (constant output %.4f), train positive-pair accuracy %.3f "
                         "(chance %.3f, batches of %d slides); monitor loss %.4f, monitor positive-pair accuracy %.3f "
                         "(chance %.3f, %d fixed slides), RankMe %.1f, data %.0f%%", epoch, config.epochs,
                         row["train_loss"], losses.constant_output_loss(batch), row["train_accuracy"],
                         1 / (2 * batch - 1), batch, row["loss"], row["positive_pair_accuracy"],
                         1 / (2 * len(monitor_indices) - 1), len(monitor_indices), row["rankme"],
                         100 * row["data_share"])
                # once, after the warm-up, on the last epochs' mean (one epoch of few steps is noisy)
                if epoch == config.warmup_epochs + max(1, config.epochs // 10) or epoch == config.epochs:
                    recent = [r for r in history if "train_loss" in r][-max(1, config.epochs // 10):]
                    warning = stall_warning(float(np.mean([r["train_loss"] for r in recent])),
                                            float(np.mean([r["train_accuracy"] for r in recent])), batch)
                    if warning and not stall_warned:
                        log.warning("epoch %d: %s", epoch, warning)
                        stall_warned = True
                if epoch % config.checkpoint_every == 0 or epoch == config.epochs:
                    payload = dict(base, epoch=epoch, global_step=global_step, history=history,
                                   model={k: v.detach().cpu() for k, v in model.state_dict().items()},
                                   optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                                   scaler=scaler.state_dict(), rng=rng_state())
                    write_checkpoint(out, epoch, payload, config.keep_checkpoints)
    finally:
        del batches  # shuts the workers down
        progress.close()
        dataset.close()
        monitor_dataset.close()
    if context.world_size > 1:
        dist.barrier()
    csv_path, json_path = out / "monitors.csv", out / "monitors.json"
    curves = plot_curves(history, out / "curves.png") if context.is_main else None
    final = {key: float(value) for key, value in history[-1].items()} if history else {}
    return TrainResult(latest, csv_path, json_path, curves, config.epochs, global_step, final)


def _step(
    trained: nn.Module, views: ViewBatch, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    config: TrainConfig, device: torch.device, amp_dtype: Optional[torch.dtype], context: DistContext,
) -> tuple[float, float]:
    """Forward both views, NT-Xent over the global batch, backward (gradients left unscaled).

    Returns the global-batch loss and positive-pair accuracy (the same on every rank).
    """
    n = views.n_slides
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, enabled=amp_dtype is not None):
        z = trained(views.sparse.to(device, non_blocking=True))  # (2n, projector_dim)
    z = z.float()
    z1, z2 = z[:n], z[n:]
    loss = losses.nt_xent_distributed(z1, z2, config.temperature)  # = nt_xent on one process
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    with torch.no_grad():
        accuracy = losses.positive_pair_accuracy(losses.gather_with_gradient(z1.detach()),
                                                 losses.gather_with_gradient(z2.detach()))
        reported = all_reduce_mean(loss.detach(), context)  # each rank's loss is its anchors' mean
    return float(reported), float(accuracy)
