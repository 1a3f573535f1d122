"""``gigassl predict``: score slides with a ``gigassl fit`` model file → a predictions CSV.

Inputs: an embeddings file (a gigassl model; refused when it comes from another checkpoint or
tile encoder than the model was fitted on), or a features folder — embedded on the fly with
``--checkpoint`` and the model's own embedding settings (R, T, seed) for a gigassl model, read
directly for an AverageMIL or attention-MIL model. A slide that cannot be scored is listed (in
the report and ``OUT.failed.csv``) and the others are scored.

``OUT``: ``slide,predicted,p_<class>…`` one row per scored slide, probabilities to 6 digits; for a
survival model (``gigassl fit --task survival``) ``slide,risk``, the Cox linear predictor.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from extract.encoders.tile_encoder import file_sha256
from extract.errors import UserError
from extract.features.slide_file import FeatureFileError
from gigassl.classifier.config import PredictConfig
from gigassl.classifier.model_file import (
    SlideClassifier,
    check_checkpoint,
    check_embeddings_provenance,
    check_slide_encoder,
    load_classifier,
    probabilities,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictResult:
    """What ``gigassl predict`` wrote; ``exit_code`` is non-zero when ``strict`` and a slide failed."""

    out: Path
    n_slides: int
    failed: list[tuple[str, str]]
    exit_code: int

    def format(self) -> str:
        """The predictions file, then the slides that could not be scored."""
        lines = [f"scored {self.n_slides} slides → {self.out}"]
        if self.failed:
            lines.append(f"{len(self.failed)} slide(s) could not be scored (listed in {self.out.with_suffix('.failed.csv')}):")
            lines += [f"  {path}: {reason}" for path, reason in self.failed]
        return "\n".join(lines)


def _from_embeddings(classifier: SlideClassifier, config: PredictConfig) -> tuple[list[str], np.ndarray]:
    from gigassl.embeddings_file import read_embeddings

    assert config.embeddings is not None, "PredictConfig checks that one input is given"
    embeddings = read_embeddings(config.embeddings)
    check_embeddings_provenance(classifier, embeddings.provenance, Path(config.model), Path(config.embeddings))
    return embeddings.slide_ids, embeddings.embeddings


def _embedded_on_the_fly(
    classifier: SlideClassifier, config: PredictConfig, files: list[Path], failed: list[tuple[str, str]]
) -> tuple[list[str], np.ndarray]:
    from extract.device import autocast, resolve_device
    from gigassl.embed import FeatureContract, iter_embeddings
    from gigassl.training.checkpoint import load_model

    if config.checkpoint is None:
        raise UserError(f"{config.model} is a Giga-SSL model: predicting from --features needs --checkpoint to embed them")
    check_checkpoint(classifier, file_sha256(config.checkpoint), Path(config.model), Path(config.checkpoint))
    device = resolve_device(config.device)
    model, state = load_model(config.checkpoint, device, config.sparse_backend)
    provenance = classifier.provenance
    n_views, n_tiles, seed = (int(provenance[k]) for k in ("n_views", "n_tiles_per_view", "seed"))
    ids: list[str] = []
    chunks: list[np.ndarray] = []
    with autocast(device, config.mixed_precision):
        for chunk_ids, chunk in iter_embeddings(
            model, files, n_views, n_tiles, seed, config.batch_size, failed, FeatureContract.of(model, state)
        ):
            ids += chunk_ids
            chunks.append(chunk)
    return ids, np.concatenate(chunks) if chunks else np.zeros((0, 1))


def _mil_probabilities(
    classifier: SlideClassifier, config: PredictConfig, files: list[Path], failed: list[tuple[str, str]]
) -> tuple[list[str], np.ndarray]:
    """AverageMIL / attention-MIL probabilities, slide by slide (a bad file is listed, not fatal)."""
    import torch

    from extract.features.plain import read_plain_features

    network = classifier.attention_model() if classifier.method == "abmil" else None
    ids, rows = [], []
    for path in files:
        try:
            slide = read_plain_features(path)
            check_slide_encoder(classifier, slide.encoder_sha256, Path(config.model), path)
        except (FeatureFileError, UserError, OSError, KeyError) as error:
            logger.warning("skipping %s: %s", path, error)
            failed.append((str(path), str(error)))
            continue
        if network is None:
            assert classifier.linear is not None, "an average model is linear"
            rows.append(outputs(classifier, classifier.linear.logits(slide.features.mean(axis=0, dtype=np.float64)[None]))[0])
        else:
            with torch.no_grad():
                logits, _ = network(torch.from_numpy(np.asarray(slide.features, np.float32))[None])
            rows.append(torch.softmax(logits[0].double(), dim=0).numpy())
        ids.append(slide.slide_id)
    return ids, np.array(rows).reshape(len(ids), len(classifier.classes))


def is_survival(classifier: SlideClassifier) -> bool:
    """True for a Cox model of ``gigassl fit --task survival`` (one output: the risk score)."""
    return classifier.provenance.get("task") == "survival"


def outputs(classifier: SlideClassifier, logits: np.ndarray) -> np.ndarray:
    """(S, C) class probabilities, or (S, 1) risk scores (the linear predictor) of a survival model."""
    return np.asarray(logits, np.float64) if is_survival(classifier) else probabilities(logits)


def predict_probabilities(
    classifier: SlideClassifier, config: PredictConfig, failed: list[tuple[str, str]]
) -> tuple[list[str], np.ndarray]:
    """Slide ids and (S, C) probabilities of the classes (a survival model: (S, 1) risks), from the input ``config`` names."""
    if config.embeddings is not None:
        ids, vectors = _from_embeddings(classifier, config)
    else:
        from extract.features.plain import split_duplicate_ids
        from gigassl.training.data import feature_files_in

        assert config.features is not None, "PredictConfig checks that one input is given"
        files, duplicates = split_duplicate_ids(feature_files_in(config.features))
        failed += duplicates
        if classifier.method != "gigassl":
            return _mil_probabilities(classifier, config, files, failed)
        ids, vectors = _embedded_on_the_fly(classifier, config, files, failed)
    assert classifier.linear is not None, "a gigassl model is linear"
    return ids, outputs(classifier, classifier.linear.logits(vectors)) if ids else np.zeros((0, len(classifier.classes)))


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        table = csv.writer(handle)
        table.writerow(header)
        table.writerows(rows)
    return path


def run_predict(config: PredictConfig) -> PredictResult:
    """``gigassl predict``: the predictions CSV of every slide the input holds."""
    classifier = load_classifier(config.model)
    failed: list[tuple[str, str]] = []
    ids, proba = predict_probabilities(classifier, config, failed)
    if not ids:
        raise UserError(
            f"no slide could be scored with {config.model}"
            + (f"; the first failure: {failed[0][0]}: {failed[0][1]}" if failed else "")
        )
    classes = classifier.classes
    out = Path(config.out)
    if is_survival(classifier):
        _write_csv(out, ["slide", "risk"], [[slide, f"{p[0]:.6f}"] for slide, p in zip(ids, proba)])
    else:
        rows = [[slide, classes[int(np.argmax(p))], *(f"{v:.6f}" for v in p)] for slide, p in zip(ids, proba)]
        _write_csv(out, ["slide", "predicted", *(f"p_{c}" for c in classes)], rows)
    failed_csv = out.with_suffix(".failed.csv")
    if failed:
        _write_csv(failed_csv, ["file", "reason"], [list(f) for f in failed])
    else:
        failed_csv.unlink(missing_ok=True)
    return PredictResult(out, len(ids), failed, int(bool(failed) and config.strict))
