"""Print a MoCo run's per-epoch monitors (``OUT/monitors.csv`` of ``gigassl pretrain-tiles``) as
a markdown table: the training loss beside the figures that do not move with the queue.

    python benchmarks/moco_curve.py bench_out/bach/moco/*/monitors.csv [more runs …]
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

COLUMNS = (
    ("epoch", "epoch", "{:.0f}"),
    ("lr", "lr", "{:.1e}"),
    ("loss", "loss (queue)", "{:.2f}"),
    ("positive_accuracy", "pos. acc.", "{:.3f}"),
    ("positive_cosine", "cos q·k⁺", "{:.2f}"),
    ("negative_cosine", "cos q·queue", "{:.2f}"),
    ("fresh_infonce", "InfoNCE, no queue", "{:.3f}"),
    ("uniformity", "uniformity", "{:.2f}"),
    ("alignment", "alignment", "{:.3f}"),
    ("probe_auc", "probe AUC", "{:.3f}"),
)


def table(path: Path) -> str:
    """The monitors of one run as a markdown table (columns the run did not log are left out)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    shown = [c for c in COLUMNS if rows and rows[0].get(c[0], "") != ""]
    lines = [f"`{path}`", "", "| " + " | ".join(c[1] for c in shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(float(row[key])) for key, _, fmt in shown) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    print("\n\n".join(table(Path(p)) for p in argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
