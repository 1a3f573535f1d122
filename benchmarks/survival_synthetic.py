"""The synthetic survival check of docs/survival.md: fitted models against the true-risk ceiling.

Writes the synthetic cohort of :mod:`gigassl.synthetic.survival` (hazard ∝ exp(3 · tumour
fraction), independent exponential censoring, two slides per patient), a stand-in embeddings file
(each slide's L2-normalised mean tile feature: no Giga-SSL training, so ``gigassl`` and
``average`` see nearly the same information), runs ``gigassl evaluate --task survival`` and then
scores the *true* risk on the same test parts: the C-index no model can beat beyond noise.

    python benchmarks/survival_synthetic.py --out bench_out/survival --patients 100 --splits 10
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from gigassl.config import EvaluateConfig
from gigassl.evaluate import run_evaluation
from gigassl.evaluation.survival_metrics import harrell_c, uno_c, uno_tau
from gigassl.evaluation.target_protocol import target_splits
from gigassl.evaluation.targets import read_survival_targets
from gigassl.synthetic.survival import write_mean_embeddings, write_survival_cohort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out/survival"))
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--splits", type=int, default=10)
    parser.add_argument("--baselines", default="average")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    features = args.out / "features"
    if not (features / "labels.csv").is_file():
        write_survival_cohort(features, n_patients=args.patients, n_tiles=32, seed=0)
        write_mean_embeddings(features, args.out / "embeddings.h5")
    config = EvaluateConfig(
        embeddings=args.out / "embeddings.h5",
        labels=features / "labels.csv",
        features=features,
        out=args.out / "evaluation",
        task="survival",
        baselines=tuple(args.baselines.split(",")),
        n_splits=args.splits,
        budgets=("100%", "25%"),
    )
    result = run_evaluation(config)
    targets = read_survival_targets(config.labels, "slide", "time", "event")
    truth = np.loadtxt(features / "labels.csv", delimiter=",", skiprows=1, usecols=5)
    ceiling: dict[str, list[float]] = {"harrell_c": [], "uno_c": []}
    assert targets.time is not None and targets.event is not None
    for train, test in target_splits(targets, config):
        time, event = targets.time, targets.event
        ceiling["harrell_c"].append(harrell_c(time[test], event[test], truth[test]))
        ceiling["uno_c"].append(uno_c(time[train], event[train], time[test], event[test], truth[test], uno_tau(time[train])))
    print(result.format())
    for metric, values in ceiling.items():
        print(f"true risk (ceiling) {metric}: {np.mean(values):.3f} ± {np.std(values):.3f}")
    summary = dict(
        n_slides=len(targets.slide_ids),
        n_events=int(targets.event.sum()),
        ceiling={k: [float(np.mean(v)), float(np.std(v))] for k, v in ceiling.items()},
        summary=result.summary,
    )
    (args.out / "ceiling.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
