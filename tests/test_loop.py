"""The protocol loop every ``gigassl evaluate`` task runs (``gigassl.evaluation.loop``), on a toy task."""

from __future__ import annotations

import numpy as np

from gigassl.evaluation.loop import Task, run_protocol, summarise
from gigassl.evaluation.protocol import parse_budgets


class Recording:
    """Predicts the mean training target for every test row; remembers the subsets it was given."""

    def __init__(self, name: str, fallback: str = "") -> None:
        self.name, self.said, self.subsets = name, fallback, []

    def fit_predict(self, train: np.ndarray, test: np.ndarray, target: np.ndarray, seed: int) -> np.ndarray:
        self.subsets.append((seed, tuple(train)))
        return np.full(len(test), target[train].mean(), dtype=np.float32)

    def fallback(self, strata: np.ndarray, seed: int) -> str:
        return self.said if len(strata) < 4 else ""


def toy_task(values: np.ndarray) -> Task:
    strata = (values > np.median(values)).astype(int)
    return Task(
        target=values,
        strata=strata,
        strata_names=["low", "high"],
        score=lambda train, test, predicted: dict(error=float(np.abs(values[test] - predicted).mean()), n_seen=len(train)),
        metrics=("error",),
        headline="mean absolute error",
        describe_subset=lambda subset: dict(n_high=int(strata[subset].sum())),
        summary_extra=lambda group: dict(n_seen_max=max(r["n_seen"] for r in group)),
    )


def test_every_method_sees_the_same_subsets_and_rows_carry_metrics_seconds_and_fallbacks() -> None:
    values = np.arange(20, dtype=float)
    splits = [(np.arange(0, 20, 2), np.arange(1, 20, 2)), (np.arange(1, 20, 2), np.arange(0, 20, 2))]
    first, second = Recording("first"), Recording("second", fallback="no inner split")
    task = toy_task(values)
    run = run_protocol([first, second], task, splits, parse_budgets("100%,2"), seed=5)
    assert first.subsets == second.subsets and [seed for seed, _ in first.subsets] == [5, 6, 5, 6]
    assert len(run.rows) == 8 and list(run.rows[0])[:5] == ["method", "budget", "split", "n_train", "n_high"]
    assert [r["n_train"] for r in run.rows[:4]] == [10, 10, 2, 2] and all(r["n_seen"] == 10 for r in run.rows)
    assert all(r["seconds"] >= 0 and r["cpu_seconds"] >= 0 for r in run.rows)
    assert [r.get("fallback", "") for r in run.rows if r["method"] == "second"] == ["", "", "no inner split", "no inner split"]
    test, predicted = run.predictions[("first", "2")][1]
    assert np.array_equal(test, splits[1][1]) and predicted.dtype == np.float64
    summary = summarise(run.rows, task.metrics, task.summary_extra)
    assert [(s["method"], s["budget"], s["n_splits"]) for s in summary][:2] == [("first", "100%", 2), ("first", "2", 2)]
    assert all(s["n_seen_max"] == 10 for s in summary)
    errors = [r["error"] for r in run.rows[:2]]
    assert summary[0]["error_mean"] == np.mean(errors) and summary[0]["error_std"] == np.std(errors)
