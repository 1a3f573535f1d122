"""Per-slide costs from 1,000 to 12,000 slides (issue 26): does anything grow with the cohort?

For each cohort size N (with its bank A × K) a synthetic feature folder is written
(:mod:`scale_cohort`: a log-normal spread of tiles per slide, real coords layout), measured, and
deleted (``--keep`` keeps it). Measured for each N:

- ``extract`` restart: listing + resume scan over N finished outputs, as before this issue
  (every file read whole), the first restart with a manifest (reads whole and records), and the
  next ones (one ``stat`` per file);
- ``train`` start-up to the first step, in a fresh process: with the NaN/inf scan of every bank
  (first run on a folder), and with the manifest recording them (later runs); peak memory
  (VmHWM) and open file descriptors at the first step; then training throughput (views/s);
- the data path alone (views + collate, batches of ``--batch`` slides): views/s with 0, 1, 2
  DataLoader workers, warm (page cache) and cold (files evicted with ``posix_fadvise``);
- ``embed`` slides/s and ``evaluate`` seconds.

Then a table: each cost per slide at every N, and the growth exponent b of the total (cost ∝ N^b;
b = 1 is a flat per-slide cost) between the smallest and the largest N.

    python benchmarks/bench_scale.py --sizes 20:4:64,50:4:64 --train-epochs 1       # check, ~2 min
    python benchmarks/bench_scale.py --sizes 1000:50:256,4000:25:256,12000:8:256   # the issue's run
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_cohort import CohortSpec, evict, folder_bytes, write_cohort

PROBE = "--_train-probe"


def parse_sizes(text: str) -> list[CohortSpec]:
    """``"1000:50:256,4000:25:256"`` → cohort specs (N:A:K)."""
    specs = []
    for item in text.split(","):
        n, a, k = (int(v) for v in item.split(":"))
        specs.append(CohortSpec(n, a, k))
    return specs


def timed(function, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return time.perf_counter() - start, value


def restart_scan(features: Path, use_manifest: bool) -> float:
    """Seconds to list the slides and decide every finished output is complete (as extract's restart)."""
    from extract.features.manifest import Manifest, check_existing
    from extract.features.slide_file import SlideFeatures, why_incomplete

    start = time.perf_counter()
    names = sorted(p for p in features.iterdir() if p.suffix == ".h5")  # the listing (of outputs here)
    manifest = Manifest(features)
    for path in names:
        if use_manifest:
            reason, _ = check_existing(path, manifest, require_plain=True, require_bank=True)
        else:  # before issue 26: read whole, then open again for the settings
            reason = why_incomplete(path, require_plain=True, require_bank=True, verify=True)
            with SlideFeatures(path) as slide:
                slide.settings  # noqa: B018
        assert reason is None, reason
    return time.perf_counter() - start


def data_path(features: Path, batch: int, workers: int, n_batches: int, cold: bool) -> float:
    """Views/s of the training data path alone (two views per slide)."""
    import torch

    from gigassl.training.data import EpochBatchSampler, SlideViewDataset, collate_slide_views, scan_features_folder

    cohort = scan_features_folder(features, 5, check_finite=False)
    dataset = SlideViewDataset(cohort, 5)
    sampler = EpochBatchSampler(len(cohort.slides), min(batch, len(cohort.slides)))
    sampler.set_epoch(1, 1 + math.ceil(n_batches / sampler.steps_per_epoch))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_slide_views,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
    )
    if cold:
        evict(features)
    batches = iter(loader)
    next(batches)  # workers started, first batch in
    start, views = time.perf_counter(), 0
    for _, item in zip(range(n_batches), batches):
        views += 2 * item.n_slides
    rate = views / (time.perf_counter() - start)
    del batches
    dataset.close()
    return rate


def train_probe(features: Path, out: Path, epochs: int, batch: int, workers: int, check_finite: bool) -> None:
    """(In a fresh process.) Train, timing the start-up to the first step and every step after it."""
    import gigassl.training.loop as loop
    from gigassl.config import TrainConfig
    from gigassl.train import run_training

    started = time.perf_counter()
    steps: list[float] = []
    first: dict[str, float] = {}
    original = loop._step

    def step(run, views):  # type: ignore[no-untyped-def]
        if not steps:
            status = Path("/proc/self/status").read_text().splitlines()
            first["peak_mb"] = int(next(line.split()[1] for line in status if line.startswith("VmHWM"))) / 1024
            first["open_fds"] = len(os.listdir("/proc/self/fd"))
            first["startup_s"] = time.perf_counter() - started
        steps.append(time.perf_counter())
        return original(run, views)

    loop._step = step
    config = TrainConfig(
        features=features,
        out=out,
        batch_size=batch,
        epochs=epochs,
        warmup_epochs=1,
        num_workers=workers,
        device="cpu",
        checkpoint_every=10**6,
        check_finite=check_finite,
        overwrite=True,
    )
    run_training(config)
    views = 2 * config.batch_size * (len(steps) - 1)
    first["views_per_s"] = views / (steps[-1] - steps[0]) if len(steps) > 1 else float("nan")
    print(json.dumps(first))


def run_probe(features: Path, out: Path, epochs: int, batch: int, workers: int, check_finite: bool) -> dict[str, float]:
    command = [
        sys.executable,
        __file__,
        PROBE,
        str(features),
        str(out),
        str(epochs),
        str(batch),
        str(workers),
        str(int(check_finite)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def embed_and_evaluate(features: Path, checkpoint: Path, out: Path) -> tuple[float, float]:
    """(embed slides/s, evaluate seconds)."""
    from gigassl.config import EmbedConfig, EvaluateConfig
    from gigassl.embed import run_embedding
    from gigassl.evaluate import run_evaluation

    n = sum(1 for p in features.iterdir() if p.suffix == ".h5")
    seconds, _ = timed(run_embedding, EmbedConfig(model=checkpoint, features=features, out=out / "embeddings.h5", device="cpu"))
    evaluate_s, _ = timed(
        run_evaluation, EvaluateConfig(embeddings=out / "embeddings.h5", labels=features / "labels.csv", out=out / "evaluation")
    )
    return n / seconds, evaluate_s


def measure(spec: CohortSpec, root: Path, args: argparse.Namespace) -> dict[str, float]:
    features, out = root / f"n{spec.n_slides}" / "features", root / f"n{spec.n_slides}" / "out"
    row: dict[str, float] = {"n": spec.n_slides, "A": spec.n_augmentations, "K": spec.bank_size}
    row["write_s"], _ = timed(write_cohort, features, spec, args.write_workers)
    row["bytes"] = folder_bytes(features)
    print(f"N = {spec.n_slides}: written in {row['write_s']:.0f} s, {row['bytes'] / 1e9:.2f} GB", flush=True)
    evict(features)
    row["restart_full_cold_s"] = restart_scan(features, use_manifest=False)
    row["restart_full_warm_s"] = restart_scan(features, use_manifest=False)
    row["restart_first_manifest_s"] = restart_scan(features, use_manifest=True)
    evict(features)
    row["restart_manifest_cold_s"] = restart_scan(features, use_manifest=True)
    (features / ".manifest.jsonl").unlink()  # train's first run starts without one
    for workers in args.workers:
        for cold in (False, True):
            key = f"data_{'cold' if cold else 'warm'}_w{workers}_views_per_s"
            row[key] = data_path(features, args.batch, workers, args.data_batches, cold)
    evict(features)
    first = run_probe(features, out, 1, args.batch, args.train_workers, True)
    row.update({f"train_scan_{k}": v for k, v in first.items()})
    evict(features)
    later = run_probe(features, out, args.train_epochs, args.batch, args.train_workers, True)
    row.update({f"train_{k}": v for k, v in later.items()})
    row["embed_slides_per_s"], row["evaluate_s"] = embed_and_evaluate(features, out / "checkpoint.pt", out)
    print(json.dumps(row), flush=True)
    if not args.keep:
        shutil.rmtree(root / f"n{spec.n_slides}")
    return row


# (key, what, unit, kind): "total" costs are divided by N for the per-slide column; "rate" is per
# second; "absolute" is shown as measured (b is still that of the value).
METRICS = [
    ("bytes", "disk", "kB", "total"),
    ("restart_full_cold_s", "extract restart, read all (cold)", "ms", "total"),
    ("restart_full_warm_s", "extract restart, read all (warm)", "ms", "total"),
    ("restart_first_manifest_s", "extract restart, first with manifest", "ms", "total"),
    ("restart_manifest_cold_s", "extract restart, manifest (cold)", "ms", "total"),
    ("train_scan_startup_s", "train start-up, NaN scan of all banks", "ms", "total"),
    ("train_startup_s", "train start-up, banks recorded finite", "ms", "total"),
    ("train_peak_mb", "train peak memory to first step (whole)", "MB", "absolute"),
    ("train_open_fds", "train open fds at first step (whole)", "fds", "absolute"),
    ("train_views_per_s", "training throughput", "views/s", "rate"),
    ("embed_slides_per_s", "embed", "slides/s", "rate"),
    ("evaluate_s", "evaluate", "ms", "total"),
]


def table(rows: list[dict[str, float]], workers: list[int]) -> str:
    metrics = list(METRICS) + [
        (f"data_{t}_w{w}_views_per_s", f"data path, {w} workers, {t}", "views/s", "rate")
        for w in workers
        for t in ("warm", "cold")
    ]
    scale = {"kB": 1e-3, "MB": 1.0, "ms": 1e3, "fds": 1.0, "views/s": 1.0, "slides/s": 1.0}
    head = f"{'per slide (rates as measured)':<44}{'unit':>9}" + "".join(f"{'N=' + str(int(r['n'])):>12}" for r in rows)
    lines = [
        head + f"{'b':>7}{'last/first':>11}",
        "(b: total ∝ N^b, 1 = flat per slide; last/first: per-slide cost at the largest N over the smallest, target ≤ 1.5)",
    ]
    for key, what, unit, kind in metrics:
        values = [r.get(key, float("nan")) for r in rows]
        shown = [v * scale[unit] for v in values]
        if kind == "total":
            shown = [v / r["n"] for v, r in zip(shown, rows)]
        cells = "".join(f"{v:>12.3g}" for v in shown)
        n0, n1 = rows[0]["n"], rows[-1]["n"]
        totals = [r["n"] / v if kind == "rate" else v for v, r in zip(values, rows)]
        b = (
            math.log(totals[-1] / totals[0]) / math.log(n1 / n0)
            if len(rows) > 1 and totals[0] > 0 and totals[-1] > 0
            else float("nan")
        )
        ratio = (shown[0] / shown[-1]) if kind == "rate" else (shown[-1] / shown[0])
        lines.append(f"{what:<44}{unit:>9}{cells}{b:>7.2f}{ratio:>11.2f}")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == PROBE:
        features, out, epochs, batch, workers, check = sys.argv[2:8]
        logging.basicConfig(level=logging.WARNING)
        train_probe(Path(features), Path(out), int(epochs), int(batch), int(workers), bool(int(check)))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("1000:50:256,4000:25:256,12000:8:256"), help="N:A:K,…")
    parser.add_argument("--root", type=Path, default=None, help="where cohorts are written (default: a temporary folder)")
    parser.add_argument("--batch", type=int, default=256, help="slides per step (data path and training)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers of the data-path runs")
    parser.add_argument("--data-batches", type=int, default=20, help="batches timed per data-path run")
    parser.add_argument("--train-epochs", type=int, default=2, help="epochs of the timed training run")
    parser.add_argument("--train-workers", type=int, default=2, help="DataLoader workers of training")
    parser.add_argument("--write-workers", type=int, default=None, help="processes writing the cohort (default: all cores)")
    parser.add_argument("--keep", action="store_true", help="keep each cohort (default: deleted once measured)")
    parser.add_argument("--report", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = args.root or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    rows = [measure(spec, root, args) for spec in args.sizes]
    if args.report is not None:
        args.report.write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows, args.workers))
    if args.root is None and not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
