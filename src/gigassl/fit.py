"""``gigassl fit``: the evaluation protocol's classifier, fitted once on every labelled slide and kept.

Methods (the same estimators ``gigassl evaluate`` compares, with the same settings):

- ``gigassl``: StandardScaler + logistic regression (C, ``class_weight="balanced"``) on the
  slide embeddings of an embeddings file;
- ``average``: the same on each slide's mean plain tile feature (AverageMIL);
- ``abmil``: gated attention-MIL on the plain tile features.

The model file (:mod:`gigassl.classifier.model_file`) records what the model was fitted on — the
Giga-SSL checkpoint and tile encoder hashes, the embedding settings (R, T, seed), the classes —
so that ``predict`` and ``explain`` refuse inputs of another checkpoint or encoder.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from extract.encoders.tile_encoder import file_sha256
from extract.errors import UserError
from extract.settings import settings_dict
from gigassl.classifier.config import FitConfig
from gigassl.classifier.model_file import LinearClassifier, SlideClassifier, save_classifier
from gigassl.evaluation.protocol import Labels, check_classes, keep_available, read_labels

logger = logging.getLogger(__name__)

# the embedding settings and hashes a gigassl model keeps from its embeddings file
EMBEDDING_PROVENANCE = (
    "checkpoint",
    "checkpoint_sha256",
    "checkpoint_epoch",
    "n_views",
    "n_tiles_per_view",
    "seed",
    "encoder_sha256",
    "checkpoint_encoder_sha256",
    "feature_dim",
    "architecture",
    "sparse_backend",
)


@dataclass(frozen=True)
class FitResult:
    """What ``gigassl fit`` wrote."""

    out: Path
    method: str
    classes: list[str]
    n_slides: int
    missing: list[str]
    exit_code: int = 0

    def format(self) -> str:
        """One line per fact: the model file, its method, classes and training slides."""
        lines = [f"fitted {self.method} on {self.n_slides} slides, classes {self.classes} → {self.out}"]
        if self.missing:
            lines.append(f"{len(self.missing)} labelled slide(s) had no input and were left out: {', '.join(self.missing[:10])}")
        return "\n".join(lines)


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
    from gigassl.embeddings_file import read_embeddings

    assert config.embeddings is not None, "FitConfig requires --embeddings for method gigassl"
    embeddings = read_embeddings(config.embeddings)
    labels, missing = keep_available(labels, set(embeddings.slide_ids), f"the embeddings {config.embeddings}", config.strict)
    classes, y = _encoded(labels, str(config.labels))
    rows = embeddings.index()
    linear = _linear(embeddings.embeddings[[rows[s] for s in labels.slide_ids]], y, config)
    provenance = {k: embeddings.provenance[k] for k in EMBEDDING_PROVENANCE if k in embeddings.provenance}
    provenance.update(embeddings=str(config.embeddings), embeddings_sha256=file_sha256(config.embeddings))
    return SlideClassifier("gigassl", classes, linear, provenance=provenance), labels, missing


def _read_slides(config: FitConfig, labels: Labels) -> tuple[list[np.ndarray], Labels, list[str], dict[str, Any]]:
    """Each labelled slide's bag (abmil) or mean tile feature (average), read one file at a time
    (an AverageMIL fit never holds more than one slide's tiles), and the features' provenance."""
    from extract.features.plain import read_plain_features
    from gigassl.evaluation.inputs import feature_paths

    assert config.features is not None, "FitConfig requires --features for the MIL methods"
    files = feature_paths(config.features)
    labels, missing = keep_available(labels, set(files), f"the features folder {config.features}", config.strict)
    inputs, encoders, names, widths = [], set(), set(), set()
    for slide_id in labels.slide_ids:
        slide = read_plain_features(files[slide_id])
        inputs.append(slide.features if config.method == "abmil" else slide.features.mean(axis=0, dtype=np.float64))
        encoders.add(slide.encoder_sha256)
        names.add(slide.encoder_name)
        widths.add(slide.feature_dim)
    encoders.discard("")
    if len(widths) > 1 or len(encoders) > 1:
        raise UserError(
            f"{config.features}: features of {len(encoders)} tile encoders, widths {sorted(widths)}; fit on features of one tile encoder"
        )
    provenance = dict(
        features=str(config.features),
        encoder=",".join(sorted(names)),
        encoder_sha256=min(encoders, default=""),
        feature_dim=widths.pop(),
    )
    return inputs, labels, missing, provenance


def _fit_mil(config: FitConfig, labels: Labels) -> tuple[SlideClassifier, Labels, list[str]]:
    from extract.device import resolve_device
    from gigassl.evaluation.mil import AttentionMIL

    inputs, labels, missing, provenance = _read_slides(config, labels)
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
