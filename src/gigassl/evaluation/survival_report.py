"""What a survival or regression evaluation prints and draws.

- The table: mean ± s.d. over splits of Harrell's and Uno's C (with the median log-rank p of the
  test parts' median risk splits), or of Pearson r and R²; then the paired differences to the
  reference in points (× 100).
- ``kaplan_meier.png`` (survival), one panel per method at the first budget: Kaplan–Meier curves
  of the high- and low-risk halves of the cohort, with the log-rank p. The groups are out of
  sample: each slide's risk is ranked within every test part that held it (percentile 0 … 1),
  the ranks are averaged over those splits, and the slides are split at the median of that
  average (slides never tested are left out).
- ``predicted_vs_observed.png`` (regression): each slide's mean out-of-sample prediction against
  its target, one panel per method at the first budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gigassl.evaluation.paired import format_paired
from gigassl.evaluation.survival_metrics import kaplan_meier, logrank_test
from gigassl.evaluation.targets import Targets
from gigassl.plots import _pyplot

METRIC_NAMES = {"harrell_c": "Harrell's C", "uno_c": "Uno's C", "pearson_r": "Pearson r", "r2": "R²"}
KM_PNG = "kaplan_meier.png"
SCATTER_PNG = "predicted_vs_observed.png"


def format_target_report(summary: Sequence[dict[str, Any]], paired: Sequence[dict[str, Any]], task: str) -> str:
    """The summary table, then the paired differences of each metric in points (× 100)."""
    metrics = ("harrell_c", "uno_c") if task == "survival" else ("pearson_r", "r2")
    header = f"{'method':<9} {'budget':>8} {'n_train':>8}  " + "  ".join(f"{METRIC_NAMES[m]:>15}" for m in metrics)
    lines = [header + ("  median log-rank p" if task == "survival" else "")]
    for r in summary:
        cells = "  ".join(f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_std']:.3f}".rjust(15) for m in metrics)
        extra = f"  {r['logrank_p_median']:.2g}" if task == "survival" else ""
        lines.append(f"{r['method']:<9} {r['budget']:>8} {r['n_train']:>8.0f}  {cells}{extra}")
    if task == "survival" and summary:
        lines.append(
            f"Uno's C truncated at the 80th percentile of each split's training times (mean {summary[0]['uno_tau_mean']:.3g})"
        )
    lines += [format_paired(paired, metric).replace(metric, METRIC_NAMES[metric], 1) for metric in metrics if paired]
    return "\n".join(lines)


def out_of_sample_scores(n_slides: int, splits: Sequence[tuple[np.ndarray, np.ndarray]], ranked: bool) -> np.ndarray:
    """(S,) each slide's mean over the test parts that held it of its score (or of its percentile
    rank within the test part, ``ranked``); nan for a slide never tested."""
    from scipy.stats import rankdata

    total, count = np.zeros(n_slides), np.zeros(n_slides)
    for test, scores in splits:
        values = (rankdata(scores) - 1) / max(len(scores) - 1, 1) if ranked else scores
        np.add.at(total, test, values)
        np.add.at(count, test, 1)
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def risk_groups(targets: Targets, splits: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """High/low out-of-sample risk groups (median split of the mean test rank) and their log-rank test."""
    assert targets.time is not None and targets.event is not None, "survival targets"
    rank = out_of_sample_scores(len(targets.slide_ids), splits, ranked=True)
    tested = np.flatnonzero(np.isfinite(rank))
    high = rank[tested] > np.median(rank[tested])
    statistic, p = logrank_test(targets.time[tested], targets.event[tested], high)
    return dict(rows=tested, high=high, n_high=int(high.sum()), n_low=int((~high).sum()), chi2=statistic, logrank_p=p)


def plot_target_figure(
    targets: Targets, scores: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]], out: Path, title: str
) -> tuple[Path, dict[str, Any]]:
    """The task's figure for each method at its first budget; returns its path and (survival) the
    risk groups' sizes and log-rank test per method."""
    first: dict[str, str] = {}
    for method, budget in scores:
        first.setdefault(method, budget)
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(first), figsize=(4.2 * len(first), 3.8), squeeze=False)
    groups: dict[str, Any] = {}
    for axis, (method, budget) in zip(axes[0], first.items()):
        if targets.event is not None:
            groups[method] = _km_panel(axis, targets, scores[(method, budget)], f"{method} @ {budget}")
        else:
            _scatter_panel(axis, targets, scores[(method, budget)], f"{method} @ {budget}")
    figure.suptitle(
        f"{title}: {'out-of-sample risk groups (median split)' if groups else 'out-of-sample predictions'}", fontsize=10
    )
    figure.tight_layout()
    path = out / (KM_PNG if targets.event is not None else SCATTER_PNG)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path, groups


def _km_panel(axis: Any, targets: Targets, splits: Sequence[tuple[np.ndarray, np.ndarray]], title: str) -> dict[str, Any]:
    assert targets.time is not None and targets.event is not None, "survival targets"
    found = risk_groups(targets, splits)
    rows = found["rows"]
    for name, members, colour in (("high risk", found["high"], "tab:red"), ("low risk", ~found["high"], "tab:blue")):
        times, survival = kaplan_meier(targets.time[rows][members], targets.event[rows][members])
        axis.step(np.r_[0.0, times], np.r_[1.0, survival], where="post", color=colour, label=f"{name} (n={int(members.sum())})")
    axis.set_title(f"{title}\nlog-rank p = {found['logrank_p']:.2g}", fontsize=9)
    axis.set_xlabel("time")
    axis.set_ylabel("survival (Kaplan–Meier)")
    axis.set_ylim(0, 1.02)
    axis.legend(fontsize=8)
    return {k: v for k, v in found.items() if k not in ("rows", "high")}


def _scatter_panel(axis: Any, targets: Targets, splits: Sequence[tuple[np.ndarray, np.ndarray]], title: str) -> None:
    assert targets.value is not None, "a regression target"
    predicted = out_of_sample_scores(len(targets.slide_ids), splits, ranked=False)
    tested = np.isfinite(predicted)
    axis.scatter(targets.value[tested], predicted[tested], s=10, alpha=0.7)
    axis.set_title(title, fontsize=9)
    axis.set_xlabel("observed")
    axis.set_ylabel("mean out-of-sample prediction")
    axis.grid(alpha=0.3)
