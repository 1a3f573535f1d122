"""Paired comparisons of methods evaluated on the same splits.

Two methods scored on the same splits (same training slides, same test slides) differ by far
less from split to split than either one's mean ± s.d. suggests: the split's difficulty is
shared. The comparison that answers "is A better than B" is therefore the per-split difference
A − B: its mean, a 95 % interval, and in how many splits A was ahead.

- One evaluation (:func:`paired_differences`): Student-t interval of the mean difference over
  the n splits, ``mean ± t(0.975, n − 1) · s / √n``. The splits re-use slides, so this
  interval speaks of *this* cohort and pipeline run; it does not cover the variance of the
  bank, the training run or the tile encoder.
- Several runs of the whole pipeline (:func:`pooled_paired_differences`, e.g. the BACH
  benchmark's ``--seeds``): the runs are the independent units. The interval is a two-level
  (cluster) bootstrap: resample runs with replacement, then splits within each run, and take
  the 2.5th and 97.5th percentiles of the pooled mean difference.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

METRICS = ("auc", "balanced_accuracy")
CONFIDENCE = 0.95
BOOTSTRAP_DRAWS = 10_000


def t_interval(differences: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student-t interval of the mean of (n,) paired differences; (nan, nan) when n < 2."""
    from scipy.stats import t

    values = np.asarray(differences, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return float("nan"), float("nan")
    half = t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def _per_split(rows: Sequence[dict[str, Any]], method: str, budget: str, metric: str) -> dict[int, float]:
    return {int(r["split"]): float(r[metric]) for r in rows if r["method"] == method and r["budget"] == budget}


def split_differences(rows: Sequence[dict[str, Any]], method: str, reference: str, budget: str, metric: str) -> np.ndarray:
    """(n,) ``method − reference`` on the splits both were scored on, in split order."""
    mine, theirs = _per_split(rows, method, budget, metric), _per_split(rows, reference, budget, metric)
    shared = sorted(set(mine) & set(theirs))
    return np.array([mine[s] - theirs[s] for s in shared], dtype=float)


def _describe(differences: np.ndarray, low: float, high: float, interval: str) -> dict[str, Any]:
    finite = differences[np.isfinite(differences)]
    return dict(
        mean=float(finite.mean()) if len(finite) else float("nan"),
        ci_low=low,
        ci_high=high,
        wins=int((finite > 0).sum()),
        n=int(len(finite)),
        interval=interval,
    )


def paired_differences(rows: Sequence[dict[str, Any]], reference: str, metrics: Sequence[str] = METRICS) -> list[dict[str, Any]]:
    """For every other method and budget of ``rows`` (one row per method × budget × split, as
    :func:`gigassl.evaluation.loop.run_protocol` returns): ``{method, budget, reference, <metric>:
    {mean, ci_low, ci_high, wins, n, interval}}``; empty when ``reference`` was not run."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    if reference not in methods:
        return []
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    out = []
    for method in (m for m in methods if m != reference):
        for budget in budgets:
            entry: dict[str, Any] = dict(method=method, budget=budget, reference=reference)
            for metric in metrics:
                differences = split_differences(rows, method, reference, budget, metric)
                entry[metric] = _describe(differences, *t_interval(differences), "t over splits")
            out.append(entry)
    return out


def cluster_bootstrap(
    groups: Sequence[np.ndarray], confidence: float = CONFIDENCE, draws: int = BOOTSTRAP_DRAWS, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of the pooled mean of per-run difference arrays, resampling runs,
    then splits within each drawn run."""
    groups = [np.asarray(g, dtype=float)[np.isfinite(g)] for g in groups]
    groups = [g for g in groups if len(g)]
    if not groups:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(draws)
    for d in range(draws):
        picked = rng.integers(0, len(groups), size=len(groups))
        means[d] = np.concatenate([rng.choice(groups[i], size=len(groups[i])) for i in picked]).mean()
    tail = (1 - confidence) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def pooled_paired_differences(
    runs: Sequence[Sequence[dict[str, Any]]], reference: str, metrics: Sequence[str] = METRICS, draws: int = BOOTSTRAP_DRAWS
) -> list[dict[str, Any]]:
    """:func:`paired_differences` pooled over whole-pipeline runs (each a list of split rows):
    the mean over every (run, split) pair, wins over all pairs, the cluster-bootstrap interval,
    and each run's own mean difference (``per_run``)."""
    first = runs[0]
    methods = [m for m in dict.fromkeys(r["method"] for r in first) if m != reference]
    budgets = list(dict.fromkeys(r["budget"] for r in first))
    out = []
    for method in methods:
        for budget in budgets:
            entry: dict[str, Any] = dict(method=method, budget=budget, reference=reference, n_runs=len(runs))
            for metric in metrics:
                groups = [split_differences(rows, method, reference, budget, metric) for rows in runs]
                pooled = np.concatenate(groups) if groups else np.array([])
                entry[metric] = dict(
                    _describe(
                        pooled,
                        *cluster_bootstrap(groups, draws=draws),
                        f"cluster bootstrap over {len(runs)} runs and their splits",
                    ),
                    per_run=[float(np.nanmean(g)) if len(g) else float("nan") for g in groups],
                )
            out.append(entry)
    return out


def format_paired(entries: Sequence[dict[str, Any]], metric: str = "auc", scale: float = 100.0, unit: str = "pt") -> str:
    """One line per (method, budget): ``Δ mean [low, high] unit, wins/n``."""
    if not entries:
        return ""
    reference = entries[0]["reference"]
    name = {"auc": "ROC-AUC", "balanced_accuracy": "balanced acc."}.get(metric, metric)
    lines = [f"paired Δ {name} vs {reference} ({entries[0][metric]['interval']}, 95 %):"]
    for e in entries:
        d = e[metric]
        lines.append(
            f"  {e['method']:<9} {e['budget']:>8}  {d['mean'] * scale:+6.1f} {unit} "
            f"[{d['ci_low'] * scale:+.1f}, {d['ci_high'] * scale:+.1f}]  ahead in {d['wins']}/{d['n']}"
        )
    return "\n".join(lines)
