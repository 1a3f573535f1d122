"""MoCo's per-epoch monitors: the epoch's step means, and the quality of the query encoder.

- :class:`StepResult`: the figures of one training step (:func:`extract.moco.pretrain.train_step`);
- :func:`epoch_row`: means of the per-step figures (loss, positive-key accuracy, q·k⁺ and q·queue
  cosines), the last learning rate and the throughput;
- :func:`representation_monitors`: label-free, on a fixed set of tiles — RankMe of the trunk's and
  the backbone's features, alignment and uniformity of the head's output and InfoNCE on fixed view
  pairs without a queue (it does not move with the queue's staleness, as the training loss does);
- :func:`quality_monitors`: those, plus the linear-probe AUC of :mod:`extract.moco.probe` when
  labels were given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from extract.augment import TileAugmentation
from extract.config import MocoConfig
from extract.device import autocast
from extract.encoders.resnet import ResNet
from extract.encoders.tile_encoder import normalise
from extract.moco.probe import ProbeSet, probe_auc, slide_mean_features
from extract.monitors import alignment, fresh_info_nce, rankme, uniformity

# Alignment needs two views per tile, computed on at most this many tiles.
MONITOR_VIEW_TILES = 256
MONITOR_BATCH = 256


@dataclass
class StepResult:
    loss: float
    accuracy: float  # fraction of queries whose positive key has the largest logit
    positive_cosine: float = 0.0  # mean q·k⁺
    negative_cosine: float = 0.0  # mean q·queue: how close the (possibly stale) negatives are


@torch.no_grad()  # monitors only read the encoder: no autograd graph over the fixed tiles
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


def quality_monitors(
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


def epoch_row(epoch: int, step: int, steps: list[StepResult], lr: float, batch_size: int, seconds: float) -> dict[str, Any]:
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
