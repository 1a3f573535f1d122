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
  ``abmil`` (gated attention-MIL), ``topk`` (top-k fine-tuning); see
  :mod:`gigassl.evaluation.classification` and :mod:`gigassl.evaluation.mil`.
  Logistic regression: C = 10, ``class_weight="balanced"``, lbfgs, ``max_iter=1000`` (the
  original's) or C by inner cross-validation (``--tune-c``).
- Metrics on the test part: ROC-AUC (binary; one-vs-rest macro over the classes for more) and
  balanced accuracy, reported as mean ± s.d. over the splits.

Outputs in ``out``: ``results.csv`` and ``results.json`` (summary, every split, settings),
``auc_vs_training_slides.png`` (one line per method, like the paper's Fig. 2). The table is
printed.

Speed: embeddings are unit-norm, so lbfgs on them is well conditioned; BLAS runs on one thread
(parallel BLAS on 700 × 512 only burns CPU time).

This module wires the pieces: the method × budget × split loop shared with ``--task survival``
and ``regression`` (:mod:`gigassl.evaluation.target_protocol`) is :mod:`gigassl.evaluation.loop`,
the outputs :mod:`gigassl.evaluation.report`. The baselines' inputs (feature files by slide id, bags, the checks that embeddings and features
belong together, top-k's slides and trunk) are read by :mod:`gigassl.evaluation.inputs`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from extract.settings import settings_dict
from gigassl.config import EVALUATE_BASELINES, EvaluateConfig
from gigassl.evaluation.classification import (
    METRICS,
    AttentionMethod,
    LinearMethod,
    TopKMethod,
    classification_task,
)
from gigassl.evaluation.inputs import (
    check_embeddings,
    check_feature_width,
    feature_paths,
    load_bags,
    load_bags_one_by_one,
    slide_tiles,
    trunk_factory,
)
from gigassl.evaluation.loop import Method, run_protocol, summarise
from gigassl.evaluation.mil import AttentionMIL, TopKFineTuner, mean_features
from gigassl.evaluation.paired import paired_differences
from gigassl.evaluation.protocol import (
    check_classes,
    keep_available,
    make_splits,
    n_folds_for,
    parse_budgets,
    read_labels,
)
from gigassl.evaluation.report import (
    RESULTS_CSV,
    RESULTS_JSON,
    EvaluationResult,
    fallbacks,
    method_seconds,
    results_payload,
    write_csv,
    write_json,
)
from gigassl.plots import plot_auc

logger = logging.getLogger(__name__)

BASELINES = EVALUATE_BASELINES  # defined with the settings, which check them
METHODS = ("gigassl", *BASELINES)
PLOT_PNG = "auc_vs_training_slides.png"


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
    rows = run_protocol(methods, classification_task(y, classes.tolist()), splits, budgets, config.seed).rows
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
    summary, paired = summarise(rows, METRICS), paired_differences(rows, config.reference)
    if not paired:
        logger.info("--reference %s was not run: no paired differences (methods: %s)", config.reference, ", ".join(method_names))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(summary, out / RESULTS_CSV)
    payload = results_payload(
        settings_dict(config),
        provenance,
        rows,
        classes=classes,
        n_slides=n_slides,
        missing=missing,
        summary=summary,
        paired=paired,
        fallbacks=fallbacks(rows),
    )
    json_path = write_json(payload, out / RESULTS_JSON)
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
