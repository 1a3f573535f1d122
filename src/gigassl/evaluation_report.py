"""What ``gigassl evaluate`` prints and writes: the tables, ``results.csv`` and ``results.json``
(its figure is :func:`gigassl.plots.plot_auc`)."""

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
        lines.append(
            f"{r['method']:<9} {r['budget']:>8} {r['n_train']:>8.0f}  "
            f"{r['auc_mean']:.3f} ± {r['auc_std']:.3f}    "
            f"{r['balanced_accuracy_mean']:.3f} ± {r['balanced_accuracy_std']:.3f}"
        )
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
