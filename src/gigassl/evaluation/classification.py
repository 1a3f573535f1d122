"""Classification for the protocol loop (:mod:`gigassl.evaluation.loop`): its methods and metrics.

- Methods: logistic regression on fixed per-slide vectors (:class:`LinearMethod`: ``gigassl`` on
  the embeddings, ``average`` on the mean tile features), gated attention-MIL
  (:class:`AttentionMethod`) and top-k fine-tuning (:class:`TopKMethod`); each returns
  (len(test), C) class probabilities and says what it does instead of its inner split when the
  training labels are too few for one (``fallback``).
- Metrics on the test part: ROC-AUC (binary; one-vs-rest macro over the classes for more) and
  balanced accuracy (:func:`classification_task`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.base import clone
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from gigassl.evaluation.loop import Task
from gigassl.evaluation.mil import (
    AttentionMIL,
    SlideTiles,
    TopKFineTuner,
    inner_folds,
    inner_validation_split,
    make_logistic_regression,
)

METRICS = ("auc", "balanced_accuracy")


class LinearMethod:
    """Logistic regression on fixed per-slide vectors (embeddings, or mean features), a fresh
    estimator per fit — exactly what a plain scikit-learn loop over the splits computes."""

    def __init__(self, name: str, vectors: np.ndarray, c: float = 10.0, tune_c: bool = False, standardize: bool = False) -> None:
        self.name = name
        self.vectors = np.asarray(vectors, dtype=np.float64)
        self.c, self.tune_c, self.standardize = c, tune_c, standardize

    def fallback(self, y_train: np.ndarray, seed: int = 0) -> str:
        """What the method does instead of choosing C by inner cross-validation ("" when it needs none)."""
        if self.tune_c and np.bincount(y_train)[np.unique(y_train)].min() < 2:
            return f"C fixed at {self.c:g}: choosing C by inner cross-validation (--tune-c) needs ≥ 2 training slides per class"
        return ""

    def fit_predict(self, train: np.ndarray, test: np.ndarray, y: np.ndarray, seed: int = 0) -> np.ndarray:
        """Fit on rows ``train`` (labels ``y`` as integers), return (len(test), C) probabilities."""
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
        """What early stopping does without an inner validation split ("" when it has one)."""
        return attention_fallback(self.estimator, y_train, seed)

    def fit_predict(self, train: np.ndarray, test: np.ndarray, y: np.ndarray, seed: int = 0) -> np.ndarray:
        """Fit on rows ``train`` (labels ``y`` as integers), return (len(test), C) probabilities."""
        model = clone(self.estimator).set_params(seed=seed).fit([self.bags[i] for i in train], y[train])
        return _full_proba(model.predict_proba([self.bags[i] for i in test]), model.classes_, int(y.max()) + 1)


class TopKMethod:
    """Top-k fine-tuning; ``tiles`` says where each slide's tiles are re-read from."""

    name = "topk"

    def __init__(self, bags: Sequence[np.ndarray], tiles: Sequence[SlideTiles], estimator: TopKFineTuner) -> None:
        self.bags, self.tiles, self.estimator = bags, tiles, estimator

    def fallback(self, y_train: np.ndarray, seed: int = 0) -> str:
        """What its attention-MIL's early stopping does without an inner validation split."""
        return attention_fallback(self.estimator.mil or AttentionMIL(), y_train, seed)

    def fit_predict(self, train: np.ndarray, test: np.ndarray, y: np.ndarray, seed: int = 0) -> np.ndarray:
        """Fit on rows ``train`` (labels ``y`` as integers), return (len(test), C) probabilities."""
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


def roc_auc(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Binary ROC-AUC, or the macro mean of one-vs-rest AUCs over the classes present in ``y_true``."""
    n_classes = proba.shape[1]
    if n_classes == 2:
        return float(roc_auc_score(y_true, proba[:, 1]))
    aucs = [roc_auc_score(y_true == c, proba[:, c]) for c in range(n_classes) if 0 < (y_true == c).sum() < len(y_true)]
    return float(np.mean(aucs)) if aucs else float("nan")


def classification_task(y: np.ndarray, class_names: Sequence[str] | None = None) -> Task:
    """The loop's task for integer labels ``y`` (S,): subsets stratified on the classes (named by
    ``class_names`` in errors), ROC-AUC and balanced accuracy of the (len(test), C) probabilities."""

    def score(train: np.ndarray, test: np.ndarray, proba: np.ndarray) -> dict[str, float]:
        return dict(auc=roc_auc(y[test], proba), balanced_accuracy=float(balanced_accuracy_score(y[test], proba.argmax(1))))

    return Task(target=y, strata=y, strata_names=class_names, score=score, metrics=METRICS, headline="AUC")
