"""Linear probe on BACH-like images: the package's MoCo tile encoder against a random one.

1. Trains ``gigassl pretrain-tiles --profile small-cpu`` on a folder of images (default the 200
   BACH development images, jpg at 0.42 µm/px), unless a finished run with the same settings
   is cached in ``--cache`` (a rerun only probes; ``--retrain`` forces training).
2. For each encoder (MoCo, ``load_resnet18("random")``), embeds every tissue tile of every
   image with the tile trunk (256-d, the features ``gigassl extract`` writes), averages them per
   image, and fits a logistic regression (standardised features, C chosen by inner 3-fold CV)
   on 10 repeated stratified 70/30 splits; the file name's prefix is the label
   (``n``, ``b``, ``is``, ``iv``). Prints macro one-vs-rest ROC-AUC mean ± s.d.

    python benchmarks/bench_moco_bach.py                      # full small-cpu profile (≤ 45 min on 2 cores)
    python benchmarks/bench_moco_bach.py --epochs 1 --tiles-per-epoch 640 --probe-tiles-per-image 8 \
        --cache bench_out/moco_bach_smoke                     # smoke test: minutes

Everything derived from the images (checkpoints, features) stays in ``--cache`` (default
``bench_out/moco_bach``, ignored by git): BACH's licence forbids committing it.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedShuffleSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from extract.batch.slide_list import list_slides
from extract.config import MOCO_PROFILES, MocoConfig
from extract.device import resolve_device
from extract.encoders.tile_encoder import TileTrunk, encode_batch, load_resnet18
from extract.moco.data import IndexedSlide, index_slides
from extract.moco.pretrain import run_pretraining
from extract.slides.formats import open_slide

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "bach-dev"
LABELS = ("n", "b", "is", "iv")
N_SPLITS = 10


def label_of(path: Path) -> int:
    """Class index from the file name's letter prefix (``is012.jpg`` → 2)."""
    prefix = re.match(r"[a-z]+", path.stem.lower())
    if prefix is None or prefix.group(0) not in LABELS:
        raise ValueError(f"{path.name}: file name must start with one of {LABELS}")
    return LABELS.index(prefix.group(0))


def train_or_reuse(config: MocoConfig, retrain: bool) -> tuple[Path, float | None]:
    """The trained ``encoder.pt`` (cached when a finished run has the same settings) and training seconds."""
    stamp = Path(config.out) / "bench_settings.json"
    wanted = {k: str(v) for k, v in vars(config).items() if k not in ("num_workers", "device", "keep_checkpoints")}
    encoder = Path(config.out) / "encoder.pt"
    if not retrain and encoder.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        print(f"reusing the trained encoder {encoder}")
        return encoder, json.loads((Path(config.out) / "bench_time.json").read_text())["seconds"]
    started = time.perf_counter()
    run_pretraining(config)
    seconds = time.perf_counter() - started
    stamp.write_text(json.dumps(wanted))
    (Path(config.out) / "bench_time.json").write_text(json.dumps({"seconds": seconds}))
    return encoder, seconds


@torch.no_grad()
def mean_tile_features(encoder_source: str | Path, slides: list[IndexedSlide], args: argparse.Namespace) -> np.ndarray:
    """(n_images, 256) mean trunk feature of each image's tissue tiles."""
    model, _ = load_resnet18(encoder_source)
    device = resolve_device(args.device)
    trunk = TileTrunk(model).eval().to(device, memory_format=torch.channels_last)
    rows = []
    rng = np.random.default_rng(0)  # the same tiles for every encoder
    for slide in slides:
        coords = slide.coords
        if args.probe_tiles_per_image and len(coords) > args.probe_tiles_per_image:
            coords = coords[np.sort(rng.choice(len(coords), args.probe_tiles_per_image, replace=False))]
        with open_slide(slide.path, mpp_override=slide.level0_mpp) as reader:
            tiles = np.stack([reader.read_tile(int(x), int(y), slide.size_level0, args.tile_size_px) for x, y in coords])
        features = np.concatenate(
            [encode_batch(torch.from_numpy(tiles[i : i + 256]), trunk, device) for i in range(0, len(tiles), 256)]
        )
        rows.append(features.mean(axis=0))
    return np.stack(rows)


def probe(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Macro one-vs-rest AUC of each of ``N_SPLITS`` stratified 70/30 splits."""
    splits = StratifiedShuffleSplit(n_splits=N_SPLITS, test_size=0.3, random_state=seed)
    aucs = []
    for train, test in splits.split(features, labels):
        model = make_pipeline(
            StandardScaler(),
            LogisticRegressionCV(
                Cs=[1e-3, 1e-2, 1e-1, 1.0, 10.0], cv=3, scoring="roc_auc_ovr", max_iter=2000, class_weight="balanced"
            ),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # sklearn's announcements about future defaults
            model.fit(features[train], labels[train])
        aucs.append(roc_auc_score(labels[test], model.predict_proba(features[test]), multi_class="ovr", average="macro"))
    return np.array(aucs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", type=Path, nargs="?", default=DEFAULT_IMAGES, help="folder of labelled images")
    parser.add_argument(
        "--cache", type=Path, default=REPO / "bench_out" / "moco_bach", help="training run and features (never commit)"
    )
    parser.add_argument("--image-mpp", type=float, default=0.42, help="µm/px of the images (BACH: 0.42)")
    parser.add_argument(
        "--target-mpp", type=float, default=1.0, help="µm/px of the tiles, training and probe (1.0 ≈ 10×, the paper's)"
    )
    parser.add_argument(
        "--tile-size-px", type=int, default=MOCO_PROFILES["small-cpu"]["tile_size_px"], help="tile px (the small-cpu profile's)"
    )
    # BACH images are fields a pathologist chose, all relevant; some benign ones are so pale that
    # the saturation-based tissue mask finds almost nothing, so every tile is kept by default.
    parser.add_argument("--tissue-threshold", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=None, help="override the profile (smoke tests)")
    parser.add_argument("--tiles-per-epoch", type=int, default=None, help="override the profile (smoke tests)")
    parser.add_argument("--probe-tiles-per-image", type=int, default=0, help="average at most this many tiles per image (0: all)")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--retrain", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)

    images, _ = list_slides(args.images)
    labels = np.array([label_of(p) for p in images])
    overrides = {k: v for k, v in (("epochs", args.epochs), ("tiles_per_epoch", args.tiles_per_epoch)) if v is not None}
    config = MocoConfig(
        slides=args.images,
        out=args.cache / "pretrain",
        profile="small-cpu",
        target_mpp=args.target_mpp,
        tile_size_px=args.tile_size_px,
        default_mpp=args.image_mpp,
        tissue_threshold=args.tissue_threshold,
        num_workers=args.num_workers,
        device=args.device,
        **overrides,
    )
    encoder_path, train_seconds = train_or_reuse(config, args.retrain)

    slides, skipped = index_slides(images, args.target_mpp, args.tile_size_px, args.tissue_threshold, default_mpp=args.image_mpp)
    if skipped:
        raise RuntimeError(f"{len(skipped)} images gave no tiles, e.g. {skipped[0][1]}; lower --tissue-threshold")
    n_tiles = sum(min(len(s), args.probe_tiles_per_image or len(s)) for s in slides)
    results = {}
    for name, source in (("MoCo (small-cpu)", encoder_path), ("random", "random")):
        started = time.perf_counter()
        features = mean_tile_features(source, slides, args)
        np.save(args.cache / f"features_{'moco' if source != 'random' else 'random'}.npy", features)
        results[name] = (probe(features, labels), time.perf_counter() - started)

    print()
    print(
        f"BACH-like linear probe: {len(images)} images in {args.images}, {len(LABELS)} classes, "
        f"{n_tiles} tiles of {args.tile_size_px} px at {args.target_mpp} µm/px, mean 256-d trunk feature per image, "
        f"{N_SPLITS} stratified 70/30 splits"
    )
    print(
        f"MoCo training: {config.epochs} epochs × {config.tiles_per_epoch} tiles, batch {config.batch_size}, "
        f"queue {config.queue_size}, {train_seconds / 60:.1f} min"
        if train_seconds
        else ""
    )
    print("| encoder | macro AUC (mean ± s.d.) | features (s) |")
    print("|---|---|---|")
    for name, (aucs, seconds) in results.items():
        print(f"| {name} | {aucs.mean():.3f} ± {aucs.std(ddof=1):.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
