"""Attention-MIL at full strength: training variants paired on the BACH benchmark's own splits.

The BACH benchmark (``bach_benchmark.py``) found attention-MIL 12–19 AUC points below AverageMIL.
This script asks why, on the cached tile features of one benchmark seed: each variant changes the
training of the same gated attention-MIL network, and every variant, the training used before
this sweep (``before``) and AverageMIL are fitted on the *same* splits and training subsets as the
benchmark's evaluation (``gigassl.evaluation.protocol``: 10 seeded stratified 70/30 splits, budgets 100 %,
25 %, 8/class, 4/class, subsets drawn from the seed), so that each variant is compared split by
split (``gigassl.evaluation.paired``: mean Δ AUC, 95 % t interval over the splits, splits ahead) with
``before`` and with AverageMIL.

Where the variants come from (facts of the two implementations the field uses most):

- CLAM (Lu et al., Nat. Biomed. Eng. 2021; mahmoodlab/CLAM): Adam, lr 2e-4 in the paper and the
  README's commands (1e-4 in ``main.py``'s default), weight decay 1e-5, dropout 0.25, one bag per
  step, up to 200 epochs with early stopping on the validation loss (patience 20, not before
  epoch 50), features not standardised.
- STAMP (KatherLab, v2 ``advanced_config``): 32 epochs with patience 16 on a validation split,
  batch 64 bags of 512 sampled tiles, one-cycle schedule with peak lr 1e-4 starting at lr / 25,
  dropout 0.25.

``before``'s early stopping has patience 5 on a 20 % inner split of the training bags (28 bags at
100 %, 7 at 25 %, none at 4/class — where it trains the fixed 50 epochs).

    python benchmarks/baseline_sweep.py --run 0=/work/bach_out/extract/KEY/features \\
        --labels /work/bach_out/labels.csv --out bench_out/baseline_sweep
    python benchmarks/baseline_sweep.py --run 0=… --run 1=… --run 2=… --labels … --out …  # pooled

A run is ``SEED=FEATURES_FOLDER`` (the seed of the benchmark run whose ``extract`` stage wrote the
folder: it seeds the splits and the subsets). Fits are appended to ``OUT/seed-N/rows.jsonl`` as
they finish, and a rerun skips what is there, so an interrupted sweep resumes. The tables go to
``OUT/sweep.md`` and ``OUT/sweep.json``. BACH is CC BY-NC-ND: keep ``--out`` out of git (numbers
may be quoted).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# Attention-MIL's training before this sweep (gigassl 0.x up to the sweep's commit).
BEFORE: dict[str, Any] = dict(
    lr=2e-4,
    weight_decay=1e-4,
    dropout=0.25,
    max_epochs=50,
    patience=5,
    batch_size=8,
    max_tiles=512,
    validation_fraction=0.2,
    standardize=False,
    lr_schedule="constant",
    min_epochs=0,
)
FIXED = dict(validation_fraction=0.0)  # no inner split: the fixed number of epochs
STD = dict(standardize=True)
# In the order they run (the most telling first: a sweep cut short still answers the question).
VARIANTS: dict[str, dict[str, Any]] = {
    "before": {},
    "standardised": STD,
    "no-early-stop": FIXED,
    "std+no-early-stop": {**STD, **FIXED},
    "std+fixed+lr1e-3": {**STD, **FIXED, "lr": 1e-3},
    "stamp-recipe": dict(lr=1e-4, lr_schedule="one-cycle", max_epochs=32, patience=16, batch_size=64),
    "std+fixed+16-tiles": {**STD, **FIXED, "max_tiles": 16},
    "clam-recipe": dict(weight_decay=1e-5, max_epochs=200, patience=20, min_epochs=50),
    "std+fixed+no-dropout": {**STD, **FIXED, "dropout": 0.0},
    "std+fixed+wd1e-2": {**STD, **FIXED, "weight_decay": 1e-2},
    "std+fixed+lr1e-3+cosine": {**STD, **FIXED, "lr": 1e-3, "lr_schedule": "cosine"},
    "std+fixed+100ep": {**STD, **FIXED, "max_epochs": 100},
    "std+fixed+lr3e-3": {**STD, **FIXED, "lr": 3e-3},
}


def parse_run(text: str) -> tuple[int, Path]:
    """``SEED=FOLDER`` → (seed, folder)."""
    seed, _, folder = text.partition("=")
    if not seed.strip().isdigit() or not folder:
        raise SystemExit(f"--run {text!r}: write SEED=FEATURES_FOLDER, e.g. 0=/work/bach_out/extract/KEY/features")
    return int(seed), Path(folder)


def load_cohort(features: Path, labels_csv: Path):
    """(bags, y, class names, patients) of the labelled slides with features, in the labels' order
    — exactly what ``gigassl evaluate`` builds."""
    from gigassl.evaluation.inputs import feature_paths, load_bags
    from gigassl.evaluation.protocol import check_classes, keep_available, read_labels

    labels = read_labels(labels_csv)
    files = feature_paths(features)
    labels, _ = keep_available(labels, set(files), f"the features folder {features}", strict=False)
    classes = check_classes(labels, 2, str(labels_csv))
    y = np.searchsorted(classes, labels.labels)
    return load_bags([files[s] for s in labels.slide_ids]), y, classes, labels.patients


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def sweep_seed(seed: int, features: Path, args: argparse.Namespace, variants: Sequence[str]) -> list[dict[str, Any]]:
    """Every variant (and AverageMIL) on this seed's splits; rows appended to OUT/seed-N/rows.jsonl."""
    from gigassl.evaluation.classification import AttentionMethod, LinearMethod, classification_task
    from gigassl.evaluation.loop import run_protocol
    from gigassl.evaluation.mil import AttentionMIL, mean_features
    from gigassl.evaluation.protocol import make_splits, parse_budgets

    log = logging.getLogger("baseline_sweep")
    bags, y, classes, patients = load_cohort(features, args.labels)
    splits = make_splits(y, patients, args.n_splits, args.test_fraction, seed)[: args.first_splits]
    budgets = parse_budgets(args.budgets)
    rows_path = Path(args.out) / f"seed-{seed}" / "rows.jsonl"
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    rows = read_rows(rows_path)
    methods: list[Any] = [LinearMethod("average", mean_features(bags), 10.0, standardize=True)]
    for name in variants:
        estimator = AttentionMIL(**{**BEFORE, **VARIANTS[name]}, seed=0, device="cpu")
        methods.append(AttentionMethod(bags, estimator, name=name))
    for method in methods:
        if any(r["method"] == method.name for r in rows):
            log.info("seed %d: %s already in %s", seed, method.name, rows_path)
            continue
        started = time.perf_counter()
        new = run_protocol([method], classification_task(y, classes.tolist()), splits, budgets, seed).rows
        log.info("seed %d: %s done in %.0f s", seed, method.name, time.perf_counter() - started)
        with open(rows_path, "a") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in new)
        rows += new
    return rows


def _cell(d: dict[str, Any]) -> str:
    return f"{100 * d['mean']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}] {d['wins']}/{d['n']}"


def tables(runs: Sequence[list[dict[str, Any]]], variants: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """Markdown and JSON: mean AUC per variant; Δ vs ``before`` and vs AverageMIL (paired; pooled
    over runs with a cluster bootstrap when there are several)."""
    from gigassl.evaluation.paired import paired_differences, pooled_paired_differences

    budgets = list(dict.fromkeys(r["budget"] for r in runs[0]))

    def compare(reference: str) -> dict[tuple[str, str], dict[str, Any]]:
        if len(runs) == 1:
            entries = paired_differences(runs[0], reference, metrics=("auc",))
        else:
            entries = pooled_paired_differences(runs, reference, metrics=("auc",))
        return {(e["method"], e["budget"]): e["auc"] for e in entries}

    vs_before, vs_average = compare("before"), compare("average")
    means = {
        (m, b): float(np.mean([r["auc"] for rows in runs for r in rows if r["method"] == m and r["budget"] == b]))
        for m in ("average", *variants)
        for b in budgets
    }
    seconds = {
        m: float(np.mean([sum(r["seconds"] for r in rows if r["method"] == m) for rows in runs])) for m in ("average", *variants)
    }
    head = "| variant | " + " | ".join(budgets) + " |\n|---|" + "---|" * len(budgets)
    interval = "t interval over the splits" if len(runs) == 1 else f"cluster bootstrap over {len(runs)} seeds and their splits"
    lines = [
        f"Mean macro ROC-AUC over the splits{' and seeds' if len(runs) > 1 else ''} each method was fitted on "
        "(the first N of the benchmark's), and the wall seconds of all its fits (a shared machine):",
        "",
        "| variant | " + " | ".join(budgets) + " | splits | seconds |\n|---|" + "---|" * (len(budgets) + 2),
    ]
    for m in ("average", *variants):
        n = len({r["split"] for r in runs[0] if r["method"] == m})
        lines.append(f"| {m} | " + " | ".join(f"{means[(m, b)]:.3f}" for b in budgets) + f" | {n} | {seconds[m]:.0f} |")
    for title, table, skip in (("− before", vs_before, "before"), ("− AverageMIL", vs_average, "average")):
        lines += ["", f"Δ macro ROC-AUC in points, variant {title}: mean [95 % {interval}], splits ahead", "", head]
        for m in (v for v in variants if v != skip):
            lines.append(f"| {m} | " + " | ".join(_cell(table[(m, b)]) for b in budgets) + " |")
    record = dict(
        budgets=budgets,
        mean_auc={f"{m}|{b}": v for (m, b), v in means.items()},
        seconds_per_seed=seconds,
        vs_before={f"{m}|{b}": v for (m, b), v in vs_before.items()},
        vs_average={f"{m}|{b}": v for (m, b), v in vs_average.items()},
        variants={v: {**BEFORE, **VARIANTS[v]} for v in variants},
    )
    return "\n".join(lines), record


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", required=True, type=parse_run, help="SEED=FEATURES_FOLDER (repeatable)")
    parser.add_argument("--labels", type=Path, required=True, help="labels CSV of the benchmark (OUT/labels.csv)")
    parser.add_argument("--out", type=Path, default=Path("bench_out/baseline_sweep"), help="output folder (not in git)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--budgets", default="100%,25%,8/class,4/class", help="the benchmark's budgets")
    parser.add_argument("--n-splits", type=int, default=10, help="the benchmark's splits")
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument(
        "--first-splits",
        type=int,
        default=None,
        help="fit the methods run now on the first N of the splits only (same splits and subsets; the pairing "
        "uses the splits both methods have)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if "before" not in variants:
        variants.insert(0, "before")
    runs = [sweep_seed(seed, features, args, variants) for seed, features in args.run]
    text, record = tables(runs, variants)
    record["seeds"] = [seed for seed, _ in args.run]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.md").write_text(text + "\n")
    (args.out / "sweep.json").write_text(json.dumps(record, indent=1))
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
