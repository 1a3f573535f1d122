"""MoCo's checkpoints: the resumable training state (``last.pt``, ``checkpoints/epoch_NNNN.pt``) and
the tile encoder it hands to extraction (``encoder.pt``).

A training checkpoint is a plain dict readable with ``torch.load(weights_only=True)``: ``format``,
``version``, ``arch``, ``state_dict`` (``encoder_q.*``, ``encoder_k.*``, ``queue.keys``,
``queue.ptr``: MoCo's own layout), ``optimizer``, ``scaler``, per-rank RNG states, ``epoch``,
``step``, ``config``, ``monitors``, ``slides`` and ``content_sha256`` (the seal of
:mod:`extract.checkpoints.sealed`). ``--resume`` refuses a checkpoint of another format version
(written by an older gigassl: run ``gigassl pretrain-tiles`` again), an unsealed or damaged one,
and one whose settings in :data:`RESUME_MUST_MATCH` differ from the run's. The functions take the
run whole (:class:`extract.moco.setup.MocoRun`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from extract.checkpoints.sealed import load_sealed
from extract.config import MocoConfig
from extract.device import world_size
from extract.encoders.resnet import ResNet, build_resnet
from extract.encoders.tile_encoder import save_encoder_checkpoint
from extract.errors import UserError
from extract.moco.model import MoCo, all_gather
from extract.moco.setup import MocoRun
from extract.settings import settings_dict

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "gigassl-moco-checkpoint"
CHECKPOINT_VERSION = 2  # 2: sealed, settings under their current names, ``arch`` always in ``config``
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


def save_encoder(model: MoCo, path: Path, config: MocoConfig, epoch: int) -> None:
    """``encoder.pt``: accepted by :func:`extract.encoders.kinds.load_encoder` (atomic write)."""
    temporary = path.with_name(f".{path.name}.partial")
    save_encoder_checkpoint(
        encoder_resnet(model),
        temporary,
        extra={"trained_by": "gigassl pretrain-tiles (MoCo v2)", "epoch": epoch, "config": settings_dict(config)},
    )
    os.replace(temporary, path)


def _rng_states(generator: torch.Generator) -> dict[str, list[torch.Tensor]]:
    """This process's RNG states, gathered from every rank (rank order)."""
    states = {"augment": generator.get_state(), "torch": torch.random.get_rng_state()}
    if world_size() == 1:
        return {name: [state] for name, state in states.items()}
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return {name: [part.cpu() for part in all_gather(state.to(device)).chunk(world_size())] for name, state in states.items()}


def checkpoint_payload(run: MocoRun) -> dict[str, Any]:
    """Everything needed to continue exactly after the run's ``epoch`` epochs (plain tensors and data).
    Every rank calls it (the RNG states are gathered); the main rank writes it."""
    model = run.model
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "arch": model.arch,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {},
        "rng": _rng_states(run.generator),
        "epoch": run.epoch,
        "step": run.global_step,
        "config": settings_dict(run.config),
        "monitors": run.history,
        "slides": run.slide_names,
    }


def load_training_checkpoint(path: Path, config: MocoConfig) -> dict[str, Any]:
    """Read and check a training checkpoint for ``--resume`` (weights_only, sealed, same settings)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--resume {path} does not exist; pass OUT/last.pt or OUT/checkpoints/epoch_NNNN.pt")
    raw = load_sealed(
        path,
        f"--resume {path}",
        CHECKPOINT_FORMAT,
        CHECKPOINT_VERSION,
        "a `gigassl pretrain-tiles` training checkpoint (OUT/last.pt)",
        "run `gigassl pretrain-tiles` again without --resume",
    )
    saved, current = raw["config"], settings_dict(config)  # a field missing from the checkpoint reads None
    differ = [
        f"--{k.replace('_', '-')} {saved.get(k)} (checkpoint) vs {current[k]}"
        for k in RESUME_MUST_MATCH
        if saved.get(k) != current[k]
    ]
    if differ:
        raise UserError(f"--resume {path}: settings differ from the checkpoint's; pass the same values: " + "; ".join(differ))
    return raw


def restore_training_state(raw: dict[str, Any], run: MocoRun) -> None:
    """Load a checked checkpoint into the run: weights, optimiser, scaler, this rank's RNG states,
    epochs and steps done, monitor rows so far."""
    context = run.context
    run.model.load_state_dict(raw["state_dict"])
    run.optimizer.load_state_dict(raw["optimizer"])
    if raw["scaler"] and run.scaler.is_enabled():
        run.scaler.load_state_dict(raw["scaler"])
    if len(raw["rng"]["augment"]) == context.world_size:
        run.generator.set_state(raw["rng"]["augment"][context.rank])
        torch.random.set_rng_state(raw["rng"]["torch"][context.rank])
    else:
        logger.warning(
            "checkpoint written by %d processes, resuming with %d: RNG streams restart (not exact)",
            len(raw["rng"]["augment"]),
            context.world_size,
        )
    if raw["slides"] != run.slide_names:
        logger.warning("the slide set differs from the checkpoint's; tile plans will differ")
    run.epoch, run.global_step, run.history = int(raw["epoch"]), int(raw["step"]), list(raw["monitors"])
