"""Generic sparse head for non-ResNet tile features: D-channel first convolution vs a per-site
linear D → 256 first. Same synthetic cohort (wide features, weak planted signal), same training
settings and seed; reports training monitors, the time per step, and the logistic-regression AUC
of the slide embeddings (repeated stratified 5-fold CV) and of AverageMIL as a reference.

    PYTHONPATH=src python benchmarks/compare_generic_heads.py [--width 768] [--epochs 40]
"""

from __future__ import annotations

import argparse
import csv
import functools
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import RepeatedStratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import gigassl.train as train_module
from extract.encoders.tile_encoder import EncoderInfo
from extract.features.plain import read_plain_features
from gigassl.config import EmbedConfig, TrainConfig
from gigassl.embed import read_embeddings, run_embedding
from gigassl.model import HeadSpec
from gigassl.synthetic.cohort import LABELS_FILE, write_synthetic_cohort


def auc(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean ± s.d. ROC-AUC of a scaled logistic regression (C = 10, balanced) over 5 × 5-fold CV."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=10, class_weight="balanced", max_iter=1000))
    scores = cross_val_score(model, x, y, cv=RepeatedStratifiedKFold(n_splits=5, n_repeats=5, random_state=0), scoring="roc_auc")
    return float(scores.mean()), float(scores.std())


def run_head(name: str, projection: int, features: Path, out: Path, args: argparse.Namespace, y: dict[str, int]) -> dict:
    original = HeadSpec.generic
    HeadSpec.generic = functools.partial(original, input_projection_dim=projection)  # type: ignore[method-assign]
    try:
        config = TrainConfig(
            features=features,
            out=out / name,
            epochs=args.epochs,
            batch_size=16,
            lr=0.03,
            warmup_epochs=2,
            num_workers=0,
            device="cpu",
            monitor_slides=32,
            checkpoint_every=args.epochs,
        )
        start = time.perf_counter()
        result = train_module.run_training(config)
        seconds = time.perf_counter() - start
    finally:
        HeadSpec.generic = original  # type: ignore[method-assign]
    run_embedding(EmbedConfig(model=result.checkpoint, features=features, out=out / f"{name}.h5", n_views=20, device="cpu"))
    embeddings = read_embeddings(out / f"{name}.h5")
    labels = np.array([y[s] for s in embeddings.slide_ids])
    mean, sd = auc(embeddings.embeddings, labels)
    return dict(
        head=name,
        auc=mean,
        auc_sd=sd,
        seconds_per_step=seconds / result.global_step,
        rankme=result.final["rankme"],
        positive_pair_accuracy=result.final["positive_pair_accuracy"],
        monitor_loss=result.final["loss"],
        train_loss=result.final["train_loss"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--slides", type=int, default=64)
    parser.add_argument("--class-strength", type=float, default=0.15)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        features, out = Path(tmp) / "features", Path(tmp) / "runs"
        encoder = EncoderInfo("synthetic-fm.pt2", "f" * 64, "export", "synthetic-fm", args.width, "torch.export")
        paths = write_synthetic_cohort(
            features,
            n_slides=args.slides,
            n_tiles=48,
            n_augmentations=4,
            bank_size=24,
            seed=3,
            class_strength=args.class_strength,
            encoder=encoder,
        )
        with open(features / LABELS_FILE) as handle:
            y = {row["slide"]: int(row["label"]) for row in csv.DictReader(handle)}
        (features / LABELS_FILE).unlink()
        means = np.stack([read_plain_features(p).features.mean(0) for p in paths])
        average = auc(means, np.array([y[p.stem] for p in paths]))
        rows = [
            run_head(f"{args.width}-channel conv", 0, features, out, args, y),
            run_head(f"linear {args.width}→256 first", 256, features, out, args, y),
        ]
    print(
        f"cohort: {args.slides} synthetic slides, D = {args.width}, class strength {args.class_strength}; "
        f"{args.epochs} epochs, batch 16, T = 5, seed 0; AverageMIL AUC {average[0]:.3f} ± {average[1]:.3f}"
    )
    print("| head | AUC (LR, 5×5-fold) | RankMe | monitor pos.-pair acc. | monitor loss | s/step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['head']} | {r['auc']:.3f} ± {r['auc_sd']:.3f} | {r['rankme']:.1f} | {r['positive_pair_accuracy']:.3f} "
            f"| {r['monitor_loss']:.3f} | {r['seconds_per_step']:.3f} |"
        )


if __name__ == "__main__":
    main()
