"""``gigassl evaluate``: few-label classification of slide embeddings against MIL baselines.

Protocol (the paper's, and the field's: TITAN, Patho-Bench, eva; labels, budgets and splits
are in :mod:`gigassl.evaluation.protocol`):

- ``n_splits`` seeded, stratified train/test splits (``test_fraction`` held out); when the
  labels CSV has a patient column, all slides of a patient fall on one side
  (``StratifiedGroupKFold``, one fold held out per repeat).
- In every split, each training budget takes a stratified subset of the training part:
  ``100%``/``25%`` (a share), ``50`` (a slide count) or ``4/class`` (K per class; ``--shots
  1,2,4,8,16`` is TITAN's few-shot protocol, with ``--n-splits 50``). The subset is drawn once
  per (split, budget) and shared by every method, so methods see the same slides.
- Methods that need an inner split fall back when the training part is too small for one (one
  slide per class): ``--tune-c`` keeps C fixed, attention-MIL's early stopping trains the fixed
  epochs. Said once per method and budget in the log and in ``results.json`` (``fallbacks``),
  beside the seconds each method took (``seconds_per_method``, ``cpu_seconds_per_method``).
- Methods: ``gigassl`` (logistic regression on the embeddings), ``average`` (AverageMIL),
  ``abmil`` (gated attention-MIL), ``topk`` (top-k fine-tuning); see :mod:`gigassl.evaluation.mil`.
  Logistic regression: C = 10, ``class_weight="balanced"``, lbfgs, ``max_iter=1000`` (the
  original's) or C by inner cross-validation (``--tune-c``).
- Metrics on the test part: ROC-AUC (binary; one-vs-rest macro over the classes for more) and
  balanced accuracy, reported as mean ± s.d. over the splits.

Outputs in ``out``: ``results.csv`` and ``results.json`` (summary, every split, settings),
``auc_vs_training_slides.png`` (one line per method, like the paper's Fig. 2). The table is
printed.

Speed: embeddings are unit-norm, so lbfgs on them is well conditioned; one estimator per
(method, budget) is refitted with a warm start across splits (same optimum, fewer
iterations), and BLAS runs on one thread (parallel BLAS on 700 × 512 only burns CPU time).

The baselines' inputs (feature files by slide id, bags, the checks that embeddings and features
belong together, top-k's slides and trunk) are read by :mod:`gigassl.evaluation.inputs`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np
from sklearn.base import clone
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from extract.settings import settings_dict
from gigassl.config import EVALUATE_BASELINES, EvaluateConfig
from gigassl.evaluation.inputs import (
    check_embeddings,
    check_feature_width,
    feature_paths,
    load_bags,
    load_bags_one_by_one,
    slide_tiles,
    trunk_factory,
)
from gigassl.evaluation.mil import (
    AttentionMIL,
    SlideTiles,
    TopKFineTuner,
    inner_folds,
    inner_validation_split,
    make_logistic_regression,
    mean_features,
)
from gigassl.evaluation.paired import paired_differences
from gigassl.evaluation.protocol import (
    Budget,
    budget_subset,
    check_classes,
    keep_available,
    make_splits,
    n_folds_for,
    parse_budgets,
    read_labels,
)
from gigassl.evaluation.report import fallbacks, format_costs, format_report, method_seconds, write_csv, write_json
from gigassl.plots import plot_auc

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

BASELINES = EVALUATE_BASELINES  # defined with the settings, which check them
METHODS = ("gigassl", *BASELINES)
RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
PLOT_PNG = "auc_vs_training_slides.png"


# ---------------------------------------------------------------------------------------------
# Methods


class Method(Protocol):
    name: str

    def fit_predict(self, train: np.ndarray, test: np.ndarray, y: np.ndarray, key: str, seed: int) -> np.ndarray:
        """Fit on rows ``train`` (labels ``y`` as integers), return (len(test), C) probabilities."""

    def fallback(self, y_train: np.ndarray, seed: int) -> str:
        """What the method does instead of its inner split on these training labels ("" when it needs none)."""


class LinearMethod:
    """Logistic regression on fixed per-slide vectors (embeddings, or mean features), a fresh
    estimator per fit — exactly what a plain scikit-learn loop over the splits computes."""

    def __init__(self, name: str, vectors: np.ndarray, c: float = 10.0, tune_c: bool = False, standardize: bool = False) -> None:
        self.name = name
        self.vectors = np.asarray(vectors, dtype=np.float64)
        self.c, self.tune_c, self.standardize = c, tune_c, standardize

    def fallback(self, y_train: np.ndarray, seed: int = 0) -> str:
        if self.tune_c and np.bincount(y_train)[np.unique(y_train)].min() < 2:
            return f"C fixed at {self.c:g}: choosing C by inner cross-validation (--tune-c) needs ≥ 2 training slides per class"
        return ""

    def fit_predict(self, train: np.ndarray, test: np.ndarray, y: np.ndarray, key: str = "", seed: int = 0) -> np.ndarray:
        tune_c = self.tune_c and not self.fallback(y[train])
        estimator = make_logistic_regression(
            self.c, standardize=self.standardize, tune_c=tune_c, seed=seed, n_inner_folds=inner_folds(y[train])
        )
        estimator.fit(self.vectors[train], y[train])
        return _full_proba(estimator.predict_proba(self.vectors[test]), estimator.classes_, int(y.max()) + 1)


def _full_proba(proba: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    full = np.zeros((len(proba), n_classes))
    full[:, np.asarray(classes, dtype=int)] = proba
    return full


class AttentionMethod:
    """Gated attention-MIL on the slides' plain tile features (``bags`` aligned with ``y``)."""

    name = "abmil"

    def __init__(self, bags: Sequence[np.ndarray], estimator: AttentionMIL, name: str = "abmil") -> None:
        self.bags, self.estimator, self.name = bags, estimator, name

    def fallback(self, y_train: np.ndarray, seed: int = 0) -> str:
        return attention_fallback(self.estimator, y_train, seed)

    def fit_predict(self, train, test, y, key="", seed=0):
        model = clone(self.estimator).set_params(seed=seed).fit([self.bags[i] for i in train], y[train])
        return _full_proba(model.predict_proba([self.bags[i] for i in test]), model.classes_, int(y.max()) + 1)


class TopKMethod:
    """Top-k fine-tuning; ``tiles`` says where each slide's tiles are re-read from."""

    name = "topk"

    def __init__(self, bags: Sequence[np.ndarray], tiles: Sequence[SlideTiles], estimator: TopKFineTuner) -> None:
        self.bags, self.tiles, self.estimator = bags, tiles, estimator

    def fallback(self, y_train: np.ndarray, seed: int = 0) -> str:
        return attention_fallback(self.estimator.mil or AttentionMIL(), y_train, seed)

    def fit_predict(self, train, test, y, key="", seed=0):
        model = clone(self.estimator).set_params(seed=seed)
        model.fit([self.bags[i] for i in train], y[train], [self.tiles[i] for i in train])
        proba = model.predict_proba([self.bags[i] for i in test], [self.tiles[i] for i in test])
        return _full_proba(proba, model.classes_, int(y.max()) + 1)


def attention_fallback(estimator: AttentionMIL, y_train: np.ndarray, seed: int) -> str:
    """attention-MIL's early stopping without an inner validation split: what it does instead."""
    if estimator.validation_fraction > 0 and len(inner_validation_split(y_train, estimator.validation_fraction, seed)[1]) == 0:
        return (
            f"no early stopping: a {estimator.validation_fraction:g} inner validation split needs ≥ 2 training slides "
            f"per class and one per class on each side; trained the fixed {estimator.max_epochs} epochs"
        )
    return ""


# ---------------------------------------------------------------------------------------------
# Metrics and the protocol


def roc_auc(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Binary ROC-AUC, or the macro mean of one-vs-rest AUCs over the classes present in ``y_true``."""
    n_classes = proba.shape[1]
    if n_classes == 2:
        return float(roc_auc_score(y_true, proba[:, 1]))
    aucs = [roc_auc_score(y_true == c, proba[:, c]) for c in range(n_classes) if 0 < (y_true == c).sum() < len(y_true)]
    return float(np.mean(aucs)) if aucs else float("nan")


def run_protocol(
    methods: Sequence[Method],
    y: np.ndarray,
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
    budgets: Sequence[Budget],
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Every method × budget × split: one row per fit with n_train, auc, balanced_accuracy."""
    from threadpoolctl import threadpool_limits

    rows = []
    subsets = {
        (s, b): budget_subset(train, y, budget, np.random.default_rng([seed, s, b]), s, class_names)
        for s, (train, _) in enumerate(splits)
        for b, budget in enumerate(budgets)
    }
    with threadpool_limits(1, user_api="blas"):
        for method in methods:
            for b, budget in enumerate(budgets):
                for s, (_, test) in enumerate(splits):
                    rows.append(_fit_one(method, subsets[(s, b)], test, y, budget.text, s, seed))
                done = [r for r in rows if r["method"] == method.name and r["budget"] == budget.text]
                fallback = next((r["fallback"] for r in done if r.get("fallback")), "")
                if fallback:  # once per method and budget
                    logger.info("%s @ %s: %s", method.name, budget.text, fallback)
                logger.info(
                    "%s @ %s: AUC %.3f (%.1f s for %d splits)",
                    method.name,
                    budget.text,
                    np.nanmean([r["auc"] for r in done]),
                    sum(r["seconds"] for r in done),
                    len(done),
                )
    return rows


def _fit_one(method: Method, train: np.ndarray, test: np.ndarray, y: np.ndarray, budget: str, split: int, seed: int) -> dict:
    """One fit: the split row (AUC, balanced accuracy, seconds, and the fallback when there was one)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    proba = method.fit_predict(train, test, y, budget, seed + split)
    row = dict(
        method=method.name,
        budget=budget,
        split=split,
        n_train=len(train),
        auc=roc_auc(y[test], proba),
        balanced_accuracy=float(balanced_accuracy_score(y[test], proba.argmax(1))),
        seconds=round(time.perf_counter() - started, 4),
        cpu_seconds=round(time.process_time() - cpu_started, 4),  # on a shared machine: what a quiet one would take
    )
    fallback = method.fallback(y[train], seed + split) if hasattr(method, "fallback") else ""
    if fallback:
        row["fallback"] = fallback
    return row


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± s.d. over splits per (method, budget), in first-seen order."""
    keys = list(dict.fromkeys((r["method"], r["budget"]) for r in rows))
    summary = []
    for method, budget in keys:
        group = [r for r in rows if r["method"] == method and r["budget"] == budget]
        auc = np.array([r["auc"] for r in group], dtype=float)
        bacc = np.array([r["balanced_accuracy"] for r in group], dtype=float)
        summary.append(
            dict(
                method=method,
                budget=budget,
                n_train=float(np.mean([r["n_train"] for r in group])),
                n_splits=len(group),
                auc_mean=float(np.nanmean(auc)),
                auc_std=float(np.nanstd(auc)),
                balanced_accuracy_mean=float(bacc.mean()),
                balanced_accuracy_std=float(bacc.std()),
            )
        )
    return summary


@dataclass(frozen=True)
class EvaluationResult:
    summary: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    classes: list[str]
    missing: list[str]
    csv_path: Path
    json_path: Path
    plot_path: Path
    exit_code: int = 0
    paired: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    fallbacks: list[dict[str, str]] = field(default_factory=list)

    def format(self) -> str:
        """The AUC / balanced-accuracy table, the paired differences, the seconds per method,
        what methods did without an inner split, and the files written."""
        return "\n".join(
            [
                format_report(self.summary, self.paired),
                *format_costs(self.rows),
                f"written: {self.csv_path}, {self.json_path}, {self.plot_path}",
            ]
        )


def run_evaluation(config: EvaluateConfig) -> EvaluationResult:
    """``gigassl evaluate``: the protocol on the embeddings (and baselines), tables and plot;
    ``--task survival`` and ``regression`` run :func:`gigassl.evaluation.target_protocol.run_target_evaluation`."""
    from gigassl.embed import read_embeddings

    if config.task != "classification":
        from gigassl.evaluation.target_protocol import run_target_evaluation

        return run_target_evaluation(config)

    budgets = parse_budgets(config.budget_texts)
    baselines = list(config.baselines)
    if baselines and config.features is None:
        logger.info("no --features given: baselines %s skipped (they need the tile features)", baselines)
        baselines = []
    embeddings = read_embeddings(config.embeddings)
    labels = read_labels(config.labels, config.slide_column, config.label_column, config.patient_column)
    check_embeddings(embeddings, config.embeddings, labels.slide_ids)
    labels, missing = keep_available(labels, set(embeddings.slide_ids), f"the embeddings {config.embeddings}", config.strict)
    files: dict[str, Path] = {}
    if baselines:
        assert config.features is not None, "baselines were dropped above when --features is missing"
        files = feature_paths(config.features)
        labels, missing_features = keep_available(labels, set(files), f"the features folder {config.features}", config.strict)
        missing += missing_features
    n_folds = 2 if labels.patients is None else n_folds_for(config.test_fraction)
    classes = check_classes(labels, n_folds, str(config.labels))
    y = np.searchsorted(classes, labels.labels)
    splits = make_splits(y, labels.patients, config.n_splits, config.test_fraction, config.seed)
    rows_of = embeddings.index()
    # Both linear methods are standard-scaled before the same regression: L2-normalised slide
    # vectors have a small spread, so unscaled they would meet C = 10 as a much stronger penalty
    # than AverageMIL's scaled features (on the demo: 0.90 unscaled vs 0.98 scaled AUC).
    vectors = embeddings.embeddings[[rows_of[s] for s in labels.slide_ids]]
    methods: list[Method] = [LinearMethod("gigassl", vectors, config.logistic_c, config.tune_c, standardize=True)]
    if baselines:
        paths = [files[s] for s in labels.slide_ids]
        check_feature_width(paths[0], embeddings, config.embeddings)
        methods += baseline_methods(config, baselines, paths)
    logger.info(
        "%d slides, classes %s, %d splits, budgets %s, methods %s",
        len(y),
        classes.tolist(),
        len(splits),
        [b.text for b in budgets],
        [m.name for m in methods],
    )
    rows = run_protocol(methods, y, splits, budgets, config.seed, classes.tolist())
    return _write_results(config, rows, embeddings.provenance, classes.tolist(), len(y), missing, [m.name for m in methods])


def baseline_methods(config: EvaluateConfig, baselines: Sequence[str], paths: Sequence[Path]) -> list[Method]:
    """The MIL baselines of ``baselines`` on the plain tile features of ``paths`` (one file per slide, in label order)."""
    from extract.device import resolve_device

    device = str(resolve_device(config.device))
    bags = load_bags(paths) if {"abmil", "topk"} & set(baselines) else None
    mil = attention_mil(config, device)
    methods: list[Method] = []
    if "average" in baselines:
        means = mean_features(bags) if bags is not None else mean_features(load_bags_one_by_one(paths))
        methods.append(LinearMethod("average", means, config.logistic_c, config.tune_c, standardize=True))
    if "abmil" in baselines:
        assert bags is not None, "loaded above for abmil and topk"
        methods.append(AttentionMethod(bags, mil))
    if "topk" in baselines:
        tuner = TopKFineTuner(
            trunk_factory(config.encoder, paths[0]), k=config.topk, epochs=config.topk_epochs, mil=mil, device=device
        )
        assert bags is not None, "loaded above for abmil and topk"
        methods.append(TopKMethod(bags, slide_tiles(paths, config.slides), tuner))
    return methods


def attention_mil(config: EvaluateConfig, device: str = "cpu") -> AttentionMIL:
    """The attention-MIL estimator of the ``--mil-*`` settings (early stopping: a 20 % inner split, or none)."""
    return AttentionMIL(
        dropout=config.mil_dropout,
        lr=config.mil_lr,
        weight_decay=config.mil_weight_decay,
        max_epochs=config.mil_epochs,
        patience=config.mil_patience,
        batch_size=config.mil_batch_size,
        max_tiles=config.mil_max_tiles,
        validation_fraction=0.2 if config.mil_early_stopping else 0.0,
        device=device,
        standardize=config.mil_standardize,
        lr_schedule=config.mil_lr_schedule,
    )


def _write_results(
    config: EvaluateConfig,
    rows: list[dict[str, Any]],
    provenance: dict[str, Any],
    classes: list[Any],
    n_slides: int,
    missing: list[str],
    method_names: list[str],
) -> EvaluationResult:
    """Summary and paired differences to ``--reference``, written as CSV, JSON and the plot."""
    summary, paired = summarise(rows), paired_differences(rows, config.reference)
    if not paired:
        logger.info("--reference %s was not run: no paired differences (methods: %s)", config.reference, ", ".join(method_names))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(summary, out / RESULTS_CSV)
    json_path = write_json(
        dict(
            settings=settings_dict(config),
            embeddings_provenance={k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in provenance.items()},
            classes=classes,
            n_slides=n_slides,
            missing=missing,
            summary=summary,
            paired=paired,
            seconds_per_method=method_seconds(rows),
            cpu_seconds_per_method=method_seconds(rows, "cpu_seconds"),
            fallbacks=fallbacks(rows),
            splits=rows,
        ),
        out / RESULTS_JSON,
    )
    plot_path = plot_auc(summary, out / PLOT_PNG, f"{Path(config.labels).stem}: AUC vs training slides", paired)
    return EvaluationResult(
        summary,
        rows,
        classes,
        missing,
        csv_path,
        json_path,
        plot_path,
        paired=paired,
        seconds=method_seconds(rows),
        fallbacks=fallbacks(rows),
    )
