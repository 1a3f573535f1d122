"""What a MoCo run carries (:class:`MocoRun`) and how it is set up before any resume (:func:`set_up`).

:class:`MocoRun` is the shared :class:`extract.training.run_state.TrainingRun` (torchrun context,
model, what the steps run, SGD, grad scaler, plan, progress, output folder) with MoCo's own
fields: its settings, the per-rank view generator and augmentation, the peak learning rate and
the slide names. The loop (:mod:`extract.moco.pretrain`) and the checkpoint functions
(:mod:`extract.checkpoints.moco`) take it whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from extract.augment import TileAugmentation
from extract.config import MocoConfig
from extract.device import DistContext, autocast_dtype
from extract.errors import UserError
from extract.moco.model import MoCo
from extract.training.run_state import TrainingRun
from extract.training.schedule import WarmupCosine

SGD_MOMENTUM = 0.9


@dataclass(kw_only=True)
class MocoRun(TrainingRun):
    """A MoCo run: ``model`` the MoCo model, ``trained`` its query encoder (in DDP under torchrun)."""

    model: MoCo
    config: MocoConfig
    generator: torch.Generator  # this rank's views
    base_lr: float  # the peak learning rate: --lr scaled by batch / 256
    slide_names: list[str]
    augmentation: TileAugmentation = field(default_factory=TileAugmentation)

    @property
    def schedule(self) -> WarmupCosine:
        """Cosine decay to 0 over the run's steps, without warm-up."""
        return WarmupCosine(0, self.total_steps)


def set_up(config: MocoConfig, context: DistContext, out: Path, slide_names: list[str]) -> MocoRun:
    """Model, SGD, grad scaler and this rank's view generator, before any resume."""
    steps_per_epoch = config.tiles_per_epoch // config.batch_size
    if steps_per_epoch < 1:
        raise UserError(f"--tiles-per-epoch {config.tiles_per_epoch} is smaller than --batch-size {config.batch_size}")
    device = context.device
    torch.manual_seed(config.seed)
    model = MoCo(config.queue_size, seed=config.seed, arch=config.arch).to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's Module.to overloads omit memory_format
    base_lr = config.lr * config.batch_size / 256
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=base_lr, momentum=SGD_MOMENTUM, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=config.mixed_precision and autocast_dtype(device) == torch.float16)
    generator = torch.Generator().manual_seed(config.seed * 1000 + context.rank)  # views differ across ranks
    query_encoder: nn.Module = model.encoder_q
    if context.world_size > 1:
        query_encoder = DistributedDataParallel(model.encoder_q, device_ids=[device.index] if device.type == "cuda" else None)
    return MocoRun(
        context=context,
        model=model,
        trained=query_encoder,
        optimizer=optimizer,
        scaler=scaler,
        out=out,
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        config=config,
        generator=generator,
        base_lr=base_lr,
        slide_names=slide_names,
    )
