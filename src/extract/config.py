"""Settings of stage 1, one frozen dataclass per job, shared by the CLI and the Python API.

This module imports nothing heavy, so ``gigassl --help`` stays fast. Each field's ``help``
metadata is its documentation and becomes the command-line help; field ``foo_bar`` is the
flag ``--foo-bar``, a tuple field takes comma-separated values on the command line. Each
dataclass checks its values when built and names every problem in one message
(:mod:`extract.settings`), so the Python API and the CLI give the same messages. The settings
used are written into every output file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from extract.errors import UserError
from extract.settings import as_tuples, flag, flag_help, refuse


def parse_channel_stats(
    value: Sequence[float] | Sequence[str] | None, label: str, positive: bool = False
) -> tuple[float, float, float] | None:
    """Three numbers (or their texts, as the command line gives them) → a tuple of three finite
    floats (all > 0 with ``positive``); None stays None. ``label`` (a flag or file) starts the
    error's one line."""
    if value is None:
        return None
    try:
        stats = () if isinstance(value, str) else tuple(float(v) for v in value)
    except (TypeError, ValueError):
        stats = ()
    if len(stats) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in stats):
        raise UserError(
            f"{label} {value!r}: give three finite numbers R,G,B{' > 0' if positive else ''}, e.g. "
            + ("0.229,0.224,0.225" if positive else "0.485,0.456,0.406")
        )
    return stats


def _channel_problems(config: Any, name: str, positive: bool = False) -> list[str]:
    """Store the field ``name`` (R,G,B) of the frozen ``config`` as three floats; its problem, if any."""
    try:
        object.__setattr__(config, name, parse_channel_stats(getattr(config, name), flag(name), positive))
    except UserError as error:
        return [str(error)]
    return []


def _resolution_problems(target_mpp: float, default_mpp: float | None, tissue_threshold: float) -> list[str]:
    """The checks ExtractConfig and MocoConfig share: the resolutions, and which tiles are kept."""
    problems = []
    if not (target_mpp > 0 and math.isfinite(target_mpp)):
        problems.append(f"--target-mpp {target_mpp}: must be a positive µm/px (0.5 ≈ 20×, 1.0 ≈ 10×)")
    if default_mpp is not None and not (default_mpp > 0 and math.isfinite(default_mpp)):
        problems.append(f"--default-mpp {default_mpp}: must be a positive µm/px")
    if not 0.0 <= tissue_threshold <= 1.0:
        problems.append(f"--tissue-threshold {tissue_threshold}: must lie in [0, 1]")
    return problems


def _grid_problems(limits: Any) -> list[str]:
    """The problems of the grid bounds of ``limits`` (a GridLimits or an ExtractConfig)."""
    problems = []
    if not 0 < limits.min_level0_mpp < limits.max_level0_mpp:
        problems.append(
            f"--min-level0-mpp {limits.min_level0_mpp} and --max-level0-mpp {limits.max_level0_mpp}: need 0 < min < max"
        )
    if not limits.max_upscale >= 1:
        problems.append(f"--max-upscale {limits.max_upscale}: must be at least 1 (1 = never up-scale level 0)")
    if limits.max_tiles_per_slide < 1:
        problems.append(f"--max-tiles-per-slide {limits.max_tiles_per_slide}: must be at least 1")
    return problems


@dataclass(frozen=True)
class GridLimits:
    """Bounds that refuse a slide before its tile grid is planned, so that a wrong µm/px can
    cost neither a node's memory nor hours of work.

    ``min_level0_mpp``/``max_level0_mpp`` (0.05, 20): the µm/px of level 0 must lie in this
    range — scanners and microscope cameras give 0.1–2, and a TIFF resolution tag of 72 or
    96 dpi (352.8 or 264.6 µm/px) is image software's default, not a measurement.
    ``max_upscale`` (4): the target µm/px may be at most this many times finer than level 0.
    ``max_tiles_per_slide`` (1,000,000): the grid of candidate tiles (tissue or not) may have
    at most this many positions. Planning costs ~100 bytes per position (measured: 88), so
    ~100 MB at most, and the job's list of tiles to read a few hundred bytes per kept tile; a
    whole TCGA slide at 0.5 µm/px and 224 px has ~100,000 positions.
    """

    min_level0_mpp: float = 0.05
    max_level0_mpp: float = 20.0
    max_upscale: float = 4.0
    max_tiles_per_slide: int = 1_000_000

    def __post_init__(self) -> None:
        refuse("grid-limit", _grid_problems(self))


@dataclass(frozen=True)
class ExtractConfig:
    """Tile extraction: slides → tissue → tile grid → plain features and/or augmented bank."""

    slides: Path = field(
        metadata=flag_help("folder of slides (OpenSlide formats, or jpg/png/tif with --mpp-csv or --default-mpp)", required=True)
    )
    out: Path = field(metadata=flag_help("output folder; features go to OUT/features/{slide}.h5", required=True))
    encoder: Optional[str] = field(
        default=None,
        metadata=flag_help(
            "required: a ResNet18/34/50 checkpoint (torchvision, MoCo, Lightning or gigassl pretrain-tiles; architecture read from its keys), a torch.export program PATH.pt2 (preprocessing in PATH.json or the flags below), or 'random' / 'random:resnet50' (an untrained network, said so in the files)"
        ),
    )
    encoder_input_size_px: Optional[int] = field(
        default=None,
        metadata=flag_help(
            "side in px the encoder takes; tiles of another --tile-size-px are resized to it (default: a .pt2 program's sidecar or static input, any size for ResNets)"
        ),
    )
    encoder_mean: Optional[tuple[float, ...]] = field(
        default=None,
        metadata=flag_help(
            "R,G,B mean the encoder's inputs are normalised with (default: a .pt2 program's sidecar, ImageNet's for ResNets)",
            metavar="R,G,B",
        ),
    )
    encoder_std: Optional[tuple[float, ...]] = field(
        default=None,
        metadata=flag_help("R,G,B standard deviation of that normalisation (default: as --encoder-mean)", metavar="R,G,B"),
    )
    target_mpp: float = field(
        default=0.5, metadata=flag_help("target resolution in µm/px (0.5 ≈ 20×, 1.0 ≈ 10× as in the paper)")
    )
    tile_size_px: int = field(default=224, metadata=flag_help("tile side in pixels at the target resolution"))
    tissue_threshold: float = field(default=0.5, metadata=flag_help("keep tiles whose tissue fraction is at least this"))
    max_ink_fraction: float = field(
        default=0.1, metadata=flag_help("leave out tiles with more than this share of pen ink (blue, green, black marker)")
    )
    mpp_csv: Optional[Path] = field(
        default=None, metadata=flag_help("CSV with columns slide,mpp overriding the slides' metadata")
    )
    default_mpp: Optional[float] = field(
        default=None, metadata=flag_help("µm/px of level 0 for slides without metadata (plain images); a CSV entry wins")
    )
    plain: bool = field(default=True, metadata=flag_help("write plain (non-augmented) features of every tissue tile"))
    bank: bool = field(default=True, metadata=flag_help("write the shared-augmentation bank"))
    n_augmentations: int = field(default=50, metadata=flag_help("A: augmentations per slide in the bank"))
    n_tiles_per_augmentation: int = field(default=256, metadata=flag_help("K: tiles per augmentation in the bank"))
    seed: int = field(default=0, metadata=flag_help("seed of the bank's tile sampling and augmentations"))
    batch_size: int = field(default=64, metadata=flag_help("tiles per encoder batch"))
    num_workers: int = field(default=2, metadata=flag_help("DataLoader workers reading tiles"))
    device: str = field(default="auto", metadata=flag_help("auto, cpu, cuda or cuda:N"))
    mixed_precision: bool = field(default=True, metadata=flag_help("bf16/fp16 autocast where the device supports it"))
    overwrite: bool = field(default=False, metadata=flag_help("redo slides whose complete output exists"))
    strict: bool = field(default=False, metadata=flag_help("exit non-zero when any slide failed"))
    shard: str = field(
        default="0/1",
        metadata=flag_help(
            "i/n: process the i-th of n interleaved parts of the slide list (SLURM arrays: $SLURM_ARRAY_TASK_ID/N)"
        ),
    )
    qc: bool = field(default=True, metadata=flag_help("write a QC thumbnail PNG per slide with the kept tiles drawn"))
    claim_timeout_s: float = field(
        default=600.0,
        metadata=flag_help(
            "a slide claimed by a job on another host whose heartbeat (every tenth of this) is older than this is taken over"
        ),
    )
    verify_all: bool = field(
        default=False,
        metadata=flag_help(
            "read every existing output whole to check its checksums, not only those changed since the manifest recorded them"
        ),
    )
    min_level0_mpp: float = field(
        default=GridLimits.min_level0_mpp,
        metadata=flag_help("refuse a slide whose level-0 µm/px (metadata, CSV or default) is below this"),
    )
    max_level0_mpp: float = field(
        default=GridLimits.max_level0_mpp,
        metadata=flag_help("refuse a slide whose level-0 µm/px is above this (72 dpi image-software tags say 352.8)"),
    )
    max_upscale: float = field(
        default=GridLimits.max_upscale,
        metadata=flag_help("refuse a slide whose level 0 would be enlarged more than this to reach --target-mpp"),
    )
    max_tiles_per_slide: int = field(
        default=GridLimits.max_tiles_per_slide,
        metadata=flag_help(
            "refuse a slide whose tile grid has more positions than this (bounds the planner's memory, ~100 bytes each)"
        ),
    )
    progress_interval_s: float = field(
        default=30.0, metadata=flag_help("seconds between plain progress lines when stderr is not a terminal (cluster logs)")
    )

    def __post_init__(self) -> None:
        """Check every value, naming every problem in one message (the API and the CLI get the same
        messages); R,G,B become three floats."""
        as_tuples(self, "extraction")
        problems = _channel_problems(self, "encoder_mean") + _channel_problems(self, "encoder_std", positive=True)
        if not (self.plain or self.bank):
            problems.append("nothing to do: both --no-plain and --no-bank given")
        problems += _resolution_problems(self.target_mpp, self.default_mpp, self.tissue_threshold)
        if self.tile_size_px < 16:
            problems.append(f"--tile-size-px {self.tile_size_px}: must be at least 16 px")
        if self.batch_size < 1 or self.num_workers < 0:
            problems.append(f"--batch-size {self.batch_size} must be ≥ 1 and --num-workers {self.num_workers} ≥ 0")
        if self.bank and (self.n_augmentations < 1 or self.n_tiles_per_augmentation < 1):
            problems.append("--n-augmentations and --n-tiles-per-augmentation must be ≥ 1")
        problems += _grid_problems(self)
        if not 0.0 <= self.max_ink_fraction <= 1.0:
            problems.append(f"--max-ink-fraction {self.max_ink_fraction}: must lie in [0, 1]")
        if not self.progress_interval_s >= 0:
            problems.append(f"--progress-interval-s {self.progress_interval_s}: must be ≥ 0")
        if not self.claim_timeout_s > 0:
            problems.append(f"--claim-timeout-s {self.claim_timeout_s}: must be positive (seconds)")
        refuse("extraction", problems)

    def grid_limits(self) -> GridLimits:
        """The bounds a slide must meet before its grid is planned."""
        return GridLimits(self.min_level0_mpp, self.max_level0_mpp, self.max_upscale, self.max_tiles_per_slide)


# The values of the settings a profile sets. A MocoConfig field left at _FROM_PROFILE (None) takes
# its --profile's value; a value given explicitly, even one equal to another profile's, is kept.
# "small-cpu": a useful encoder from ~200 images in ≤ 45 min on 2 CPU cores.
MOCO_PROFILES: dict[str, dict[str, Any]] = {
    "default": {
        "tile_size_px": 224,
        "batch_size": 256,
        "queue_size": 65536,
        "tiles_per_epoch": 65536,
        "epochs": 200,
        "momentum": 0.999,
        "monitor_tiles": 1024,
        "checkpoint_every": 10,
    },
    "small-cpu": {
        "tile_size_px": 96,
        "batch_size": 64,
        "queue_size": 4096,
        "tiles_per_epoch": 8192,
        "epochs": 20,
        "momentum": 0.99,
        "monitor_tiles": 512,
        "checkpoint_every": 5,
    },
}
_FROM_PROFILE: Any = None  # typed Any so a field of any type can default to "the profile's value"


def _profiled(name: str, text: str, **extra: Any) -> dict[str, Any]:
    """Field metadata whose help ends with the value of ``name`` in each profile."""
    values = "; ".join(f"{profile}: {settings[name]}" for profile, settings in MOCO_PROFILES.items())
    return flag_help(f"{text} ({values})", **extra)


MOCO_ARCHITECTURES = ("resnet18", "resnet34", "resnet50")  # extract.encoders.resnet.ARCHITECTURES, without importing torch
# MocoConfig's counts that must be at least 1
MOCO_POSITIVE = (
    "tile_size_px",
    "epochs",
    "tiles_per_epoch",
    "tiles_per_visit",
    "batch_size",
    "queue_size",
    "checkpoint_every",
    "keep_checkpoints",
    "probe_tiles_per_slide",
)


@dataclass(frozen=True)
class MocoConfig:
    """MoCo v2 pre-training of a ResNet tile encoder (--arch), tiles sampled online from slides.

    The fields listed in ``MOCO_PROFILES`` take the value of ``--profile`` (``default`` or
    ``small-cpu``) unless given explicitly; an explicit value always wins, whatever it is.
    """

    slides: Path = field(
        metadata=flag_help("folder of slides (OpenSlide formats, or jpg/png/tif with --mpp-csv or --default-mpp)", required=True)
    )
    out: Path = field(
        metadata=flag_help("output folder: OUT/encoder.pt, OUT/last.pt, OUT/checkpoints/, OUT/monitors.csv|json", required=True)
    )
    arch: str = field(
        default="resnet18",
        metadata=flag_help("the ResNet trained: resnet18, resnet34 or resnet50 (tile features of 256, 256, 1024 dims)"),
    )
    target_mpp: float = field(
        default=0.5,
        metadata=flag_help("resolution of the sampled tiles in µm/px (0.5 ≈ 20×, 1.0 ≈ 10× as in the paper)"),
    )
    tile_size_px: int = field(
        default=_FROM_PROFILE,
        metadata=_profiled("tile_size_px", "tile side in pixels at the target resolution"),
    )
    mpp_csv: Optional[Path] = field(default=None, metadata=flag_help("CSV slide,mpp overriding the slides' metadata"))
    default_mpp: Optional[float] = field(
        default=None, metadata=flag_help("µm/px of level 0 for slides without metadata (plain images); a CSV entry wins")
    )
    tissue_threshold: float = field(default=0.5, metadata=flag_help("keep tiles whose tissue fraction is at least this"))
    epochs: int = field(default=_FROM_PROFILE, metadata=_profiled("epochs", "training epochs"))
    tiles_per_epoch: int = field(
        default=_FROM_PROFILE,
        metadata=_profiled("tiles_per_epoch", "tiles sampled per epoch across all slides, slides drawn uniformly"),
    )
    tiles_per_visit: int = field(
        default=8,
        metadata=flag_help("consecutive tiles drawn from one slide, so a reader opens each slide once per run of tiles"),
    )
    batch_size: int = field(default=_FROM_PROFILE, metadata=_profiled("batch_size", "tiles per step, all processes together"))
    queue_size: int = field(default=_FROM_PROFILE, metadata=_profiled("queue_size", "MoCo queue of negative keys"))
    momentum: float = field(default=_FROM_PROFILE, metadata=_profiled("momentum", "momentum of the key encoder"))
    temperature: float = field(default=0.2, metadata=flag_help("InfoNCE temperature"))
    lr: float = field(
        default=0.03, metadata=flag_help("SGD learning rate at batch 256 (scaled linearly with the batch), cosine decay to 0")
    )
    weight_decay: float = field(default=1e-4, metadata=flag_help("SGD weight decay"))
    profile: str = field(
        default="default", metadata=flag_help("'default' or 'small-cpu' (smaller tiles, batch and queue; see MOCO_PROFILES)")
    )
    seed: int = field(default=0, metadata=flag_help("seed of tile sampling, augmentations and initial weights"))
    num_workers: int = field(default=2, metadata=flag_help("DataLoader workers reading tiles"))
    device: str = field(default="auto", metadata=flag_help("auto, cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)"))
    mixed_precision: bool = field(default=True, metadata=flag_help("bf16/fp16 autocast (CUDA, and bf16 on CPU)"))
    monitor_tiles: int = field(
        default=_FROM_PROFILE,
        metadata=_profiled(
            "monitor_tiles", "fixed tiles on which RankMe, alignment and uniformity are logged each epoch (0: off)"
        ),
    )
    probe_labels: Optional[Path] = field(
        default=None,
        metadata=flag_help(
            "CSV slide,label: each epoch, a linear probe on slide-mean tile features scores the encoder (monitor only; training stays label-free)"
        ),
    )
    probe_tiles_per_slide: int = field(default=16, metadata=flag_help("fixed tiles per labelled slide for --probe-labels"))
    checkpoint_every: int = field(
        default=_FROM_PROFILE, metadata=_profiled("checkpoint_every", "write a checkpoint every N epochs (and at the end)")
    )
    keep_checkpoints: int = field(
        default=3,
        metadata=flag_help(
            "periodic checkpoints kept in OUT/checkpoints (older ones are deleted; OUT/last.pt is always the latest)"
        ),
    )
    resume: Optional[Path] = field(default=None, metadata=flag_help("training checkpoint (OUT/last.pt) to resume from, exactly"))

    def __post_init__(self) -> None:
        """Check every value, naming every problem in one message (the API and the CLI get the same messages)."""
        problems = (
            [] if self.arch in MOCO_ARCHITECTURES else [f"--arch {self.arch!r}: choose one of {', '.join(MOCO_ARCHITECTURES)}"]
        )
        if self.profile not in MOCO_PROFILES:  # the checks below need the profile's values
            refuse("pre-training", [*problems, f"--profile {self.profile!r}: choose one of {sorted(MOCO_PROFILES)}"])
        for name, value in MOCO_PROFILES[self.profile].items():
            if getattr(self, name) is None:  # left to the profile (frozen: set once, here)
                object.__setattr__(self, name, value)
        problems += _resolution_problems(self.target_mpp, self.default_mpp, self.tissue_threshold)
        problems += [
            f"{flag(name)} {getattr(self, name)}: must be at least 1" for name in MOCO_POSITIVE if getattr(self, name) < 1
        ]
        if not 0.0 <= self.momentum < 1.0:
            problems.append(f"--momentum {self.momentum}: must lie in [0, 1)")
        if self.temperature <= 0 or self.lr <= 0:
            problems.append("--temperature and --lr must be positive")
        if self.monitor_tiles < 0 or self.num_workers < 0:
            problems.append("--monitor-tiles and --num-workers must be ≥ 0")
        refuse("pre-training", problems)
