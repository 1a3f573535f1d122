"""One setting at a time: the BACH benchmark with a setting changed, paired with the defaults.

Every variant is the whole ``bach_benchmark.py`` run with one or more flags changed (its stages
cached as usual under ``--out``, so a variant only redoes what the flag touches: T, the
temperature and the scale range retrain; R re-embeds; A re-extracts; MoCo epochs redo all).
The seed is the same, so the evaluation splits are the same and each variant's Giga-SSL is
compared split by split with the default's (Δ, t interval over the splits, splits ahead) and
with AverageMIL in its own run.

    python benchmarks/bach_sweep.py --images ../shared/data/bach-dev --out bench_out/bach \\
        --encoder moco --moco-epochs 12 --n-augmentations 5 --n-tiles-per-augmentation 32 --epochs 400 \\
        --variant T10:--n-tiles-per-view=10 --variant tau0.1:--temperature=0.1 \\
        --variant scale0.7-1.3:--scale-min=0.7,--scale-max=1.3 --variant R10:--n-views=10

Flags before the first ``--variant`` are the defaults shared by every run. The table goes to
``OUT/sweep.md`` and ``OUT/sweep.json``. BACH is CC BY-NC-ND: outputs stay under ``bench_out/``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent


def _benchmark():
    spec = importlib.util.spec_from_file_location("bach_benchmark", HERE / "bach_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bach_benchmark"] = module
    spec.loader.exec_module(module)
    return module


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME:--flag=value,--flag=value`` → (NAME, ["--flag", "value", …])."""
    name, _, flags = text.partition(":")
    if not name or not flags:
        raise SystemExit(f"--variant {text!r}: write NAME:--flag=value[,--flag=value]")
    argv = []
    for item in flags.split(","):
        flag, _, value = item.partition("=")
        argv += [flag] + ([value] if value else [])
    return name, argv


def renamed(rows: Sequence[dict[str, Any]], method: str, name: str) -> list[dict[str, Any]]:
    """The split rows of ``method``, relabelled ``name`` (to pair rows of two runs)."""
    return [dict(r, method=name) for r in rows if r["method"] == method]


def compare(default: dict[str, Any], variant: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Paired differences of the variant's Giga-SSL to the default's and to its own AverageMIL."""
    from gigassl.evaluation.paired import paired_differences

    rows = renamed(variant["splits"], "gigassl", "variant") + renamed(default["splits"], "gigassl", "default")
    return dict(
        vs_default=paired_differences(rows, "default"),
        vs_average=[e for e in paired_differences(variant["splits"], "average") if e["method"] == "gigassl"],
    )


def _cell(entry: dict[str, Any]) -> str:
    d = entry["auc"]
    return f"{100 * d['mean']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}] {d['wins']}/{d['n']}"


def sweep_markdown(default: dict[str, Any], table: dict[str, dict[str, Any]]) -> str:
    """Rows: variants; columns: budgets; cells: Δ AUC points vs the default's Giga-SSL, then vs AverageMIL."""
    budgets = [r["budget"] for r in default["summary"] if r["method"] == "gigassl"]
    head = "| variant | " + " | ".join(budgets) + " |\n|---|" + "---|" * len(budgets)
    base = {e["budget"]: e for e in compare(default, default)["vs_average"]}
    lines = [
        "Δ macro ROC-AUC in points, mean over splits [95 % t interval], splits ahead. Upper: Giga-SSL of the "
        "variant − Giga-SSL of the default run; lower: the variant's Giga-SSL − AverageMIL.",
        "",
        head,
        "| default − AverageMIL | " + " | ".join(_cell(base[b]) for b in budgets) + " |",
    ]
    for name, result in table.items():
        by_budget = {e["budget"]: e for e in result["vs_default"]}
        lines.append(f"| {name} − default | " + " | ".join(_cell(by_budget[b]) for b in budgets) + " |")
    for name, result in table.items():
        by_budget = {e["budget"]: e for e in result["vs_average"]}
        lines.append(f"| {name} − AverageMIL | " + " | ".join(_cell(by_budget[b]) for b in budgets) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    shared = argv[: argv.index("--variant")] if "--variant" in argv else argv
    variants = [parse_variant(argv[i + 1]) for i, a in enumerate(argv) if a == "--variant"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    bench = _benchmark()
    out = bench.parse_args(shared).out

    def run(extra: list[str], name: str) -> dict[str, Any]:
        args = bench.parse_args(shared + extra)
        return bench.run(args, args.seed, args.seed, Path(out) / "sweep" / name)

    default = run([], "default")
    table = {name: compare(default, run(extra, name)) for name, extra in variants}
    text = sweep_markdown(default, table)
    Path(out, "sweep.json").write_text(json.dumps(dict(variants=dict(variants), table=table), indent=1, default=str))
    Path(out, "sweep.md").write_text(text + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
