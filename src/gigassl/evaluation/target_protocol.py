"""``gigassl evaluate --task survival`` and ``--task regression``: the classification protocol's
splits, budgets and paired differences, with other models and metrics.

- Splits: ``n_splits`` seeded splits stratified on the event (survival) or on the target's
  terciles (regression), grouped by patient when the labels CSV has a patient column
  (:func:`gigassl.evaluation.protocol.make_splits`); budgets are shares or slide counts (no ``K/class``),
  drawn once per (split, budget), stratified the same way, shared by every method; the loop over
  methods × budgets × splits is classification's (:mod:`gigassl.evaluation.loop`, :func:`target_task`).
- Survival methods: ``gigassl`` (ridge Cox on the embeddings, :class:`gigassl.evaluation.cox.CoxRidge`, the
  penalty by inner cross-validation on the training slides), ``average`` (the same on the mean
  tile features) and ``abmil`` (attention-MIL with a Cox loss, :mod:`gigassl.evaluation.attention_targets`).
  Metrics on the test part: Harrell's C, Uno's C truncated at the 80th percentile of the split's
  training times (censoring weights from the split's training part), and the log-rank p of the
  test part's median risk split (:mod:`gigassl.evaluation.survival_metrics`).
- Regression methods: standard scaling + ridge (α by efficient leave-one-out CV over
  :data:`RIDGE_ALPHAS` on the training slides) on the embeddings or mean tile features, and
  attention-MIL with a squared-error loss. Metrics: Pearson r and R² on the test part.

Outputs as for classification (``results.csv``, ``results.json`` with the seconds per method and
per split, the printed table with paired differences), and ``kaplan_meier.png`` (survival) or ``predicted_vs_observed.png`` (regression).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from extract.errors import UserError
from extract.settings import settings_dict
from gigassl.config import EvaluateConfig
from gigassl.evaluation.loop import Method, Task, run_protocol, summarise
from gigassl.evaluation.paired import paired_differences
from gigassl.evaluation.protocol import keep_available, make_splits, parse_budgets
from gigassl.evaluation.report import (
    RESULTS_CSV,
    RESULTS_JSON,
    EvaluationResult,
    format_costs,
    method_seconds,
    results_payload,
    write_csv,
    write_json,
)
from gigassl.evaluation.survival_metrics import UNO_TAU_QUANTILE, harrell_c, median_split_logrank, uno_c, uno_tau
from gigassl.evaluation.survival_report import plot_target_figure
from gigassl.evaluation.targets import Targets, read_regression_targets, read_survival_targets

logger = logging.getLogger(__name__)

RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-2, 5, 8))
TASK_METRICS = {"survival": ("harrell_c", "uno_c"), "regression": ("pearson_r", "r2")}


class VectorMethod:
    """Ridge Cox (survival) or ridge regression on fixed per-slide vectors (embeddings or mean features)."""

    def __init__(self, name: str, vectors: np.ndarray, task: str) -> None:
        self.name, self.vectors, self.task = name, np.asarray(vectors, np.float64), task

    def fit_predict(self, train: np.ndarray, test: np.ndarray, targets: Targets, seed: int = 0) -> np.ndarray:
        if self.task == "survival":
            from gigassl.evaluation.cox import CoxRidge

            assert targets.time is not None and targets.event is not None, "survival targets"
            groups = None if targets.patients is None else targets.patients[train]
            model = CoxRidge(seed=seed).fit(self.vectors[train], targets.time[train], targets.event[train], groups)
            return model.predict(self.vectors[test])
        from sklearn.linear_model import RidgeCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        assert targets.value is not None, "a regression target"
        pipeline = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS)).fit(self.vectors[train], targets.value[train])
        return pipeline.predict(self.vectors[test])


class BagMethod:
    """Attention-MIL with a Cox or squared-error loss on the slides' plain tile features."""

    name = "abmil"

    def __init__(self, bags: Sequence[np.ndarray], estimator: Any) -> None:
        self.bags, self.estimator = bags, estimator

    def fit_predict(self, train: np.ndarray, test: np.ndarray, targets: Targets, seed: int = 0) -> np.ndarray:
        model = copy.copy(self.estimator)
        model.seed = seed
        if targets.time is not None:
            model.fit([self.bags[i] for i in train], targets.time[train], targets.event[train])  # type: ignore[index]
        else:
            model.fit([self.bags[i] for i in train], targets.value[train])  # type: ignore[index]
        return model.predict([self.bags[i] for i in test])


def split_metrics(targets: Targets, train: np.ndarray, test: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """The test part's metrics; ``train`` is the split's whole training part (Uno's censoring weights and tau)."""
    if targets.time is not None and targets.event is not None:
        time, event = targets.time, targets.event
        tau = uno_tau(time[train])
        return dict(
            harrell_c=harrell_c(time[test], event[test], scores),
            uno_c=uno_c(time[train], event[train], time[test], event[test], scores, tau),
            uno_tau=tau,
            logrank_p=median_split_logrank(time[test], event[test], scores),
        )
    from scipy.stats import pearsonr
    from sklearn.metrics import r2_score

    assert targets.value is not None, "a regression target"
    observed = targets.value[test]
    constant = np.ptp(scores) == 0 or np.ptp(observed) == 0
    return dict(
        pearson_r=float("nan") if constant else float(pearsonr(observed, scores)[0]), r2=float(r2_score(observed, scores))
    )


def _survival_summary(group: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The median log-rank p of the test parts' median risk splits, and the mean Uno tau."""
    return dict(
        logrank_p_median=float(np.nanmedian([r["logrank_p"] for r in group])),
        uno_tau_mean=float(np.mean([r["uno_tau"] for r in group])),
    )


def target_task(targets: Targets) -> Task:
    """The loop's task for survival (subsets stratified on the event) or regression (on the
    target's terciles): :func:`split_metrics` of the (len(test),) risks or predicted values."""
    metrics = TASK_METRICS["survival" if targets.event is not None else "regression"]
    task = Task(
        target=targets,
        strata=targets.strata(),
        strata_names=["lower third", "middle third", "upper third"],
        score=lambda train, test, scores: split_metrics(targets, train, test, scores),
        metrics=metrics,
        headline=metrics[0],
    )
    if targets.event is None:
        return task
    event = targets.event
    return dataclasses.replace(
        task,
        strata_names=["censored", "event"],
        describe_subset=lambda subset: dict(n_train_events=int(event[subset].sum())),
        summary_extra=_survival_summary,
    )


def target_splits(targets: Targets, config: EvaluateConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """The protocol's splits on the targets' strata; one-line errors when a split lacks events."""
    strata, source = targets.strata(), f"labels CSV {config.labels}"
    n_events = int(strata.sum()) if targets.event is not None else 0
    advice = (
        f"{n_events} events among {len(strata)} slides: each split needs events in its training and its test part; "
        "add patients with events, or change --test-fraction (0.3–0.5)"
    )
    try:
        splits = make_splits(strata, targets.patients, config.n_splits, config.test_fraction, config.seed)
    except ValueError as error:
        raise UserError(f"{source}: {advice if targets.event is not None else error}") from error
    if targets.event is not None:
        for index, (train, test) in enumerate(splits):
            if not targets.event[train].any() or not targets.event[test].any():
                raise UserError(
                    f"{source}: split {index} has no event in its {'training' if not targets.event[train].any() else 'test'} part; {advice}"
                )
    return splits


@dataclass(frozen=True)
class TargetEvaluationResult(EvaluationResult):
    """What a survival or regression evaluation wrote (``classes`` is empty)."""

    task: str = "survival"

    def format(self) -> str:
        """The metric table, the paired differences, the seconds per method and the files written."""
        from gigassl.evaluation.survival_report import format_target_report

        return "\n".join(
            [
                format_target_report(self.summary, self.paired, self.task),
                *format_costs(self.rows),
                f"written: {self.csv_path}, {self.json_path}, {self.plot_path}",
            ]
        )


def _read_targets(config: EvaluateConfig) -> Targets:
    if config.task == "survival":
        return read_survival_targets(
            config.labels, config.slide_column, config.time_column, config.event_column, config.patient_column
        )
    return read_regression_targets(config.labels, config.slide_column, config.label_column, config.patient_column)


def _methods(config: EvaluateConfig, vectors: np.ndarray, baselines: Sequence[str], paths: Sequence[Any]) -> list[Method]:
    from extract.device import resolve_device
    from gigassl.evaluation.attention_targets import AttentionTargetMIL
    from gigassl.evaluation.inputs import load_bags, load_bags_one_by_one
    from gigassl.evaluation.mil import mean_features

    methods: list[Method] = [VectorMethod("gigassl", vectors, config.task)]
    bags = load_bags(paths) if "abmil" in baselines else None
    if "average" in baselines:
        means = mean_features(bags) if bags is not None else mean_features(load_bags_one_by_one(paths))
        methods.append(VectorMethod("average", means, config.task))
    if bags is not None:
        loss = "cox" if config.task == "survival" else "mse"
        methods.append(BagMethod(bags, AttentionTargetMIL(loss, config.mil_epochs, device=str(resolve_device(config.device)))))
    return methods


def run_target_evaluation(config: EvaluateConfig) -> TargetEvaluationResult:
    """``gigassl evaluate --task survival|regression``: the protocol, the tables and the figure."""
    from gigassl.embed import read_embeddings
    from gigassl.evaluation.inputs import check_embeddings, check_feature_width, feature_paths

    budgets = parse_budgets(config.budget_texts)
    for budget in budgets:
        if budget.kind == "per_class":
            raise UserError(f"--budgets {budget.text}: K per class is for classification; give shares (25%) or slide counts (50)")
    baselines = list(config.baselines) if config.features is not None else []
    if config.baselines and config.features is None:
        logger.info("no --features given: baselines %s skipped (they need the tile features)", list(config.baselines))
    targets = _read_targets(config)
    embeddings = read_embeddings(config.embeddings)
    check_embeddings(embeddings, config.embeddings, targets.slide_ids)
    labels, missing = keep_available(
        targets.as_labels(), set(embeddings.slide_ids), f"the embeddings {config.embeddings}", config.strict
    )
    files = feature_paths(config.features) if baselines and config.features is not None else {}
    if baselines:
        labels, missing_features = keep_available(labels, set(files), f"the features folder {config.features}", config.strict)
        missing += missing_features
    kept = set(labels.slide_ids)
    targets = targets.subset([i for i, s in enumerate(targets.slide_ids) if s in kept])
    if config.task == "survival" and not targets.event.any():  # type: ignore[union-attr]
        raise UserError(
            f"labels CSV {config.labels}: no event among the {len(kept)} slides that have embeddings; add slides with events"
        )
    splits = target_splits(targets, config)
    rows_of = embeddings.index()
    vectors = embeddings.embeddings[[rows_of[s] for s in targets.slide_ids]]
    paths = [files[s] for s in targets.slide_ids] if baselines else []
    if paths:
        check_feature_width(paths[0], embeddings, config.embeddings)
    methods = _methods(config, vectors, baselines, paths)
    logger.info(
        "%s: %d slides, %d splits, budgets %s, methods %s",
        config.task,
        len(targets.slide_ids),
        len(splits),
        [b.text for b in budgets],
        [m.name for m in methods],
    )
    task = target_task(targets)
    run = run_protocol(methods, task, splits, budgets, config.seed)
    return _write_target_results(config, targets, task, run.rows, run.predictions, embeddings.provenance, missing)


def _write_target_results(
    config: EvaluateConfig,
    targets: Targets,
    task: Task,
    rows: list[dict[str, Any]],
    scores: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]],
    provenance: dict[str, Any],
    missing: list[str],
) -> TargetEvaluationResult:
    summary = summarise(rows, task.metrics, task.summary_extra)
    paired = paired_differences(rows, config.reference, task.metrics)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_path, groups = plot_target_figure(targets, scores, out, f"{Path(config.labels).stem}")
    payload = results_payload(
        settings_dict(config),
        provenance,
        rows,
        task=config.task,
        n_slides=len(targets.slide_ids),
        missing=missing,
        summary=summary,
        paired=paired,
        risk_groups=groups,
    )
    if targets.event is not None:
        payload.update(n_events=int(targets.event.sum()), uno_tau=f"quantile {UNO_TAU_QUANTILE} of each split's training times")
    csv_path, json_path = write_csv(summary, out / RESULTS_CSV), write_json(payload, out / RESULTS_JSON)
    return TargetEvaluationResult(
        summary, rows, [], missing, csv_path, json_path, plot_path, paired=paired, seconds=method_seconds(rows), task=config.task
    )
