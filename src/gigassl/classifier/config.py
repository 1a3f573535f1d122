"""Settings of the jobs that keep a classifier and use it: ``gigassl fit``, ``predict`` and ``explain``.

One frozen dataclass per job, shared by the CLI and the Python API, checked when made (every
problem in one message, :mod:`extract.settings`), like :mod:`gigassl.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from extract.settings import as_tuples, flag_help, refuse, too_small
from gigassl.config import MIXED_PRECISION_HELP, SPARSE_BACKEND_HELP, backend_problems

# gigassl: LR on slide embeddings; average: AverageMIL + LR; abmil: gated attention-MIL
CLASSIFIER_METHODS = ("gigassl", "average", "abmil")
FIT_TASKS = ("classification", "survival")


def _method_problems(method: str, features: Optional[Path], command: str) -> list[str]:
    if method not in CLASSIFIER_METHODS:
        return [f"--method {method!r}: choose one of {', '.join(CLASSIFIER_METHODS)}"]
    if method != "gigassl" and features is None:
        return [f"{command} --method {method} needs --features (the folder of per-slide tile features)"]
    return []


@dataclass(frozen=True)
class FitConfig:
    """Fit the evaluation protocol's classifier on every labelled slide and save it as a model file."""

    labels: Path = field(metadata=flag_help("CSV with a slide id column and a label column", required=True))
    out: Path = field(metadata=flag_help("model file to write (HDF5, no pickle), e.g. model.h5", required=True))
    method: str = field(
        default="gigassl",
        metadata=flag_help("gigassl (LR on --embeddings), average (AverageMIL + LR on --features) or abmil (attention-MIL)"),
    )
    embeddings: Optional[Path] = field(default=None, metadata=flag_help("HDF5 file written by `gigassl embed` (method gigassl)"))
    features: Optional[Path] = field(default=None, metadata=flag_help("folder of per-slide HDF5 files (methods average, abmil)"))
    slide_column: str = field(default="slide", metadata=flag_help("name of the slide id column"))
    label_column: str = field(default="label", metadata=flag_help("name of the label column"))
    logistic_c: float = field(default=10.0, metadata=flag_help("C of the logistic regression (the evaluation's 10)"))
    tune_c: bool = field(default=False, metadata=flag_help("choose C by inner cross-validation instead"))
    mil_epochs: int = field(default=50, metadata=flag_help("most epochs of attention-MIL training (method abmil)"))
    seed: int = field(default=0, metadata=flag_help("random seed (attention-MIL initialisation, inner splits)"))
    device: str = field(default="auto", metadata=flag_help("device of attention-MIL"))
    strict: bool = field(default=False, metadata=flag_help("error when labelled slides are missing from the inputs"))
    task: str = field(
        default="classification",
        metadata=flag_help(
            "classification (--label-column) or survival (a ridge Cox model on --time-column and --event-column; methods gigassl, average); see docs/survival.md"
        ),
    )
    time_column: str = field(default="time", metadata=flag_help("survival: the follow-up time column (a duration ≥ 0)"))
    event_column: str = field(
        default="event", metadata=flag_help("survival: the event column, 1/true = observed, 0/false = censored")
    )

    def __post_init__(self) -> None:
        problems = _method_problems(self.method, self.features, "fit")
        if self.task not in FIT_TASKS:
            problems.append(f"--task {self.task!r}: choose one of {', '.join(FIT_TASKS)}")
        elif self.task == "survival" and self.method == "abmil":
            problems.append("fit --task survival fits a Cox model on slide vectors: --method gigassl or average")
        if self.method == "gigassl" and self.embeddings is None:
            problems.append("fit --method gigassl needs --embeddings (the file written by `gigassl embed`)")
        if not self.logistic_c > 0:
            problems.append(f"--logistic-c must be > 0 (got {self.logistic_c})")
        refuse("fit", problems + too_small(self, 1, ("mil_epochs",)))


@dataclass(frozen=True)
class PredictConfig:
    """Score slides with a model file: from an embeddings file, or from tile features (embedded on the fly)."""

    model: Path = field(metadata=flag_help("model file written by `gigassl fit`", required=True))
    out: Path = field(default=Path("predictions.csv"), metadata=flag_help("predictions CSV (slide, predicted, p_<class> …)"))
    embeddings: Optional[Path] = field(default=None, metadata=flag_help("HDF5 file written by `gigassl embed`"))
    features: Optional[Path] = field(
        default=None, metadata=flag_help("folder of per-slide HDF5 files (with --checkpoint for a gigassl model)")
    )
    checkpoint: Optional[Path] = field(
        default=None, metadata=flag_help("Giga-SSL checkpoint to embed --features with (the one the model was fitted on)")
    )
    batch_size: int = field(default=64, metadata=flag_help("slides per forward batch when embedding"))
    device: str = field(default="auto", metadata=flag_help("auto, cpu, cuda or cuda:N"))
    sparse_backend: str = field(default="auto", metadata=flag_help(SPARSE_BACKEND_HELP))
    mixed_precision: bool = field(default=True, metadata=flag_help(MIXED_PRECISION_HELP))
    strict: bool = field(
        default=False, metadata=flag_help("exit non-zero when any slide failed (failed slides are always listed)")
    )

    def __post_init__(self) -> None:
        problems = too_small(self, 1, ("batch_size",))
        if (self.embeddings is None) == (self.features is None):
            problems.append("give either --embeddings or --features (with --checkpoint for a gigassl model)")
        refuse("predict", problems + backend_problems(self.sparse_backend))


@dataclass(frozen=True)
class ExplainConfig:
    """Per-tile contributions to a slide's call: HDF5, heatmap PNG, QuPath GeoJSON and top/bottom tiles."""

    model: Path = field(metadata=flag_help("model file written by `gigassl fit`", required=True))
    features: Path = field(metadata=flag_help("folder of per-slide HDF5 files with plain features", required=True))
    out: Path = field(default=Path("explain"), metadata=flag_help("output folder (one set of files per slide)"))
    checkpoint: Optional[Path] = field(default=None, metadata=flag_help("Giga-SSL checkpoint (needed for a gigassl model)"))
    slides: Optional[Path] = field(
        default=None, metadata=flag_help("folder of the slide files, for the heatmap's thumbnail and the tile grid")
    )
    slide_ids: tuple[str, ...] = field(default=(), metadata=flag_help("slides to explain, comma-separated (default: all)"))
    class_name: str = field(
        default="", metadata=flag_help("class whose score is explained (default: each slide's predicted class)")
    )
    views_per_tile: int = field(
        default=8, metadata=flag_help("gigassl: every tile appears in at least this many views (R = this × ⌈N / T⌉)")
    )
    top_k: int = field(default=16, metadata=flag_help("tiles shown in the top and in the bottom row of the tile grid PNG"))
    seed: int = field(default=0, metadata=flag_help("random seed of the covering views"))
    batch_views: int = field(default=4096, metadata=flag_help("views per forward pass (memory ∝ this)"))
    device: str = field(default="auto", metadata=flag_help("auto, cpu, cuda or cuda:N"))
    sparse_backend: str = field(default="auto", metadata=flag_help(SPARSE_BACKEND_HELP))
    mixed_precision: bool = field(default=True, metadata=flag_help(MIXED_PRECISION_HELP))
    images: bool = field(default=True, metadata=flag_help("write the heatmap and tile-grid PNGs"))
    strict: bool = field(
        default=False, metadata=flag_help("exit non-zero when any slide failed (failed slides are always listed)")
    )

    def __post_init__(self) -> None:
        as_tuples(self, "explain")
        problems = too_small(self, 1, ("views_per_tile", "top_k", "batch_views"))
        refuse("explain", problems + backend_problems(self.sparse_backend))
