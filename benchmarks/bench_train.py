"""Training throughput of `gigassl train` on a synthetic cohort, and the share spent loading data.

Runs the real training job (``run_training``) for a few epochs on a synthetic cohort written to
a temporary folder and reads its own per-epoch timings (``epoch_time_s``, ``data_share`` in
monitors.json); the first epoch (spconv's first calls) is reported apart. Also times the data
pipeline alone (views + collate, one process). Defaults: batch 256, T = 5, the training job's
default number of DataLoader workers (``--workers 0`` reads in the training process).

    python benchmarks/bench_train.py                       # batch 256, T = 5, 5 epochs of 2 steps
    python benchmarks/bench_train.py --slides 32 --batch 16 --epochs 2   # quick check
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from gigassl.config import TrainConfig
from gigassl.synthetic.cohort import write_synthetic_cohort
from gigassl.train import run_training
from gigassl.training.data import EpochBatchSampler, SlideViewDataset, collate_slide_views, scan_features_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slides", type=int, default=512, help="slides in the synthetic cohort")
    parser.add_argument("--batch", type=int, default=256, help="slides per step")
    parser.add_argument("--tiles-per-view", type=int, default=5, help="T")
    parser.add_argument("--epochs", type=int, default=5, help="epochs (the first one is warm-up)")
    parser.add_argument("--tiles", type=int, default=400, help="plain tiles per slide")
    parser.add_argument("--augmentations", type=int, default=10, help="A of the synthetic bank")
    parser.add_argument("--bank-size", type=int, default=256, help="K of the synthetic bank")
    parser.add_argument("--workers", type=int, default=TrainConfig.num_workers, help="DataLoader workers")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench_train_") as temp:
        features = Path(temp) / "features"
        start = time.perf_counter()
        write_synthetic_cohort(features, args.slides, args.tiles, args.augmentations, args.bank_size, seed=0)
        print(
            f"synthetic cohort: {args.slides} slides, A={args.augmentations}, K={args.bank_size} "
            f"({time.perf_counter() - start:.1f} s to write)"
        )

        cohort = scan_features_folder(features, args.tiles_per_view, check_finite=False)
        dataset = SlideViewDataset(cohort, args.tiles_per_view)
        sampler = EpochBatchSampler(len(cohort.slides), min(args.batch, args.slides))
        sampler.set_epoch(1)
        start = time.perf_counter()
        n_loaded = 0
        for keys in sampler:
            collate_slide_views([dataset[key] for key in keys])
            n_loaded += len(keys)
        load_rate = n_loaded / (time.perf_counter() - start)
        dataset.close()

        config = TrainConfig(
            features=features,
            out=Path(temp) / "out",
            batch_size=args.batch,
            epochs=args.epochs,
            n_tiles_per_view=args.tiles_per_view,
            warmup_epochs=1,
            monitor_slides=8,
            num_workers=args.workers,
            device=args.device,
            checkpoint_every=10**6,
            check_finite=False,
        )
        result = run_training(config)
        rows = json.loads(result.monitors_json.read_text())[1:]
        steady = rows[1:] or rows
        slides_per_epoch = (args.slides // min(args.batch, args.slides)) * min(args.batch, args.slides)
        epoch_time = sum(row["epoch_time_s"] for row in steady) / len(steady)
        data_share = sum(row["data_share"] for row in steady) / len(steady)
        step_time = epoch_time / (slides_per_epoch / min(args.batch, args.slides))

    print(
        f"threads {args.threads}, workers {args.workers}, device {args.device}, "
        f"batch {min(args.batch, args.slides)} slides, T = {args.tiles_per_view}"
    )
    print(f"{'measure':<44}{'value':>12}")
    print(f"{'data pipeline alone (slides/s, 2 views each)':<44}{load_rate:>12.1f}")
    print(f"{'first epoch (s, includes warm-up)':<44}{rows[0]['epoch_time_s']:>12.2f}")
    print(f"{'training step (s)':<44}{step_time:>12.2f}")
    print(f"{'training throughput (slides/s)':<44}{slides_per_epoch / epoch_time:>12.1f}")
    print(f"{'share of the step waiting for data (%)':<44}{100 * data_share:>12.1f}   (target ≤ 15 %)")


if __name__ == "__main__":
    main()
