"""A monitor of MoCo pre-training that labels can check: a linear probe on slide-mean features.

MoCo's own loss is no measure of the encoder: its negatives come from a queue filled by
earlier key encoders, so the loss moves with the queue's staleness as much as with the
representation (see docs/pretraining.md). When the user gives ``--probe-labels``
(a CSV ``slide,label``, the same file as ``gigassl evaluate``'s), each epoch embeds a fixed
set of tiles of every labelled slide with the query encoder's trunk (the tile features stage 1
will write), averages them per slide and scores a standardised logistic regression by
stratified cross-validation: the macro one-vs-rest ROC-AUC of the out-of-fold probabilities.
The labels never reach training; they only score it.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from extract.device import autocast
from extract.encoders.resnet import ResNet
from extract.encoders.tile_encoder import normalise
from extract.errors import UserError
from extract.moco.data import IndexedSlide, TileReaders, read_tiles

logger = logging.getLogger(__name__)

PROBE_FOLDS = 5


@dataclass
class ProbeSet:
    """Fixed tiles of the labelled slides: ``tiles`` (M, 3, px, px) uint8, ``slide_of`` (M,)
    the row of each tile's slide in ``labels`` (S,)."""

    tiles: torch.Tensor
    slide_of: np.ndarray
    labels: np.ndarray


def read_probe_labels(path: Path) -> dict[str, str]:
    """``slide,label`` CSV → {slide id: label}; slide ids are file stems."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--probe-labels {path}: no such file; give a CSV with columns slide,label")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"slide", "label"} <= set(rows[0]):
        raise UserError(f"--probe-labels {path}: needs the columns slide,label")
    return {row["slide"].strip(): row["label"].strip() for row in rows if row["slide"].strip() and row["label"].strip()}


def probe_set(
    slides: list[IndexedSlide], labels_csv: Path, tiles_per_slide: int, tile_size_px: int, seed: int
) -> ProbeSet | None:
    """Up to ``tiles_per_slide`` seeded tiles of each labelled slide; None (with a warning) when
    fewer than two classes with ``PROBE_FOLDS`` slides each are found among ``slides``."""
    labels = read_probe_labels(labels_csv)
    chosen = [i for i, s in enumerate(slides) if s.path.stem in labels]
    slide_labels = np.array([labels[slides[i].path.stem] for i in chosen], dtype=str)
    classes, counts = np.unique(slide_labels, return_counts=True)
    if len(classes) < 2 or counts.min() < PROBE_FOLDS:
        logger.warning(
            "--probe-labels %s: %d labelled slides (classes %s) — the probe needs ≥ 2 classes of ≥ %d slides; probe off",
            labels_csv,
            len(chosen),
            dict(zip(classes.tolist(), counts.tolist())),
            PROBE_FOLDS,
        )
        return None
    rng = np.random.default_rng([seed, 104729])
    pairs = [
        (i, int(t)) for i in chosen for t in rng.choice(len(slides[i]), size=min(tiles_per_slide, len(slides[i])), replace=False)
    ]
    readers = TileReaders(slides)
    try:
        tiles = read_tiles(readers, np.array(pairs), tile_size_px)
    finally:
        readers.close()
    row_of = {slide: row for row, slide in enumerate(chosen)}
    return ProbeSet(tiles, np.array([row_of[s] for s, _ in pairs]), slide_labels)


@torch.no_grad()
def slide_mean_features(
    encoder: ResNet, probe: ProbeSet, device: torch.device, mixed_precision: bool, batch: int = 256
) -> np.ndarray:
    """(S, C) mean trunk feature of each labelled slide (eval mode; the encoder's mode is restored)."""
    was_training = encoder.training
    encoder.eval()
    try:
        parts = []
        for chunk in probe.tiles.split(batch):
            with autocast(device, mixed_precision):
                maps = encoder.forward_features(normalise(chunk.to(device).float().div_(255.0)))
            parts.append(maps.float().mean(dim=(2, 3)).cpu())
    finally:
        encoder.train(was_training)
    tile_features = torch.cat(parts).numpy()
    sums = np.zeros((len(probe.labels), tile_features.shape[1]))
    np.add.at(sums, probe.slide_of, tile_features)
    return sums / np.bincount(probe.slide_of, minlength=len(probe.labels))[:, None]


def probe_auc(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """Macro one-vs-rest ROC-AUC of out-of-fold probabilities of a standardised logistic
    regression (``PROBE_FOLDS`` stratified folds) on (S, C) slide features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    folds = StratifiedKFold(PROBE_FOLDS, shuffle=True, random_state=seed)
    probabilities = cross_val_predict(model, features, labels, cv=folds, method="predict_proba")
    if probabilities.shape[1] == 2:
        return float(roc_auc_score(labels, probabilities[:, 1]))
    return float(roc_auc_score(labels, probabilities, multi_class="ovr", average="macro"))
