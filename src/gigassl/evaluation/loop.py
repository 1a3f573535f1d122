"""The protocol loop of every ``gigassl evaluate`` task: each method × budget × split, and its summary.

- The subsets: each (split, budget) draws one stratified subset of the split's training part
  (:func:`gigassl.evaluation.protocol.budget_subset`, seeded by ``[seed, split, budget]``),
  shared by every method, so methods see the same slides.
- Each fit: ``method.fit_predict(subset, test, task.target, seed=seed + split)`` returns the test
  part's predictions (class probabilities, risks or values); ``task.score`` turns them into the
  row's metrics. A row also carries the wall and CPU seconds of the fit and prediction, and what
  the method did instead of an inner split when it could not make one (``fallback``).
- BLAS runs on one thread (parallel BLAS on a few hundred × 512 only burns CPU time); one log
  line per method and budget gives the task's first metric and the seconds.

What differs between classification, survival and regression is the :class:`Task`: its target,
its strata, its metrics (:mod:`gigassl.evaluation.classification`,
:mod:`gigassl.evaluation.target_protocol`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from gigassl.evaluation.protocol import Budget, budget_subset

logger = logging.getLogger(__name__)

Split = tuple[np.ndarray, np.ndarray]


class Method(Protocol):
    """A method the loop fits; it may also have ``fallback(strata of the training subset, seed) -> str``,
    what it does instead of an inner split the subset is too small for ("" when it has one)."""

    name: str

    def fit_predict(self, train: np.ndarray, test: np.ndarray, target: Any, seed: int) -> np.ndarray:
        """Fit on rows ``train`` of ``target``, return the predictions for rows ``test`` (first axis len(test))."""


@dataclass(frozen=True)
class Task:
    """What the loop needs to know of a task.

    ``target``: what methods fit (integer labels (S,), or :class:`~gigassl.evaluation.targets.Targets`);
    ``strata`` (S,) integers the budget subsets are stratified on, named by ``strata_names`` in errors;
    ``score(train, test, predictions)``: the row's metrics (``train`` is the split's whole training part);
    ``metrics``: the metrics summarised as mean ± s.d. over the splits, the first one logged as ``headline``;
    ``describe_subset(subset)``: extra row fields of a training subset (e.g. its number of events);
    ``summary_extra(group)``: extra summary fields of one (method, budget)'s rows."""

    target: Any
    strata: np.ndarray
    strata_names: Sequence[str] | None
    score: Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, float]]
    metrics: tuple[str, ...]
    headline: str
    describe_subset: Callable[[np.ndarray], dict[str, Any]] = lambda subset: {}
    summary_extra: Callable[[Sequence[dict[str, Any]]], dict[str, Any]] = lambda group: {}


@dataclass
class ProtocolRun:
    """The loop's output: one row per fit, and the test predictions per (method, budget) in split order."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    predictions: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)


def run_protocol(
    methods: Sequence[Method], task: Task, splits: Sequence[Split], budgets: Sequence[Budget], seed: int = 0
) -> ProtocolRun:
    """Every method × budget × split: one row per fit (method, budget, split, n_train, the task's
    metrics, seconds, cpu_seconds, and the fallback when there was one)."""
    from threadpoolctl import threadpool_limits

    subsets = {
        (s, b): budget_subset(train, task.strata, budget, np.random.default_rng([seed, s, b]), s, task.strata_names)
        for s, (train, _) in enumerate(splits)
        for b, budget in enumerate(budgets)
    }
    run = ProtocolRun()
    with threadpool_limits(1, user_api="blas"):
        for method in methods:
            for b, budget in enumerate(budgets):
                done = [
                    _fit_one(method, task, subsets[(s, b)], split, budget.text, s, seed, run) for s, split in enumerate(splits)
                ]
                run.rows += done
                fallback = next((r["fallback"] for r in done if r.get("fallback")), "")
                if fallback:  # once per method and budget
                    logger.info("%s @ %s: %s", method.name, budget.text, fallback)
                logger.info(
                    "%s @ %s: %s %.3f (%.1f s for %d splits)",
                    method.name,
                    budget.text,
                    task.headline,
                    np.nanmean([r[task.metrics[0]] for r in done]),
                    sum(r["seconds"] for r in done),
                    len(done),
                )
    return run


def _fit_one(
    method: Method, task: Task, subset: np.ndarray, split: Split, budget: str, index: int, seed: int, run: ProtocolRun
) -> dict[str, Any]:
    """One fit on ``subset``, scored on the split's test part; its predictions are kept in ``run``."""
    train, test = split
    started, cpu_started = time.perf_counter(), time.process_time()
    predictions = np.asarray(method.fit_predict(subset, test, task.target, seed=seed + index), np.float64)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    run.predictions.setdefault((method.name, budget), []).append((test, predictions))
    row = dict(method=method.name, budget=budget, split=index, n_train=len(subset), **task.describe_subset(subset))
    row.update(task.score(train, test, predictions))
    # CPU seconds: on a shared machine, what a quiet one would take
    row.update(seconds=round(seconds, 4), cpu_seconds=round(cpu_seconds, 4))
    says = getattr(method, "fallback", None)  # classification methods: what they do without an inner split
    fallback = says(task.strata[subset], seed + index) if says is not None else ""
    if fallback:
        row["fallback"] = fallback
    return row


def summarise(
    rows: Sequence[dict[str, Any]],
    metrics: Sequence[str],
    extra: Callable[[Sequence[dict[str, Any]]], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Per (method, budget), in first-seen order: mean n_train, the number of splits, mean ± s.d.
    of each metric over the splits (NaN splits left out), and ``extra(rows of the group)``."""
    summary = []
    for method, budget in dict.fromkeys((r["method"], r["budget"]) for r in rows):
        group = [r for r in rows if r["method"] == method and r["budget"] == budget]
        entry: dict[str, Any] = dict(
            method=method, budget=budget, n_train=float(np.mean([r["n_train"] for r in group])), n_splits=len(group)
        )
        for metric in metrics:
            values = np.array([r[metric] for r in group], dtype=float)
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = float(np.nanmean(values)), float(np.nanstd(values))
        summary.append({**entry, **(extra(group) if extra is not None else {})})
    return summary
