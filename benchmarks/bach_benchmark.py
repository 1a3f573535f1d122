"""Real-data benchmark: Giga-SSL against AverageMIL and attention-MIL on a folder of BACH-like images.

Each image is one small slide; its label is the letters before the digits of its file name
(BACH: ``n001.jpg`` normal, ``b001.jpg`` benign, ``is001.jpg`` in situ, ``iv001.jpg`` invasive).
One command runs the whole pipeline through the package's own jobs:

1. grids     — tissue tile grid of every image (``extract.moco.data.index_slides``), to size the bank;
2. encoder   — ``random``, ``moco`` (``gigassl pretrain-tiles --profile small-cpu`` on the same
               folder) or a ResNet18 checkpoint PATH;
3. extract   — plain features + shared-augmentation bank (``extract.run.run_extraction``);
4. train     — Giga-SSL (``gigassl.train.run_training``);
5. embed     — slide embeddings (``gigassl.embed.run_embedding``);
6. evaluate  — Giga-SSL + logistic regression, AverageMIL + logistic regression, attention-MIL
               (top-k fine-tuning with ``--baselines average,abmil,topk``): 10 seeded splits,
               100 % and 25 % of the training labels, 8 and 4 slides per class, macro ROC-AUC and
               balanced accuracy (``gigassl.evaluate.run_evaluation``).

Every stage writes into ``OUT/<stage>/<key>``, where the key hashes the settings that change its
output (and the upstream stage's key, and the image list: names and sizes), with ``stage.json``
written last; a rerun with the same settings reuses the stage, a changed setting redoes only the
stages below it. ``OUT/results.json`` and ``OUT/results.md`` hold the tables, the settings, the
seconds per stage and the commit.

The bank size A and the training epochs are fitted to ``--budget-minutes`` from the number of
tissue tiles found, at throughputs assumed for a quiet 2-core CPU (``ASSUMED``); K follows the
typical tile count of an image. Nothing is tuned to the particular images: the folder is an
argument.

    python benchmarks/bach_benchmark.py --images ../shared/data/bach-dev --out bench_out/bach
    python benchmarks/bach_benchmark.py --images ../shared/data/bach-dev --out bench_out/bach --encoder moco
    python benchmarks/bach_benchmark.py --images ../shared/data/bach-dev --out bench_out/bach --plan-only

BACH is CC BY-NC-ND: keep ``--out`` under ``bench_out/`` (ignored by git); never commit it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LABEL_PATTERN = re.compile(r"([A-Za-z]+)(\d+)")
STAGE_FILE = "stage.json"
METHOD_NAMES = {
    "gigassl": "Giga-SSL + LR",
    "average": "AverageMIL + LR",
    "abmil": "attention-MIL",
    "topk": "top-k fine-tuning",
}

# Wall times assumed for a quiet 2-core CPU (bf16 autocast, channels_last), from the BACH run
# with the MoCo encoder at commit d030e52 (A = 5, K = 32, 400 epochs): 39,000 plain and bank
# tiles extracted in 468 s (83 tiles/s, augmentation included), 0.76 s per epoch of 3 steps of
# 64 slides at T = 5 plus the monitors of 32 slides (0.0034 s per slide); each taken 1.5× slower
# so that a plan stays inside its budget on a busier machine. Per plain tile, per bank tile, per
# slide of a training step, per monitored slide; fixed reserves for grids, imports and
# embedding, and for the evaluation (attention-MIL dominates).
ASSUMED = dict(
    plain_tiles_per_s=55.0,
    bank_tiles_per_s=55.0,
    train_s_per_slide=0.005,
    monitor_s_per_slide=0.005,
    fixed_s=120.0,
    evaluate_s=240.0,
)
BANK_SHARE = 0.5  # of the time left after the fixed parts; the rest goes to training
MONITOR_SLIDES = 32

# ---------------------------------------------------------------------------------------------
# The image folder


def label_of(path: Path) -> str:
    """The class of an image: the letters before the digits of its stem, lower-cased (``is012`` → ``is``)."""
    match = LABEL_PATTERN.fullmatch(path.stem)
    if match is None:
        raise ValueError(
            f"{path}: the file name must be letters then digits (n001.jpg, is012.jpg), "
            "the letters naming the class; rename it or move it out of the folder"
        )
    return match.group(1).lower()


def list_images(folder: Path) -> list[Path]:
    """The folder's image files (the extensions extraction reads), sorted; every one must be labelled."""
    from extract.batch.slide_list import list_slides

    images, others = list_slides(Path(folder))
    if not images:
        raise FileNotFoundError(f"--images {folder}: no image files found")
    if others:
        logging.getLogger(__name__).info("ignoring %d files that are not images in %s", len(others), folder)
    for path in images:
        label_of(path)
    return images


def limit_per_class(images: Sequence[Path], n: int, folder: Path) -> Path:
    """``folder`` holding symbolic links to the first ``n`` images of each class; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    chosen: dict[str, list[Path]] = {}
    for path in sorted(images):
        members = chosen.setdefault(label_of(path), [])
        if len(members) < n:
            members.append(path)
    wanted = {p.name for members in chosen.values() for p in members}
    for stale in folder.iterdir():
        if stale.name not in wanted:
            stale.unlink()
    for members in chosen.values():
        for path in members:
            link = folder / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
    return folder


def write_labels(images: Sequence[Path], path: Path) -> Path:
    """Labels CSV ``slide,label`` (slide = file stem, the feature files' names)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("slide,label\n" + "".join(f"{p.stem},{label_of(p)}\n" for p in images))
    return path


def folder_fingerprint(images: Sequence[Path]) -> str:
    """Hash of the images' names and sizes: a changed folder gives new stage keys."""
    lines = "".join(f"{p.name}:{p.stat().st_size}\n" for p in sorted(images))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Fitting the bank and the training to the time budget


@dataclass(frozen=True)
class Plan:
    """Bank size A × K and training epochs, with the seconds each stage is expected to take."""

    n_augmentations: int
    n_tiles_per_augmentation: int
    epochs: int
    estimated_s: dict[str, float]


def plan_budget(
    tiles_per_image: Sequence[int],
    budget_minutes: float,
    batch_size: int = 64,
    n_augmentations: Optional[int] = None,
    n_tiles_per_augmentation: Optional[int] = None,
    epochs: Optional[int] = None,
    rates: Optional[dict[str, float]] = None,
) -> Plan:
    """A, K and epochs that fit ``budget_minutes`` (values given explicitly are kept).

    K is the power of two nearest the median tile count (16…64): an augmentation then covers
    about the whole image, and a larger K would only repeat tiles (sampled with replacement).
    A takes ``BANK_SHARE`` of the time left after plain features and the fixed reserves (4…50),
    training the rest (20…1000 epochs). Throughputs: ``ASSUMED``, updated by ``rates``.
    """
    rates = dict(ASSUMED, **(rates or {}))
    counts = sorted(int(n) for n in tiles_per_image)
    if not counts:
        raise ValueError("no image with tissue tiles: nothing to plan")
    n_images, n_tiles = len(counts), sum(counts)
    median = counts[len(counts) // 2]
    k = n_tiles_per_augmentation or int(min(64, max(16, 2 ** round(math.log2(max(median, 1))))))
    # tiles encoded per augmentation: the distinct ones (duplicates drawn with replacement are copied)
    distinct = sum(min(n, k) for n in counts)
    plain_s = n_tiles / rates["plain_tiles_per_s"]
    left = budget_minutes * 60 - plain_s - rates["fixed_s"] - rates["evaluate_s"]
    if left <= 0 and (n_augmentations is None or epochs is None):
        raise ValueError(
            f"--budget-minutes {budget_minutes}: too short for {n_images} images ({n_tiles} tiles); "
            "raise it, or set --n-augmentations and --epochs"
        )
    per_augmentation_s = distinct / rates["bank_tiles_per_s"]
    a = n_augmentations or int(min(50, max(4, BANK_SHARE * left // per_augmentation_s)))
    bank_s = a * per_augmentation_s
    batch = min(batch_size, n_images)
    per_epoch_s = (n_images // batch) * batch * rates["train_s_per_slide"] + min(MONITOR_SLIDES, n_images) * rates[
        "monitor_s_per_slide"
    ]
    e = epochs or int(min(1000, max(20, (left - bank_s) // per_epoch_s)))
    estimated = dict(plain=plain_s, bank=bank_s, train=e * per_epoch_s, fixed=rates["fixed_s"], evaluate=rates["evaluate_s"])
    return Plan(a, k, e, {name: round(s, 1) for name, s in estimated.items()})


# ---------------------------------------------------------------------------------------------
# Stage cache


def settings_key(settings: dict[str, Any]) -> str:
    """12 hex digits naming a stage's settings (order-independent)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def finished_stage(folder: Path, settings: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The record of a finished stage in ``folder`` with these settings, else None."""
    record_path = folder / STAGE_FILE
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    return record if record.get("settings") == json.loads(json.dumps(settings, default=str)) else None


def run_stage(
    name: str,
    out: Path,
    settings: dict[str, Any],
    work: Callable[[Path], dict[str, Any]],
    times: dict[str, dict[str, Any]],
    valid: Optional[Callable[[Path], bool]] = None,
) -> tuple[Path, dict[str, Any]]:
    """Run ``work(folder)`` in ``OUT/name/<key>`` unless it finished there; (folder, its record).

    ``work`` returns JSON-able facts kept in the record; seconds are recorded, and a reused
    stage reports the seconds it took when it ran. ``valid(folder)`` False makes a finished
    stage run again (outputs this version of the package no longer reads)."""
    folder = out / name / settings_key(settings)
    record = finished_stage(folder, settings)
    if record is not None and valid is not None and not valid(folder):
        logging.getLogger(__name__).warning("── %s: the outputs in %s are no longer readable; redoing the stage", name, folder)
        record = None
    if record is not None:
        logging.getLogger(__name__).info("── %s: reusing %s", name, folder)
        times[name] = dict(seconds=record["seconds"], cpu_seconds=record.get("cpu_seconds"), cached=True)
        return folder, record
    logging.getLogger(__name__).info("── %s → %s", name, folder)
    folder.mkdir(parents=True, exist_ok=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    facts = work(folder)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    # CPU seconds as well: on a machine shared with other jobs they tell what a quiet one would take
    record = dict(
        settings=json.loads(json.dumps(settings, default=str)),
        seconds=round(seconds, 1),
        cpu_seconds=round(cpu_seconds, 1),
        facts=facts,
    )
    temp = folder / (STAGE_FILE + ".tmp")
    temp.write_text(json.dumps(record, indent=1, default=str))
    temp.replace(folder / STAGE_FILE)
    times[name] = dict(seconds=record["seconds"], cpu_seconds=record["cpu_seconds"], cached=False)
    return folder, record


def _plain(config: Any, drop: Sequence[str] = ()) -> dict[str, Any]:
    """A settings dataclass as JSON-able data, without the fields that do not change outputs."""
    from extract.settings import settings_dict

    return settings_dict(config, drop=drop)


# Fields that only say where things are, or how fast they run, not what is computed.
NOT_KEYED = (
    "slides",
    "out",
    "features",
    "model",
    "embeddings",
    "labels",
    "num_workers",
    "device",
    "resume",
    "init",
    "keep_checkpoints",
    "overwrite",
    "allow_mixed_grids",
    "allow_other_encoder",
    "probe_labels",
)


# ---------------------------------------------------------------------------------------------
# Tables


def markdown_tables(summary: Sequence[dict[str, Any]]) -> str:
    """ROC-AUC and balanced accuracy, one row per method and one column per budget (mean ± s.d.)."""
    budgets = list(dict.fromkeys(r["budget"] for r in summary))
    methods = list(dict.fromkeys(r["method"] for r in summary))
    cell = {(r["method"], r["budget"]): r for r in summary}
    n_train = {b: next(r["n_train"] for r in summary if r["budget"] == b) for b in budgets}
    head = "| method | " + " | ".join(f"{b} (n={n_train[b]:.0f})" for b in budgets) + " |"
    rule = "|---|" + "---|" * len(budgets)
    blocks = []
    for metric, title in (("auc", "Macro ROC-AUC"), ("balanced_accuracy", "Balanced accuracy")):
        rows = [f"**{title}** (mean ± s.d. over splits)", "", head, rule]
        for method in methods:
            values = [cell.get((method, b)) for b in budgets]
            rows.append(
                f"| {METHOD_NAMES.get(method, method)} | "
                + " | ".join(f"{v[metric + '_mean']:.3f} ± {v[metric + '_std']:.3f}" if v else "–" for v in values)
                + " |"
            )
        blocks.append("\n".join(rows))
    if "gigassl" in methods and "average" in methods:
        delta = [cell[("gigassl", b)]["auc_mean"] - cell[("average", b)]["auc_mean"] for b in budgets]
        line = "| Δ AUC Giga-SSL − AverageMIL | " + " | ".join(f"{100 * d:+.1f} pt" for d in delta) + " |"
        blocks[0] += "\n" + line
    return "\n\n".join(blocks)


def git_commit() -> str:
    """``git describe --always --dirty`` of the checkout, or 'unknown'."""
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------
# The pipeline


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--images", type=Path, required=True, help="folder of labelled images (n001.jpg, b001.jpg, is001.jpg, iv001.jpg …)")
    add("--out", type=Path, default=REPO / "bench_out" / "bach", help="output and cache folder (keep it under bench_out/)")
    add(
        "--encoder",
        default="random",
        help="tile encoder: 'random', 'moco' (pretrain-tiles small-cpu on --images, cached) or a checkpoint PATH",
    )
    add(
        "--budget-minutes",
        type=float,
        default=60.0,
        help="time for the whole run on a 2-core CPU, MoCo excluded; sizes A and the epochs",
    )
    add("--image-mpp", type=float, default=0.42, help="µm/px of the images (BACH: 0.42)")
    add("--target-mpp", type=float, default=0.5, help="µm/px of the tiles")
    add("--tile-size-px", type=int, default=224, help="tile side in px")
    add(
        "--tissue-threshold",
        type=float,
        default=0.0,
        help="keep tiles whose tissue fraction is at least this; 0 keeps every tile: microscopy images are fields of view "
        "chosen on tissue, where the whole-slide detector drops pale tissue (use 0.5 on whole slides)",
    )
    add("--n-augmentations", type=int, default=None, help="A (default: fitted to the budget)")
    add("--n-tiles-per-augmentation", type=int, default=None, help="K (default: the median tile count's power of two, 16…64)")
    add("--epochs", type=int, default=None, help="Giga-SSL epochs (default: fitted to the budget)")
    add("--n-tiles-per-view", type=int, default=5, help="T")
    add("--batch-size", type=int, default=64, help="slides per Giga-SSL step")
    add("--temperature", type=float, default=0.05, help="NT-Xent temperature")
    add("--scale-min", type=float, default=0.5, help="slide-level scale lower bound")
    add("--scale-max", type=float, default=2.0, help="slide-level scale upper bound")
    add("--n-views", type=int, default=50, help="R: views averaged per embedding")
    add("--baselines", default="average,abmil", help="compared with Giga-SSL: average,abmil[,topk] (top-k re-reads tiles: slow)")
    add("--budgets", default="100%,25%,8/class,4/class", help="training budgets of the evaluation")
    add("--n-splits", type=int, default=10, help="seeded repeated stratified splits")
    add("--mil-epochs", type=int, default=50, help="attention-MIL epochs (gigassl evaluate --mil-epochs)")
    add("--moco-epochs", type=int, default=None, help="override the small-cpu profile's MoCo epochs (smoke runs)")
    add("--moco-tiles-per-epoch", type=int, default=None, help="override the small-cpu profile's tiles per epoch (smoke runs)")
    add("--moco-momentum", type=float, default=None, help="override the small-cpu profile's key-encoder momentum (0.99)")
    add(
        "--limit-per-class",
        type=int,
        default=None,
        help="use only the first N images of each class (smoke runs; linked into OUT)",
    )
    add("--seed", type=int, default=0, help="seed of every stage (one run; see --seeds)")
    add(
        "--seeds",
        default=None,
        help="comma-separated seeds: the whole pipeline (bank, training, embedding, splits) once per seed, "
        "then the paired differences pooled over seeds (cluster bootstrap); e.g. 0,1,2",
    )
    add(
        "--moco-per-seed",
        action="store_true",
        help="with --encoder moco: pre-train MoCo once per seed (default: once, with the first seed)",
    )
    add("--threads", type=int, default=2, help="torch CPU threads")
    add("--num-workers", type=int, default=1, help="DataLoader workers reading tiles")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--plan-only", action="store_true", help="print the fitted settings and exit")
    return parser.parse_args(argv)


def tile_encoder(
    args: argparse.Namespace,
    folder: Path,
    fingerprint: str,
    out: Path,
    times: dict[str, dict[str, Any]],
    seed: int,
    labels_csv: Path,
) -> tuple[str, str]:
    """(source for ``load_resnet18``, its sha256 or 'random'): ``--encoder`` resolved; ``moco``
    trains (or reuses) ``gigassl pretrain-tiles --profile small-cpu`` on ``folder`` with
    ``seed``; the labels only score it each epoch (``--probe-labels``), training stays label-free."""
    from extract.config import MocoConfig
    from extract.encoders.tile_encoder import file_sha256

    if args.encoder == "random":
        encoder, encoder_id = "random", "random"
    elif args.encoder == "moco":
        given = (("epochs", args.moco_epochs), ("tiles_per_epoch", args.moco_tiles_per_epoch), ("momentum", args.moco_momentum))
        overrides = {k: v for k, v in given if v is not None}
        moco = MocoConfig(
            slides=folder,
            out=Path("."),
            profile="small-cpu",
            target_mpp=args.target_mpp,
            default_mpp=args.image_mpp,
            tissue_threshold=args.tissue_threshold,
            seed=seed,
            num_workers=args.num_workers,
            device=args.device,
            probe_labels=labels_csv,
            **overrides,
        )
        moco_settings = dict(_plain(moco, NOT_KEYED), images=fingerprint)

        def pretrain(where: Path) -> dict[str, Any]:
            from extract.moco.pretrain import run_pretraining

            last = where / "last.pt"
            result = run_pretraining(dataclasses.replace(moco, out=where, resume=last if last.is_file() else None))
            return dict(epochs=result.epochs_done, n_slides=result.n_slides, final=result.monitors[-1] if result.monitors else {})

        moco_dir, _ = run_stage("moco", out, moco_settings, pretrain, times)
        encoder = str(moco_dir / "encoder.pt")
        encoder_id = file_sha256(Path(encoder))
    else:
        encoder = str(Path(args.encoder).resolve())
        if not Path(encoder).is_file():
            raise FileNotFoundError(
                f"--encoder {args.encoder}: no such checkpoint; use 'random', 'moco' or a ResNet18 checkpoint path"
            )
        encoder_id = file_sha256(Path(encoder))

    return encoder, encoder_id


def write_report(results: dict[str, Any], out: Path) -> None:
    """``OUT/results.json`` and ``OUT/results.md``; prints the tables and the seconds per stage."""
    plan, arguments = results["plan"], results["arguments"]
    tables = markdown_tables(results["summary"])
    header = (
        f"BACH-like benchmark on `{results['images']}` ({results['n_images']} images, classes "
        f"{', '.join(results['classes'])}), encoder {results['encoder']}, A={plan['n_augmentations']}, "
        f"K={plan['n_tiles_per_augmentation']}, T={arguments['n_tiles_per_view']}, {plan['epochs']} epochs, "
        f"R={arguments['n_views']}, {arguments['n_splits']} splits; commit {results['commit']}"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(header + "\n\n" + tables + "\n")
    print(f"\n{header}\n\n{tables}\n")
    print(
        "seconds per stage (wall / CPU of this process): "
        + ", ".join(
            f"{name} {t['seconds']:.0f} / {t['cpu_seconds'] or 0:.0f}{' (cached)' if t['cached'] else ''}"
            for name, t in results["stage_seconds"].items()
        )
        + f"; this run {results['total_seconds']:.0f} s wall"
    )
    print(f"written: {out / 'results.json'}, {out / 'results.md'}")


def run(args: argparse.Namespace, seed: int, moco_seed: int, report_to: Path) -> dict[str, Any]:
    """The benchmark (module docstring) with one seed; writes ``report_to/results.json|md`` and
    returns what ``results.json`` holds."""
    import torch

    from extract.config import ExtractConfig
    from extract.moco.data import index_slides
    from gigassl.config import EmbedConfig, EvaluateConfig, TrainConfig

    log = logging.getLogger(__name__)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    started = time.perf_counter()
    times: dict[str, dict[str, Any]] = {}

    images = list_images(args.images)
    folder = Path(args.images)
    if args.limit_per_class:
        folder = limit_per_class(images, args.limit_per_class, out / f"images-first{args.limit_per_class}")
        images = list_images(folder)
    labels_csv = write_labels(images, out / "labels.csv")
    fingerprint = folder_fingerprint(images)
    classes = sorted({label_of(p) for p in images})
    log.info("%d images in %s, classes %s", len(images), folder, classes)

    grid_settings = dict(
        images=fingerprint,
        image_mpp=args.image_mpp,
        target_mpp=args.target_mpp,
        tile_size_px=args.tile_size_px,
        tissue_threshold=args.tissue_threshold,
    )

    def grids(_: Path) -> dict[str, Any]:
        slides, skipped = index_slides(
            images, args.target_mpp, args.tile_size_px, args.tissue_threshold, default_mpp=args.image_mpp
        )
        counts = {s.path.stem: len(s) for s in slides}
        return dict(tiles=counts, skipped=[(str(p), r) for p, r in skipped])

    _, grid_record = run_stage("grids", out, grid_settings, grids, times)
    counts = [n for n in grid_record["facts"]["tiles"].values() if n > 0]
    plan = plan_budget(
        counts, args.budget_minutes, args.batch_size, args.n_augmentations, args.n_tiles_per_augmentation, args.epochs
    )
    log.info(
        "plan: A=%d, K=%d, %d epochs; %d images, %d tiles (median %d per image); estimated seconds %s",
        plan.n_augmentations,
        plan.n_tiles_per_augmentation,
        plan.epochs,
        len(counts),
        sum(counts),
        sorted(counts)[len(counts) // 2],
        plan.estimated_s,
    )
    if args.plan_only:
        print(json.dumps(dict(plan=dataclasses.asdict(plan), tiles=sum(counts), images=len(counts)), indent=1))
        return {}

    encoder, encoder_id = tile_encoder(args, folder, fingerprint, out, times, moco_seed, labels_csv)

    # plain features and bank
    extract = ExtractConfig(
        slides=folder,
        out=Path("."),
        encoder=encoder,
        target_mpp=args.target_mpp,
        tile_size_px=args.tile_size_px,
        tissue_threshold=args.tissue_threshold,
        default_mpp=args.image_mpp,
        n_augmentations=plan.n_augmentations,
        n_tiles_per_augmentation=plan.n_tiles_per_augmentation,
        seed=seed,
        num_workers=args.num_workers,
        device=args.device,
    )
    extract_settings = dict(
        _plain(extract, NOT_KEYED + ("encoder", "overwrite", "strict", "shard", "qc", "batch_size")),
        encoder=encoder_id,
        images=fingerprint,
    )

    def extraction(where: Path) -> dict[str, Any]:
        from extract.run import run_extraction

        summary = run_extraction(dataclasses.replace(extract, out=where))
        if summary.exit_code:
            raise RuntimeError(f"extraction failed for every image of {folder}; see {where / 'summary.json'}")
        return dict(
            done=len(summary.done) + len(summary.skipped),
            failed=[(o.slide, o.reason) for o in summary.failed],
            tiles_per_second=summary.tiles_per_second,
        )

    def readable(where: Path) -> bool:
        from extract.features.slide_file import is_complete

        files = sorted((where / "features").glob("*.h5"))
        return bool(files) and all(is_complete(f, require_plain=True, require_bank=True) for f in files)

    extract_dir, extract_record = run_stage("extract", out, extract_settings, extraction, times, valid=readable)
    features = extract_dir / "features"

    # Giga-SSL training
    train = TrainConfig(
        features=features,
        out=Path("."),
        init=None if encoder == "random" else encoder,  # layer4 of the tile encoder
        n_tiles_per_view=args.n_tiles_per_view,
        batch_size=args.batch_size,
        epochs=plan.epochs,
        warmup_epochs=min(10, max(1, plan.epochs // 10)),
        temperature=args.temperature,
        scale_min=args.scale_min,
        scale_max=args.scale_max,
        seed=seed,
        device=args.device,
        checkpoint_every=plan.epochs,
        keep_checkpoints=1,
        monitor_slides=MONITOR_SLIDES,
        overwrite=True,  # a stage is redone in its folder when it did not finish there
    )
    train_settings = dict(_plain(train, NOT_KEYED + ("checkpoint_every", "keep_checkpoints")), upstream=extract_dir.name)

    def training(where: Path) -> dict[str, Any]:
        from gigassl.train import run_training

        result = run_training(dataclasses.replace(train, out=where))
        return dict(checkpoint=str(result.checkpoint), epochs=result.epochs, steps=result.global_step, final=result.final)

    train_dir, train_record = run_stage(
        "train", out, train_settings, training, times, valid=lambda where: (where / "checkpoint.pt").is_file()
    )
    checkpoint = train_dir / Path(train_record["facts"]["checkpoint"]).name

    # embeddings
    embed = EmbedConfig(model=checkpoint, features=features, out=Path("."), n_views=args.n_views, seed=seed, device=args.device)
    embed_settings = dict(_plain(embed, NOT_KEYED), upstream=train_dir.name)

    def embedding(where: Path) -> dict[str, Any]:
        from gigassl.embed import run_embedding

        result = run_embedding(dataclasses.replace(embed, out=where / "embeddings.h5"))
        return dict(n_slides=result.n_slides, failed=result.failed)

    embed_dir, _ = run_stage(
        "embed", out, embed_settings, embedding, times, valid=lambda where: (where / "embeddings.h5").is_file()
    )

    # evaluation
    evaluate = EvaluateConfig(
        embeddings=embed_dir / "embeddings.h5",
        labels=labels_csv,
        out=Path("."),
        features=features,
        baselines=tuple(item.strip() for item in args.baselines.split(",")),
        n_splits=args.n_splits,
        budgets=tuple(item.strip() for item in args.budgets.split(",")),
        seed=seed,
        device=args.device,
        mil_epochs=args.mil_epochs,
        encoder=encoder,
    )
    evaluate_settings = dict(
        _plain(evaluate, NOT_KEYED + ("encoder",)), upstream=embed_dir.name, labels=folder_fingerprint(images), classes=classes
    )

    def evaluation(where: Path) -> dict[str, Any]:
        from gigassl.evaluate import run_evaluation

        result = run_evaluation(dataclasses.replace(evaluate, out=where))
        return dict(json=str(result.json_path), missing=result.missing)

    evaluate_dir, _ = run_stage("evaluate", out, evaluate_settings, evaluation, times)
    evaluation_json = json.loads((evaluate_dir / "results.json").read_text())
    summary = evaluation_json["summary"]

    results = dict(
        images=str(args.images),
        n_images=len(images),
        classes=classes,
        commit=git_commit(),
        seed=seed,
        moco_seed=moco_seed,
        arguments={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        encoder=args.encoder,
        encoder_sha256=encoder_id,
        plan=dataclasses.asdict(plan),
        tiles=dict(total=sum(counts), median_per_image=sorted(counts)[len(counts) // 2]),
        settings=dict(extract=extract_settings, train=train_settings, embed=embed_settings, evaluate=evaluate_settings),
        extraction_failed=extract_record["facts"].get("failed", []),
        training_final=train_record["facts"].get("final", {}),
        stage_seconds=times,
        total_seconds=round(time.perf_counter() - started, 1),
        summary=summary,
        paired=evaluation_json.get("paired", []),
        splits=evaluation_json["splits"],
        folders={
            k: str(v) for k, v in dict(extract=extract_dir, train=train_dir, embed=embed_dir, evaluate=evaluate_dir).items()
        },
    )
    write_report(results, report_to)
    return results


def run_seeds(args: argparse.Namespace) -> dict[str, Any]:
    """``--seeds``: :func:`run` per seed (reports in ``OUT/seed-N``), then the paired
    differences to AverageMIL pooled over seeds in ``OUT/results.json|md``."""
    from gigassl.evaluation.paired import pooled_paired_differences

    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    per_seed = [run(args, seed, seed if args.moco_per_seed else seeds[0], out / f"seed-{seed}") for seed in seeds]
    if args.plan_only:
        return {}
    pooled = pooled_paired_differences([r["splits"] for r in per_seed], "average")
    results = dict(
        seeds=seeds,
        moco_per_seed=args.moco_per_seed,
        commit=git_commit(),
        pooled=pooled,
        per_seed=[{k: v for k, v in r.items() if k != "splits"} for r in per_seed],
    )
    text = pooled_markdown(pooled, per_seed)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(text + "\n")
    print(f"\n{text}\n\nwritten: {out / 'results.json'}, {out / 'results.md'}")
    return results


def pooled_markdown(pooled: Sequence[dict[str, Any]], per_seed: Sequence[dict[str, Any]]) -> str:
    """Mean AUC per method and budget over seeds, and the pooled paired differences."""
    budgets = list(dict.fromkeys(e["budget"] for e in pooled))
    n_train = {r["budget"]: r["n_train"] for r in per_seed[0]["summary"]}
    head = "| | " + " | ".join(f"{b} (n={n_train[b]:.0f})" for b in budgets) + " |\n|---|" + "---|" * len(budgets)
    lines = [
        f"Seeds {', '.join(str(r['seed']) for r in per_seed)} (MoCo seed(s) "
        f"{sorted({r['moco_seed'] for r in per_seed})}); macro ROC-AUC, mean over seeds of the mean over splits:",
        "",
        head,
    ]
    for method in dict.fromkeys(r["method"] for r in per_seed[0]["summary"]):
        means = [
            np.mean([next(x["auc_mean"] for x in r["summary"] if x["method"] == method and x["budget"] == b) for r in per_seed])
            for b in budgets
        ]
        lines.append(f"| {METHOD_NAMES.get(method, method)} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    for metric, name in (("auc", "ROC-AUC"), ("balanced_accuracy", "balanced accuracy")):
        lines += [
            "",
            f"Paired Δ {name} against AverageMIL, points: pooled mean over seeds × splits [95 % cluster-bootstrap "
            "interval], splits ahead, per-seed means",
            "",
            head,
        ]
        for method in dict.fromkeys(e["method"] for e in pooled):
            cells = []
            for b in budgets:
                d = next(e[metric] for e in pooled if e["method"] == method and e["budget"] == b)
                cells.append(
                    f"{100 * d['mean']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}], "
                    f"{d['wins']}/{d['n']}; " + " / ".join(f"{100 * v:+.1f}" for v in d["per_run"])
                )
            lines.append(f"| {METHOD_NAMES.get(method, method)} − AverageMIL | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.seeds:
        run_seeds(args)
    else:
        run(args, args.seed, args.seed, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
