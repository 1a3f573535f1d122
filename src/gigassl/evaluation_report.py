"""What ``gigassl evaluate`` prints and writes: the tables, ``results.csv`` / ``results.json``
and the plot (AUC against training slides, and the paired differences with their intervals)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gigassl.paired import format_paired


def format_table(summary: Sequence[dict[str, Any]]) -> str:
    """The summary (mean ± s.d. over splits) as an aligned text table."""
    lines = [f"{'method':<9} {'budget':>8} {'n_train':>8}  {'ROC-AUC':>15}  {'balanced acc.':>15}"]
    for r in summary:
        lines.append(f"{r['method']:<9} {r['budget']:>8} {r['n_train']:>8.0f}  "
                     f"{r['auc_mean']:.3f} ± {r['auc_std']:.3f}    "
                     f"{r['balanced_accuracy_mean']:.3f} ± {r['balanced_accuracy_std']:.3f}")
    return "\n".join(lines)


def format_report(summary: Sequence[dict[str, Any]], paired: Sequence[dict[str, Any]]) -> str:
    """The summary table, then the paired differences in ROC-AUC and balanced accuracy points."""
    parts = [format_table(summary)]
    parts += [format_paired(paired, metric) for metric in ("auc", "balanced_accuracy") if paired]
    return "\n".join(parts)


def write_csv(summary: Sequence[dict[str, Any]], path: Path) -> Path:
    """``results.csv``: one row per (method, budget) of the summary."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    return path


def write_json(payload: dict[str, Any], path: Path) -> Path:
    """``results.json`` (numpy scalars as numbers, NaN as null)."""
    path.write_text(json.dumps(payload, indent=2, default=_json_default))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return None if math.isnan(value) else float(value)
    return str(value)


def plot_auc(summary: Sequence[dict[str, Any]], path: str | Path, title: str = "",
             paired: Sequence[dict[str, Any]] = ()) -> Path:
    """Left: AUC (mean ± s.d.) against training slides, one line per method. Right (with
    ``paired``): each method's paired AUC difference to the reference, 95 % interval bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2 if paired else 1, figsize=(11 if paired else 6, 4.2), squeeze=False)
    axis = axes[0, 0]
    for method in dict.fromkeys(r["method"] for r in summary):
        points = sorted((r["n_train"], r["auc_mean"], r["auc_std"]) for r in summary if r["method"] == method)
        x, mean, std = (np.array(v) for v in zip(*points))
        axis.plot(x, mean, marker="o", label=method)
        axis.fill_between(x, mean - std, mean + std, alpha=0.2)
    log_x = max(r["n_train"] for r in summary) > 4 * min(r["n_train"] for r in summary)
    _decorate(axis, "ROC-AUC (mean ± s.d. over splits)", title or "AUC vs number of training slides", log_x)
    if paired:
        _plot_paired(axes[0, 1], summary, paired, log_x)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def _plot_paired(axis: Any, summary: Sequence[dict[str, Any]], paired: Sequence[dict[str, Any]], log_x: bool) -> None:
    n_train = {(r["method"], r["budget"]): r["n_train"] for r in summary}
    reference = paired[0]["reference"]
    for method in dict.fromkeys(e["method"] for e in paired):
        entries = sorted((n_train[(method, e["budget"])], e["auc"]) for e in paired if e["method"] == method)
        x = np.array([n for n, _ in entries])
        mean = np.array([d["mean"] for _, d in entries]) * 100
        low = mean - np.array([d["ci_low"] for _, d in entries]) * 100
        high = np.array([d["ci_high"] for _, d in entries]) * 100 - mean
        axis.errorbar(x, mean, yerr=np.vstack([low, high]), marker="o", capsize=3, label=f"{method} − {reference}")
    axis.axhline(0.0, color="grey", linewidth=0.8)
    _decorate(axis, f"Δ ROC-AUC vs {reference} (points, 95 % CI)", "paired differences on the same splits", log_x)


def _decorate(axis: Any, y_label: str, title: str, log_x: bool) -> None:
    if log_x:
        axis.set_xscale("log")
    axis.set_xlabel("training slides")
    axis.set_ylabel(y_label)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
