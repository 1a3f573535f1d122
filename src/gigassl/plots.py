"""The package's figures, drawn with matplotlib (imported when a figure is drawn, Agg backend).

- :func:`plot_curves`: ``curves.png`` of ``gigassl train``, one panel per monitor against the epoch;
- :func:`plot_auc`: ``auc_vs_training_slides.png`` of ``gigassl evaluate``: AUC against the
  number of training slides per method, and the paired differences to the reference with their
  95 % intervals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

# panels of curves.png: the columns of monitors.csv drawn together
CURVE_PANELS = (
    ("train_loss", "loss"),
    ("train_accuracy", "positive_pair_accuracy"),
    ("collapse_level",),
    ("rankme",),
    ("odcorr",),
    ("lr",),
)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: Sequence[Mapping[str, float]], path: Path) -> Path:
    """A PNG with one panel per monitor against the epoch (the rows of ``monitors.csv``)."""
    plt = _pyplot()
    figure, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    epochs = [row["epoch"] for row in history]
    for axis, keys in zip(axes.ravel(), CURVE_PANELS):
        for key in keys:
            values = [row.get(key, float("nan")) for row in history]
            axis.plot(epochs, values, marker="." if len(epochs) < 30 else None, label=key)
        axis.set_title(" / ".join(keys), fontsize=9)
        axis.set_xlabel("epoch")
        if len(keys) > 1:
            axis.legend(fontsize=7)
    figure.suptitle("Giga-SSL training (train_* = epoch's steps; others = fixed monitor slides, eval mode)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_auc(summary: Sequence[dict[str, Any]], path: str | Path, title: str = "", paired: Sequence[dict[str, Any]] = ()) -> Path:
    """Left: AUC (mean ± s.d.) against training slides, one line per method. Right (with
    ``paired``): each method's paired AUC difference to the reference, 95 % interval bars."""
    plt = _pyplot()
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
