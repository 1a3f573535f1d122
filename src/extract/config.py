"""Settings of stage 1, one frozen dataclass per job, shared by the CLI and the Python API.

This module imports nothing heavy, so ``gigassl --help`` stays fast. Each field's ``help``
metadata is its documentation and becomes the command-line help; field ``foo_bar`` is the
flag ``--foo-bar``. The settings used are written into every output file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass(frozen=True)
class ExtractConfig:
    """Tile extraction: slides → tissue → tile grid → plain features and/or augmented bank."""

    slides: Path = field(metadata=_help("folder of slides (OpenSlide formats, or jpg/png/tif with --mpp-csv or --default-mpp)", required=True))
    out: Path = field(metadata=_help("output folder; features go to OUT/features/{slide}.h5", required=True))
    encoder: str = field(default="random", metadata=_help("ResNet18 checkpoint (torchvision, MoCo or gigassl pretrain-tiles), or 'random'"))
    mpp: float = field(default=0.5, metadata=_help("target resolution in µm/px (0.5 ≈ 20×, 1.0 ≈ 10× as in the paper)"))
    tile_size: int = field(default=224, metadata=_help("tile side in pixels at the target resolution"))
    tissue_threshold: float = field(default=0.5, metadata=_help("keep tiles whose tissue fraction is at least this"))
    mpp_csv: Optional[Path] = field(default=None, metadata=_help("CSV with columns slide,mpp overriding the slides' metadata"))
    default_mpp: Optional[float] = field(default=None, metadata=_help("µm/px of level 0 for slides without metadata (plain images); a CSV entry wins"))
    plain: bool = field(default=True, metadata=_help("write plain (non-augmented) features of every tissue tile"))
    bank: bool = field(default=True, metadata=_help("write the shared-augmentation bank"))
    n_augmentations: int = field(default=50, metadata=_help("A: augmentations per slide in the bank"))
    n_tiles_per_augmentation: int = field(default=256, metadata=_help("K: tiles per augmentation in the bank"))
    seed: int = field(default=0, metadata=_help("seed of the bank's tile sampling and augmentations"))
    batch_size: int = field(default=64, metadata=_help("tiles per encoder batch"))
    num_workers: int = field(default=2, metadata=_help("DataLoader workers reading tiles"))
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda or cuda:N"))
    mixed_precision: bool = field(default=True, metadata=_help("bf16/fp16 autocast where the device supports it"))
    overwrite: bool = field(default=False, metadata=_help("redo slides whose complete output exists"))
    strict: bool = field(default=False, metadata=_help("exit non-zero when any slide failed"))
    shard: str = field(default="0/1", metadata=_help("i/n: process the i-th of n interleaved parts of the slide list (SLURM arrays: $SLURM_ARRAY_TASK_ID/N)"))
    qc: bool = field(default=True, metadata=_help("write a QC thumbnail PNG per slide with the kept tiles drawn"))


@dataclass(frozen=True)
class MocoConfig:
    """MoCo v2 pre-training of the ResNet18 tile encoder, tiles sampled online from slides."""

    slides: Path = field(metadata=_help("folder of slides", required=True))
    out: Path = field(metadata=_help("output folder for checkpoints and monitors", required=True))
    mpp: float = field(default=0.5, metadata=_help("resolution of the sampled tiles in µm/px"))
    tile_size: int = field(default=224, metadata=_help("tile side in pixels at the target resolution"))
    mpp_csv: Optional[Path] = field(default=None, metadata=_help("CSV slide,mpp overriding the slides' metadata"))
    default_mpp: Optional[float] = field(default=None, metadata=_help("µm/px for slides without metadata"))
    tissue_threshold: float = field(default=0.5, metadata=_help("keep tiles whose tissue fraction is at least this"))
    epochs: int = field(default=200, metadata=_help("training epochs"))
    tiles_per_epoch: int = field(default=65536, metadata=_help("tiles sampled per epoch across all slides"))
    batch_size: int = field(default=256, metadata=_help("tiles per step"))
    queue_size: int = field(default=65536, metadata=_help("MoCo queue of negatives"))
    momentum: float = field(default=0.999, metadata=_help("momentum of the key encoder"))
    temperature: float = field(default=0.2, metadata=_help("InfoNCE temperature"))
    lr: float = field(default=0.03, metadata=_help("SGD learning rate at batch 256 (scaled linearly)"))
    weight_decay: float = field(default=1e-4, metadata=_help("SGD weight decay"))
    profile: str = field(default="default", metadata=_help("'default' or 'small-cpu' (smaller tiles, batch and queue)"))
    seed: int = field(default=0, metadata=_help("random seed"))
    num_workers: int = field(default=2, metadata=_help("DataLoader workers reading tiles"))
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda or cuda:N"))
    checkpoint_every: int = field(default=10, metadata=_help("write a checkpoint every N epochs (and at the end)"))
    resume: Optional[Path] = field(default=None, metadata=_help("checkpoint to resume from"))
