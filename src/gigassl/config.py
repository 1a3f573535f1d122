"""Settings of stage 2, one frozen dataclass per job, shared by the CLI and the Python API.

Imports nothing heavy. Each field's ``help`` metadata documents it and becomes the
command-line help; field ``foo_bar`` is the flag ``--foo-bar``. List-valued settings are
tuples, comma-separated on the command line. The settings used are written into every
checkpoint and output file. Each dataclass checks itself when made and names every problem in
one message (:mod:`extract.settings`), so the Python API gets the command's messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from extract.settings import as_tuples, flag_help, refuse, too_small

SPARSE_BACKENDS = ("auto", "torch", "spconv")  # gigassl.sparse.conv implements them
EMBED_EXPORTS = ("npz", "csv")  # files `gigassl embed --export` writes beside the HDF5 file
EVALUATE_TASKS = ("classification", "survival", "regression")
EVALUATE_BASELINES = ("average", "abmil", "topk")  # the baselines `gigassl evaluate` runs (gigassl.evaluate.BASELINES)


SPARSE_BACKEND_HELP = (
    "sparse convolutions: auto (torch), torch (plain PyTorch, any device) or spconv (needs the "
    "spconv extra, x86-64 Linux/Windows); checkpoints run with either"
)


MIXED_PRECISION_HELP = (
    "autocast: bf16 (fp16 on GPUs without bf16) on CUDA, bf16 on CPUs with bf16 units (AVX512-BF16, "
    "AMX, Arm BF16), none elsewhere"
)


def backend_problems(backend: str) -> list[str]:
    """The problem of a ``--sparse-backend`` value, if any."""
    return (
        [] if backend in SPARSE_BACKENDS else [f"--sparse-backend must be one of {', '.join(SPARSE_BACKENDS)} (got {backend!r})"]
    )


@dataclass(frozen=True)
class TrainConfig:
    """Giga-SSL training: sparse layer4 + projector, NT-Xent over two augmented views per slide."""

    features: Path = field(metadata=flag_help("folder of per-slide HDF5 files with the augmented bank", required=True))
    out: Path = field(metadata=flag_help("output folder for checkpoints, monitors and curves", required=True))
    init: Optional[str] = field(
        default=None,
        metadata=flag_help(
            "ResNet18/34/50 checkpoint whose layer4 initialises the sparse head, or 'random' (default: the tile encoder named in the feature files when it was random; features of other encoders, e.g. exported programs, get a randomly initialised head of their width)"
        ),
    )
    n_tiles_per_view: int = field(default=5, metadata=flag_help("T: tiles sampled per view (the paper's best is 5)"))
    batch_size: int = field(
        default=256, metadata=flag_help("slides per step across all ranks (two views each); capped at the cohort size")
    )
    epochs: int = field(
        default=1000,
        metadata=flag_help(
            "training epochs in all (with --resume it may differ from the run's, to train longer or stop sooner: the warm-up + cosine schedule is then re-planned over the new total)"
        ),
    )
    lr: float = field(default=0.03, metadata=flag_help("Adam learning rate at batch 256 (scaled linearly)"))
    weight_decay: float = field(default=0.0, metadata=flag_help("Adam weight decay"))
    warmup_epochs: int = field(default=10, metadata=flag_help("linear warm-up epochs before the cosine decay"))
    temperature: float = field(default=0.05, metadata=flag_help("NT-Xent temperature"))
    scale_min: float = field(
        default=0.5,
        metadata=flag_help("slide-level augmentation: lower bound of the per-axis scale (paper 0.5, original code 0.7)"),
    )
    scale_max: float = field(
        default=2.0,
        metadata=flag_help("slide-level augmentation: upper bound of the per-axis scale (paper 2, original code 1.3)"),
    )
    projector_dim: int = field(default=256, metadata=flag_help("output size of the projector MLP"))
    seed: int = field(default=0, metadata=flag_help("random seed"))
    num_workers: int = field(
        default=2,
        metadata=flag_help("DataLoader worker processes reading views while the model steps (0: read in the training process)"),
    )
    device: str = field(default="auto", metadata=flag_help("auto, cpu, cuda or cuda:N"))
    mixed_precision: bool = field(default=True, metadata=flag_help(MIXED_PRECISION_HELP))
    sparse_backend: str = field(default="auto", metadata=flag_help(SPARSE_BACKEND_HELP))
    checkpoint_every: int = field(default=50, metadata=flag_help("write a checkpoint every N epochs (and at the end)"))
    keep_checkpoints: int = field(
        default=2,
        metadata=flag_help(
            "periodic checkpoints kept in OUT/checkpoints (older ones are deleted; OUT/checkpoint.pt is always the latest)"
        ),
    )
    monitor_slides: int = field(default=64, metadata=flag_help("fixed slides used for the label-free monitors"))
    resume: Optional[Path] = field(
        default=None, metadata=flag_help("checkpoint to resume from (same settings, except --epochs and where outputs go)")
    )
    skip_bad_files: bool = field(
        default=False,
        metadata=flag_help("skip feature files without a bank or unreadable (logged) instead of refusing the folder"),
    )
    check_finite: bool = field(
        default=True,
        metadata=flag_help(
            "refuse files with NaN/inf features: each bank is read once and recorded finite in the folder's manifest, then read again only when it changes"
        ),
    )
    recheck_finite: bool = field(
        default=False, metadata=flag_help("with --check-finite, read every bank again, even those recorded finite and unchanged")
    )
    overwrite: bool = field(
        default=False,
        metadata=flag_help(
            "replace a run already in --out (its checkpoints and monitors are deleted); without it, such a folder is refused unless --resume"
        ),
    )
    allow_mixed_grids: bool = field(
        default=False,
        metadata=flag_help(
            "train on feature files extracted at different tile sizes or µm/px (refused otherwise; the grids are recorded in the checkpoint)"
        ),
    )

    def __post_init__(self) -> None:
        problems = too_small(self, 1, ("n_tiles_per_view",))
        if self.batch_size < 2:
            problems.append(f"--batch-size must be ≥ 2 slides (got {self.batch_size})")
        problems += too_small(self, 1, ("epochs",))
        if not self.lr > 0:
            problems.append(f"--lr must be > 0 (got {self.lr})")
        problems += too_small(self, 0, ("warmup_epochs",))
        if not self.temperature > 0:
            problems.append(f"--temperature must be > 0 (got {self.temperature})")
        if not 0 < self.scale_min <= self.scale_max:
            problems.append(f"need 0 < --scale-min ≤ --scale-max (got {self.scale_min}, {self.scale_max})")
        problems += too_small(self, 1, ("checkpoint_every", "keep_checkpoints"))
        problems += too_small(self, 0, ("num_workers",))
        refuse("training", problems + backend_problems(self.sparse_backend))


@dataclass(frozen=True)
class EmbedConfig:
    """Slide embeddings: R views of T plain tiles through the sparse layer4, averaged, L2-normalised."""

    model: Path = field(metadata=flag_help("Giga-SSL checkpoint written by `gigassl train`", required=True))
    features: Path = field(metadata=flag_help("folder of per-slide HDF5 files with plain features", required=True))
    out: Path = field(metadata=flag_help("output HDF5 file of slide embeddings", required=True))
    n_views: int = field(default=50, metadata=flag_help("R: views averaged per slide"))
    n_tiles_per_view: Optional[int] = field(default=None, metadata=flag_help("T (default: the checkpoint's)"))
    batch_size: int = field(default=64, metadata=flag_help("slides per forward batch"))
    seed: int = field(default=0, metadata=flag_help("random seed of the view sampling"))
    device: str = field(default="auto", metadata=flag_help("auto, cpu, cuda or cuda:N"))
    sparse_backend: str = field(default="auto", metadata=flag_help(SPARSE_BACKEND_HELP))
    mixed_precision: bool = field(default=True, metadata=flag_help(MIXED_PRECISION_HELP))
    export: tuple[str, ...] = field(default=(), metadata=flag_help("extra files beside OUT: npz, csv (comma-separated)"))
    strict: bool = field(
        default=False, metadata=flag_help("exit non-zero when any slide file failed (failed files are always listed)")
    )
    allow_other_encoder: bool = field(
        default=False,
        metadata=flag_help(
            "embed features made by another tile encoder than the checkpoint was trained on (refused otherwise; recorded in the output)"
        ),
    )

    def __post_init__(self) -> None:
        as_tuples(self, "embedding")
        object.__setattr__(self, "export", tuple(kind.lower() for kind in self.export))
        problems = too_small(self, 1, ("n_views", "batch_size"))
        if self.n_tiles_per_view is not None:
            problems += too_small(self, 1, ("n_tiles_per_view",))
        unknown = [kind for kind in self.export if kind not in EMBED_EXPORTS]
        if unknown:
            problems.append(f"--export {','.join(self.export)}: unknown {unknown}; choose among {', '.join(EMBED_EXPORTS)}")
        refuse("embedding", problems + backend_problems(self.sparse_backend))


@dataclass(frozen=True)
class EvaluateConfig:
    """Few-label evaluation of slide embeddings against MIL baselines."""

    embeddings: Path = field(metadata=flag_help("HDF5 file written by `gigassl embed`", required=True))
    labels: Path = field(
        metadata=flag_help("CSV with a slide id column, a label column and optionally a patient column", required=True)
    )
    out: Path = field(default=Path("evaluation"), metadata=flag_help("output folder for the table (CSV, JSON) and the plot"))
    features: Optional[Path] = field(default=None, metadata=flag_help("folder of per-slide HDF5 files, needed by the baselines"))
    baselines: tuple[str, ...] = field(
        default=("average",), metadata=flag_help("baselines compared with Giga-SSL, comma-separated: average,abmil,topk")
    )
    reference: str = field(
        default="average",
        metadata=flag_help(
            "method every other one is compared with, split by split (paired differences with 95 % intervals): gigassl, average, abmil or topk"
        ),
    )
    slide_column: str = field(default="slide", metadata=flag_help("name of the slide id column"))
    label_column: str = field(default="label", metadata=flag_help("name of the label column"))
    patient_column: str = field(default="patient", metadata=flag_help("name of the patient column (used when present)"))
    n_splits: int = field(default=10, metadata=flag_help("repeated stratified splits"))
    test_fraction: float = field(default=0.3, metadata=flag_help("share of slides (or patients) held out per split"))
    budgets: tuple[str, ...] = field(
        default=("100%", "25%"),  # DEFAULT_BUDGETS
        metadata=flag_help(
            "training budgets, comma-separated: percentages (25%), slide counts (50) or per-class counts (4/class)"
        ),
    )
    logistic_c: float = field(
        default=10.0,
        metadata=flag_help("C of the logistic regression, the inverse of its L2 regularisation strength (the original's 10)"),
    )
    tune_c: bool = field(default=False, metadata=flag_help("choose C by inner cross-validation instead"))
    seed: int = field(default=0, metadata=flag_help("random seed of the splits"))
    strict: bool = field(default=False, metadata=flag_help("error when label ids are missing from the embeddings"))
    device: str = field(default="auto", metadata=flag_help("device of the MIL baselines"))
    topk: int = field(default=64, metadata=flag_help("k most-attended tiles per slide for top-k fine-tuning"))
    topk_epochs: int = field(
        default=2, metadata=flag_help("top-k fine-tuning epochs over the training slides (one slide per step)")
    )
    shots: tuple[str, ...] = field(
        default=(),
        metadata=flag_help(
            "few-shot protocol: K labelled slides per class, comma-separated (TITAN's: 1,2,4,8,16); replaces --budgets"
        ),
    )
    mil_epochs: int = field(default=50, metadata=flag_help("attention-MIL epochs (the most, with --mil-early-stopping)"))
    mil_lr: float = field(default=1e-3, metadata=flag_help("attention-MIL Adam learning rate (the peak, with a schedule)"))
    mil_lr_schedule: str = field(
        default="constant", metadata=flag_help("attention-MIL learning-rate schedule: constant, cosine or one-cycle")
    )
    mil_weight_decay: float = field(default=1e-4, metadata=flag_help("attention-MIL Adam weight decay (L2)"))
    mil_dropout: float = field(default=0.25, metadata=flag_help("attention-MIL dropout after the first layer"))
    mil_batch_size: int = field(default=8, metadata=flag_help("attention-MIL bags per step"))
    mil_max_tiles: int = field(
        default=512, metadata=flag_help("attention-MIL: most tiles sampled per bag per training step (all when predicting)")
    )
    mil_standardize: bool = field(
        default=True,
        metadata=flag_help("attention-MIL: standard-scale tile features by the training bags' statistics (as AverageMIL does)"),
    )
    mil_early_stopping: bool = field(
        default=False,
        metadata=flag_help(
            "attention-MIL: stop on the loss of a 20 % inner validation split (needs ≥ 2 training slides per class; else fixed epochs)"
        ),
    )
    mil_patience: int = field(
        default=20, metadata=flag_help("attention-MIL early stopping: epochs without a better validation loss (CLAM's 20)")
    )
    slides: Optional[Path] = field(
        default=None,
        metadata=flag_help("folder of the slide files, for top-k (default: the paths recorded in the feature files)"),
    )
    encoder: str = field(
        default="auto",
        metadata=flag_help(
            "tile encoder checkpoint fine-tuned by top-k ('auto': 'random' when the features say so, else required)"
        ),
    )
    task: str = field(
        default="classification",
        metadata=flag_help(
            "classification (--label-column holds classes), survival (--time-column and --event-column; Cox models, C-indices) or regression (--label-column holds a number; ridge, Pearson r, R²); see docs/survival.md"
        ),
    )
    time_column: str = field(
        default="time", metadata=flag_help("survival: the follow-up time column (a duration ≥ 0, one unit for every row)")
    )
    event_column: str = field(
        default="event", metadata=flag_help("survival: the event column, 1 or true = event observed, 0 or false = censored")
    )

    @property
    def budget_texts(self) -> tuple[str, ...]:
        """The training budgets evaluated: ``K/class`` for each of ``shots``, else ``budgets``."""
        return tuple(f"{k}/class" for k in self.shots) if self.shots else self.budgets

    def __post_init__(self) -> None:
        as_tuples(self, "evaluation")
        problems = too_small(self, 2, ("n_splits",)) + too_small(
            self, 1, ("topk", "topk_epochs", "mil_epochs", "mil_batch_size", "mil_max_tiles", "mil_patience")
        )
        problems += _shot_problems(self.shots, self.budgets) + _mil_problems(self)
        unknown = [b for b in self.baselines if b not in EVALUATE_BASELINES]
        if unknown:
            problems.append(f"--baselines: unknown {unknown}; choose among {', '.join(EVALUATE_BASELINES)}")
        if self.reference not in ("gigassl", *EVALUATE_BASELINES):
            problems.append(f"--reference {self.reference!r}: choose gigassl or one of {', '.join(EVALUATE_BASELINES)}")
        if not self.budgets:
            problems.append("--budgets: give at least one budget (e.g. 100%,25%,4/class)")
        if not 0.0 < self.test_fraction < 1.0:
            problems.append(f"--test-fraction must lie in (0, 1) (got {self.test_fraction})")
        if not self.logistic_c > 0:
            problems.append(f"--logistic-c must be > 0 (got {self.logistic_c})")
        if self.task not in EVALUATE_TASKS:
            problems.append(f"--task {self.task!r}: choose one of {', '.join(EVALUATE_TASKS)}")
        elif self.task != "classification" and "topk" in self.baselines:
            problems.append(f"--task {self.task}: top-k fine-tuning is a classifier; choose --baselines among average,abmil")
        refuse("evaluation", problems)


DEFAULT_BUDGETS = ("100%", "25%")
MIL_LR_SCHEDULES = ("constant", "cosine", "one-cycle")  # gigassl.evaluation.mil_training implements them


def _shot_problems(shots: tuple[str, ...], budgets: tuple[str, ...]) -> list[str]:
    """``--shots``: positive integers, and not beside a ``--budgets`` of one's own."""
    bad = [k for k in shots if not (k.isdigit() and int(k) > 0)]
    if bad:
        return [f"--shots {','.join(shots)}: {bad} are not positive whole numbers of slides per class (e.g. 1,2,4,8,16)"]
    if shots and tuple(budgets) != DEFAULT_BUDGETS:
        return ["--shots replaces --budgets: give one of them (to mix, list K/class in --budgets, e.g. 25%,1/class,4/class)"]
    return []


def _mil_problems(config: "EvaluateConfig") -> list[str]:
    """The ``--mil-*`` settings that are out of range, one message each."""
    problems = [] if config.mil_lr > 0 else [f"--mil-lr must be > 0 (got {config.mil_lr})"]
    if config.mil_weight_decay < 0:
        problems.append(f"--mil-weight-decay must be ≥ 0 (got {config.mil_weight_decay})")
    if not 0 <= config.mil_dropout < 1:
        problems.append(f"--mil-dropout must lie in [0, 1) (got {config.mil_dropout})")
    if config.mil_lr_schedule not in MIL_LR_SCHEDULES:
        problems.append(f"--mil-lr-schedule {config.mil_lr_schedule!r}: choose one of {', '.join(MIL_LR_SCHEDULES)}")
    return problems


@dataclass(frozen=True)
class DemoConfig:
    """The whole pipeline on a synthetic cohort painted from real Kather 2016 tiles."""

    out: Path = field(
        default=Path("demo_out"), metadata=flag_help("output folder (slides, features, QC, checkpoint, embeddings, evaluation)")
    )
    n_slides: int = field(default=40, metadata=flag_help("slides in the demo cohort (half with tumour texture)"))
    seed: int = field(default=0, metadata=flag_help("random seed of the cohort and of every stage"))
    device: str = field(default="auto", metadata=flag_help("auto, cpu, cuda or cuda:N"))
    sparse_backend: str = field(default="auto", metadata=flag_help(SPARSE_BACKEND_HELP))
    encoder: str = field(
        default="random",
        metadata=flag_help("tile encoder: a ResNet18 checkpoint (e.g. from `gigassl pretrain-tiles`) or 'random'"),
    )
    target_mpp: float = field(default=1.0, metadata=flag_help("extraction resolution in µm/px (the slides are at 0.495)"))
    tile_size_px: int = field(
        default=64,
        metadata=flag_help("tile side in pixels at --target-mpp (small, so the demo runs on a laptop CPU)"),
    )
    n_augmentations: int = field(default=8, metadata=flag_help("A: augmentations per slide in the bank"))
    n_tiles_per_augmentation: int = field(default=16, metadata=flag_help("K: tiles per augmentation in the bank"))
    epochs: int = field(default=50, metadata=flag_help("Giga-SSL training epochs"))
    batch_size: int = field(default=20, metadata=flag_help("slides per training step (two views each)"))
    n_views: int = field(default=50, metadata=flag_help("R: views averaged per slide embedding"))
    n_splits: int = field(default=5, metadata=flag_help("repeated stratified splits of the evaluation"))
    baselines: tuple[str, ...] = field(
        default=("average", "abmil"), metadata=flag_help("baselines compared with Giga-SSL, comma-separated: average,abmil")
    )
    num_workers: int = field(default=0, metadata=flag_help("DataLoader workers reading tiles during extraction"))
    overwrite: bool = field(default=False, metadata=flag_help("redraw the slides and re-extract features even when they exist"))

    def __post_init__(self) -> None:
        as_tuples(self, "demo")
        problems = too_small(self, 10, ("n_slides",)) + too_small(
            self, 1, ("tile_size_px", "n_augmentations", "n_tiles_per_augmentation", "epochs", "n_views")
        )
        unknown = sorted(set(self.baselines) - {"average", "abmil"})
        if unknown:
            problems.append(f"--baselines: unknown {unknown}; the demo compares with average,abmil")
        if not self.target_mpp > 0:
            problems.append(f"--target-mpp must be > 0 (got {self.target_mpp})")
        refuse("demo", problems + backend_problems(self.sparse_backend))
