"""``gigassl fit --task survival``: the evaluation's ridge Cox model, fitted once on every slide and kept.

Methods ``gigassl`` (slide embeddings) and ``average`` (mean plain tile features), the penalty
chosen by inner cross-validation as in ``gigassl evaluate --task survival``
(:class:`gigassl.evaluation.cox.CoxRidge`). The model file is the classifier file of ``gigassl fit`` with
one output, ``risk``: the scaler in ``/linear/mean``, ``/linear/scale``, the Cox weights in
``/linear/coef`` (1, D), a zero intercept, and ``task: survival`` with the time and event columns
and the penalty in its provenance (covered by the content checksum). ``gigassl predict`` then
writes ``slide,risk`` (the linear predictor: higher is a higher hazard).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from extract.settings import settings_dict
from gigassl.classifier.config import FitConfig
from gigassl.classifier.fit_inputs import FitResult, read_embedding_vectors, read_slides
from gigassl.classifier.model_file import LinearClassifier, SlideClassifier, save_classifier
from gigassl.evaluation.targets import Targets, read_survival_targets

logger = logging.getLogger(__name__)
RISK_OUTPUT = "risk"


def _vectors(config: FitConfig, targets: Targets) -> tuple[np.ndarray, list[str], list[str], dict[str, Any]]:
    """Each kept slide's vector (embedding or mean tile feature), the kept ids, the missing ids, provenance."""
    if config.method == "average":
        inputs, labels, missing, provenance = read_slides(config, targets.as_labels())
        return np.stack(inputs), labels.slide_ids, missing, provenance
    vectors, labels, missing, provenance = read_embedding_vectors(config, targets.as_labels())
    return vectors, labels.slide_ids, missing, provenance


def run_survival_fit(config: FitConfig) -> FitResult:
    """Fit the ridge Cox model of ``config.method`` on every slide with a time and an event; write the model file."""
    from extract.errors import UserError
    from gigassl.evaluation.cox import CoxRidge

    targets = read_survival_targets(config.labels, config.slide_column, config.time_column, config.event_column, "\0")
    vectors, kept, missing, provenance = _vectors(config, targets)
    index = {s: i for i, s in enumerate(targets.slide_ids)}
    targets = targets.subset([index[s] for s in kept])
    assert targets.time is not None and targets.event is not None, "survival targets"
    if not targets.event.any():
        raise UserError(
            f"labels CSV {config.labels}: no event among the {len(kept)} slides with inputs; a Cox model needs events"
        )
    model = CoxRidge(seed=config.seed).fit(vectors, targets.time, targets.event)
    linear = LinearClassifier(model.mean_, model.scale_, model.coef_[None, :], np.zeros(1))
    provenance.update(
        task="survival",
        time_column=config.time_column,
        event_column=config.event_column,
        alpha_per_sample=model.alpha_per_sample_,
        n_events=int(targets.event.sum()),
        labels=str(config.labels),
        n_slides=len(kept),
    )
    classifier = SlideClassifier(config.method, [RISK_OUTPUT], linear, provenance=provenance)
    out = save_classifier(dataclasses.replace(classifier, settings=settings_dict(config)), config.out)
    logger.info("fitted a %s Cox model on %d slides (%d events) → %s", config.method, len(kept), targets.event.sum(), out)
    return FitResult(out, config.method, [RISK_OUTPUT], len(kept), missing)
