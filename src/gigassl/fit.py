"""``gigassl fit``: the evaluation protocol's classifier, fitted once on every labelled slide and kept.

Methods (the same estimators ``gigassl evaluate`` compares, with the same settings):

- ``gigassl``: StandardScaler + logistic regression (C, ``class_weight="balanced"``) on the
  slide embeddings of an embeddings file;
- ``average``: the same on each slide's mean plain tile feature (AverageMIL);
- ``abmil``: gated attention-MIL on the plain tile features.

The model file (:mod:`gigassl.classifier.model_file`) records what the model was fitted on — the
Giga-SSL checkpoint and tile encoder hashes, the embedding settings (R, T, seed), the classes —
so that ``predict`` and ``explain`` refuse inputs of another checkpoint or encoder. The inputs are
read by :mod:`gigassl.classifier.fit_inputs`; ``--task survival`` is :mod:`gigassl.classifier.survival_fit`.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from extract.settings import settings_dict
from gigassl.classifier.config import FitConfig
from gigassl.classifier.fit_inputs import FitResult, read_embedding_vectors, read_slides
from gigassl.classifier.model_file import LinearClassifier, SlideClassifier, save_classifier
from gigassl.evaluation.protocol import Labels, check_classes, read_labels

logger = logging.getLogger(__name__)


def _linear(vectors: np.ndarray, y: np.ndarray, config: FitConfig) -> LinearClassifier:
    from gigassl.evaluation.mil import inner_folds, make_logistic_regression

    pipeline = make_logistic_regression(
        config.logistic_c, standardize=True, tune_c=config.tune_c, seed=config.seed, n_inner_folds=inner_folds(y)
    )
    pipeline.fit(np.asarray(vectors, np.float64), y)
    return LinearClassifier.from_pipeline(pipeline)


def _encoded(labels: Labels, source: str) -> tuple[list[str], np.ndarray]:
    classes = check_classes(labels, 1, source)
    return [str(c) for c in classes], np.searchsorted(classes, labels.labels)


def _fit_gigassl(config: FitConfig, labels: Labels) -> tuple[SlideClassifier, Labels, list[str]]:
    vectors, labels, missing, provenance = read_embedding_vectors(config, labels)
    classes, y = _encoded(labels, str(config.labels))
    return SlideClassifier("gigassl", classes, _linear(vectors, y, config), provenance=provenance), labels, missing


def _fit_mil(config: FitConfig, labels: Labels) -> tuple[SlideClassifier, Labels, list[str]]:
    from extract.device import resolve_device
    from gigassl.evaluation.mil import AttentionMIL

    inputs, labels, missing, provenance = read_slides(config, labels)
    classes, y = _encoded(labels, str(config.labels))
    if config.method == "average":
        return SlideClassifier("average", classes, _linear(np.stack(inputs), y, config), provenance=provenance), labels, missing
    estimator = AttentionMIL(max_epochs=config.mil_epochs, seed=config.seed, device=str(resolve_device(config.device)))
    network = estimator.fit(inputs, y).model_.cpu()
    state = {k: v.detach().numpy().copy() for k, v in network.state_dict().items()}
    dims = dict(
        n_classes=int(y.max()) + 1,
        in_dim=int(inputs[0].shape[1]),
        hidden_dim=estimator.hidden_dim,
        attention_dim=estimator.attention_dim,
    )
    return SlideClassifier("abmil", classes, abmil_state=state, abmil_dims=dims, provenance=provenance), labels, missing


def run_fit(config: FitConfig) -> FitResult:
    """``gigassl fit``: fit ``config.method`` on every labelled slide and write the model file."""
    if config.task == "survival":
        from gigassl.classifier.survival_fit import run_survival_fit

        return run_survival_fit(config)
    labels = read_labels(config.labels, config.slide_column, config.label_column, patient_column="\0")
    fit = _fit_gigassl if config.method == "gigassl" else _fit_mil
    classifier, labels, missing = fit(config, labels)
    provenance = {**classifier.provenance, "labels": str(config.labels), "n_slides": len(labels.slide_ids)}
    classifier = dataclasses.replace(classifier, provenance=provenance, settings=settings_dict(config))
    out = save_classifier(classifier, config.out)
    logger.info("fitted %s on %d slides (classes %s) → %s", config.method, len(labels.slide_ids), classifier.classes, out)
    return FitResult(out, config.method, classifier.classes, len(labels.slide_ids), missing)
