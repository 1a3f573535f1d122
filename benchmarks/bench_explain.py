"""Tile attributions where the truth is known, and the speed of explaining a large slide.

1. **Validation** on the demo's synthetic cohort (``gigassl demo``: slides painted from Kather
   2016 tiles, tumour regions known from ``class_maps/``): the whole pipeline is run, then the
   three classifiers (Giga-SSL + LR, AverageMIL + LR, attention-MIL) are cross-fitted on two
   halves of the slides (fit on one half, explain the positive slides of the other), and for the
   score of the tumour class, over positive slides:
   (a) AUROC of the tile contributions for tumour tiles (≥ 50 % of the tile painted tumour) vs
       the other tiles;
   (b) deletion: removing the top 10 % of tiles by contribution lowers the score more than
       removing a random 10 % (5 draws) — mean drops, their paired difference and 95 % t interval.
   Giga-SSL's score after deletion is the mean over 10 embeddings of R views (R, T of the
   embeddings), the same views for every variant of a slide, so the comparison is paired.
2. **Speed**: ``SlideExplainer.explain`` + the HDF5, GeoJSON and heatmap writers on a synthetic
   10,000-tile slide (the tile grid PNG needs the slide file and reads only 2k tiles; not timed).

    python benchmarks/bench_explain.py --out bench_out/explain [--n-slides 40] [--encoder random]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats


def interval(values: np.ndarray) -> str:
    """mean [95 % t interval] over the values."""
    values = np.asarray(values, np.float64)
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.nan
    return f"{values.mean():+.3f} [{values.mean() - half:+.3f}, {values.mean() + half:+.3f}]"


def tumour_tiles(coords: np.ndarray, size_level0: float, class_map: np.ndarray, step_px: int) -> np.ndarray:
    """(N,) bool: at least half of the tile's footprint is painted tumour (class 0)."""
    tumour = (class_map == 0).astype(np.float64)
    out = np.zeros(len(coords), bool)
    for row, (x, y) in enumerate(coords):
        cells = tumour[
            int(y // step_px) : int((y + size_level0) // step_px), int(x // step_px) : int((x + size_level0) // step_px)
        ]
        out[row] = cells.size > 0 and cells.mean() >= 0.5
    return out


def slide_score(explainer: Any, features: np.ndarray, coords: np.ndarray, step: float, seed: int) -> float:
    """The class-"1" score of a set of tiles under the explainer's model (Giga-SSL: mean over 10 R-view embeddings)."""
    import torch

    from gigassl.classifier.attribution import linear_direction
    from gigassl.classifier.model_file import class_score
    from gigassl.embed import pool_views, sample_views

    classifier = explainer.classifier
    if classifier.method == "gigassl":
        provenance = classifier.provenance
        n_views, n_tiles = int(provenance["n_views"]), int(provenance["n_tiles_per_view"])
        views = sample_views(features, coords, step, 10 * n_views, n_tiles, np.random.default_rng(seed))
        u, c = linear_direction(classifier, 1)
        return float((pool_views(explainer.network, views, n_views).astype(np.float64) @ u).mean() + c)
    if classifier.method == "average":
        u, c = linear_direction(classifier, 1)
        return float(features.astype(np.float64).mean(axis=0) @ u + c)
    network = classifier.attention_model()
    with torch.no_grad():
        logits, _ = network(torch.from_numpy(np.asarray(features, np.float32))[None])
    return class_score(logits[0].double().numpy(), 1)


def deletion(explainer: Any, slide: Any, contributions: np.ndarray, seed: int) -> tuple[float, float]:
    """(drop removing the top 10 %, mean drop removing a random 10 % over 5 draws)."""
    n = len(contributions)
    k = max(1, int(round(0.1 * n)))
    rng = np.random.default_rng(seed)

    def without(rows: np.ndarray) -> float:
        keep = np.setdiff1d(np.arange(n), rows)
        return slide_score(explainer, slide.features[keep], slide.coords[keep], slide.tile_step_level0, seed)

    full = slide_score(explainer, slide.features, slide.coords, slide.tile_step_level0, seed)
    top = full - without(np.argsort(contributions)[::-1][:k])
    random = np.mean([full - without(rng.choice(n, k, replace=False)) for _ in range(5)])
    return float(top), float(random)


def run_pipeline(out: Path, n_slides: int, encoder: str) -> Any:
    from gigassl.config import DemoConfig
    from gigassl.demo import run_demo

    return run_demo(DemoConfig(out=out, n_slides=n_slides, encoder=encoder))


def fit_half(demo: Any, method: str, slides: list[str], labels: dict[str, str], path: Path) -> Path:
    from gigassl.classifier.config import FitConfig
    from gigassl.fit import run_fit

    csv_path = path.with_suffix(".labels.csv")
    with open(csv_path, "w", newline="") as handle:
        csv.writer(handle).writerows([["slide", "label"], *([s, labels[s]] for s in slides)])
    config = FitConfig(
        labels=csv_path, out=path, method=method, embeddings=demo.embeddings, features=demo.out / "features", mil_epochs=20
    )
    return run_fit(config).out


def validation(out: Path, n_slides: int, encoder: str) -> None:
    from sklearn.metrics import roc_auc_score

    from extract.features.plain import read_plain_features
    from gigassl.explain import SlideExplainer
    from gigassl.synthetic.demo_cohort import CLASS_MAP_STEP_PX, CLASS_MAPS_FOLDER, read_class_map

    demo = run_pipeline(out, n_slides, encoder)
    with open(demo.labels, newline="") as handle:
        labels = {row["slide"]: row["label"] for row in csv.DictReader(handle)}
    slides = sorted(labels)
    halves = [slides[0::2], slides[1::2]]
    results: dict[str, dict[str, list[float]]] = {}
    for method in ("gigassl", "average", "abmil"):
        found = results.setdefault(method, {"auroc": [], "top": [], "random": []})
        for fold in (0, 1):
            model = fit_half(demo, method, halves[fold], labels, out / f"{method}_{fold}.h5")
            explainer = SlideExplainer(model, demo.checkpoint if method == "gigassl" else None)
            for slide_id in (s for s in halves[1 - fold] if labels[s] == "1"):
                slide = read_plain_features(demo.out / "features" / f"{slide_id}.h5")
                attribution = explainer.explain(slide.path, class_name="1")
                truth = tumour_tiles(
                    slide.coords,
                    slide.tile_step_level0,
                    read_class_map(demo.out / CLASS_MAPS_FOLDER / f"{slide_id}.png"),
                    CLASS_MAP_STEP_PX,
                )
                if 0 < truth.sum() < len(truth):
                    found["auroc"].append(roc_auc_score(truth, attribution.contributions))
                top, random = deletion(explainer, slide, attribution.contributions, seed=len(found["top"]))
                found["top"].append(top)
                found["random"].append(random)
    print(f"\nexplanations on {n_slides} demo slides (encoder {encoder}), positive slides of the held-out half, tumour class")
    print("| method | tumour-tile AUROC | drop, top 10 % removed | drop, random 10 % | top − random |")
    print("|---|---|---|---|---|")
    for method, found in results.items():
        top, random = np.array(found["top"]), np.array(found["random"])
        print(
            f"| {method} | {interval(np.array(found['auroc']))} (n = {len(found['auroc'])}) | {interval(top)} | {interval(random)} | {interval(top - random)} |"
        )
    paired = np.array(results["gigassl"]["auroc"]) - np.array(results["abmil"]["auroc"])
    print(f"Giga-SSL − attention-MIL AUROC, paired over slides: {interval(paired)}")


def speed(out: Path, checkpoint: Path, n_tiles: int) -> None:
    from gigassl.classifier.config import ExplainConfig, FitConfig
    from gigassl.config import EmbedConfig
    from gigassl.embed import run_embedding
    from gigassl.explain import SlideExplainer, write_explanation
    from gigassl.fit import run_fit
    from gigassl.synthetic.cohort import write_synthetic_cohort

    paths = write_synthetic_cohort(out / "large", n_slides=4, n_tiles=n_tiles, n_augmentations=1, bank_size=4)
    run_embedding(EmbedConfig(model=checkpoint, features=out / "large", out=out / "large.h5", allow_other_encoder=True))
    model = run_fit(FitConfig(labels=out / "large" / "labels.csv", out=out / "large_model.h5", embeddings=out / "large.h5")).out
    explainer = SlideExplainer(model, checkpoint)
    config = ExplainConfig(model=model, features=out / "large", out=out / "large_explain", checkpoint=checkpoint)
    start = time.perf_counter()
    attribution = explainer.explain(paths[0])
    middle = time.perf_counter()
    write_explanation(attribution, paths[0], config, {})
    end = time.perf_counter()
    print(
        f"\nexplaining one {n_tiles:,}-tile slide: {end - start:.1f} s ({middle - start:.1f} s contributions over "
        f"{attribution.n_explaining_views:,} views, {end - middle:.1f} s HDF5 + GeoJSON + heatmap); target ≤ 30 s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out/explain"))
    parser.add_argument("--n-slides", type=int, default=40)
    parser.add_argument("--encoder", default="random", help="tile encoder of the demo: random or a checkpoint path")
    parser.add_argument("--n-tiles", type=int, default=10_000, help="tiles of the slide timed in part 2")
    parser.add_argument("--speed-only", action="store_true", help="skip the validation (needs --out of an earlier run)")
    args = parser.parse_args()
    if not args.speed_only:
        validation(args.out, args.n_slides, args.encoder)
    speed(args.out, args.out / "train" / "checkpoint.pt", args.n_tiles)


if __name__ == "__main__":
    main()
