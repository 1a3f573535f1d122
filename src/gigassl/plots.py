"""The package's figures, drawn with matplotlib (imported when a figure is drawn, Agg backend).

- :func:`plot_curves`: ``curves.png`` of ``gigassl train``, one panel per monitor against the epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

# panels of curves.png: the columns of monitors.csv drawn together
CURVE_PANELS = (("train_loss", "loss"), ("train_accuracy", "positive_pair_accuracy"), ("collapse_level",),
                ("rankme",), ("odcorr",), ("lr",))


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
