"""What ``gigassl evaluate`` prints and writes: the tables, ``results.csv`` and ``results.json``
(its figure is :func:`gigassl.plots.plot_auc`), and what it returns (:class:`EvaluationResult`)."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gigassl.evaluation.paired import format_paired

RESULTS_CSV = "results.csv"  # the summary table of every task
RESULTS_JSON = "results.json"  # settings, provenance, summary, paired differences, seconds, split rows


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


def results_payload(
    settings: dict[str, Any], provenance: dict[str, Any], rows: list[dict[str, Any]], **facts: Any
) -> dict[str, Any]:
    """``results.json``'s content for every task: the settings, the embeddings' provenance (plain
    values), the task's ``facts`` (summary, paired differences, …), seconds per method, every split row."""
    return dict(
        settings=settings,
        embeddings_provenance={k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in provenance.items()},
        **facts,
        seconds_per_method=method_seconds(rows),
        cpu_seconds_per_method=method_seconds(rows, "cpu_seconds"),
        splits=rows,
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return None if math.isnan(value) else float(value)
    return str(value)


def method_seconds(rows: Sequence[dict[str, Any]], key: str = "seconds") -> dict[str, float]:
    """Seconds (wall, or ``cpu_seconds``) each method spent fitting and predicting, over every budget and split."""
    seconds: dict[str, float] = {}
    for r in rows:
        seconds[r["method"]] = seconds.get(r["method"], 0.0) + float(r.get(key, 0.0))
    return {k: round(v, 2) for k, v in seconds.items()}


def fallbacks(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """(method, budget, what it did instead of an inner split), once each, for results.json."""
    seen = dict.fromkeys((r["method"], r["budget"], r["fallback"]) for r in rows if r.get("fallback"))
    return [dict(method=m, budget=b, fallback=f) for m, b, f in seen]


def format_costs(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Lines: the seconds (wall and CPU) per method, then each method's fallback per budget."""
    wall, cpu = method_seconds(rows), method_seconds(rows, "cpu_seconds")
    if not wall:
        return []
    n_fits = {m: sum(1 for r in rows if r["method"] == m) for m in wall}
    lines = [
        "evaluate time per method (fit + predict, all budgets and splits): "
        + ", ".join(f"{m} {s:.1f} s ({n_fits[m]} fits, CPU {cpu.get(m, 0.0):.1f} s)" for m, s in wall.items())
    ]
    return lines + [f"{f['method']} @ {f['budget']}: {f['fallback']}" for f in fallbacks(rows)]


@dataclass(frozen=True)
class EvaluationResult:
    """What a classification evaluation wrote: the summary, every split's row, the files."""

    summary: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    classes: list[str]
    missing: list[str]
    csv_path: Path
    json_path: Path
    plot_path: Path
    exit_code: int = 0
    paired: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    fallbacks: list[dict[str, str]] = field(default_factory=list)

    def format(self) -> str:
        """The AUC / balanced-accuracy table, the paired differences, the seconds per method,
        what methods did without an inner split, and the files written."""
        return "\n".join(
            [
                format_report(self.summary, self.paired),
                *format_costs(self.rows),
                f"written: {self.csv_path}, {self.json_path}, {self.plot_path}",
            ]
        )
