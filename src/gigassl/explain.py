"""``gigassl explain`` and :class:`SlideExplainer`: which tiles drove a fitted model's call on a slide.

For each slide: each tile's exact contribution to the class score of the model's predicted class
(or ``--class-name``), by :mod:`gigassl.classifier.attribution`, written by :mod:`gigassl.classifier.explain_outputs`
as HDF5, GeoJSON, a heatmap over the thumbnail and a grid of the top and bottom tiles. The same
for a Giga-SSL model (needs its checkpoint), an AverageMIL model and an attention-MIL model.
A slide that fails is listed and the others go on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from extract.encoders.tile_encoder import file_sha256
from extract.errors import UserError
from extract.features.plain import PlainFeatures, read_plain_features
from extract.settings import settings_dict
from gigassl.classifier.attribution import (
    TileAttribution,
    attention_terms,
    average_contributions,
    explaining_views,
    gigassl_contributions,
    linear_direction,
)
from gigassl.classifier.config import ExplainConfig
from gigassl.classifier.model_file import check_checkpoint, check_slide_encoder, class_score, load_classifier, probabilities

logger = logging.getLogger(__name__)


class SlideExplainer:
    """Exact tile contributions of a model file's class score, one slide at a time.

    ``model``: a ``gigassl fit`` model file; ``checkpoint``: the Giga-SSL checkpoint (a gigassl
    model only); ``mixed_precision``: the sparse head under the device's autocast, as ``gigassl
    embed`` runs it (the terms are summed in float64 either way, so the sum stays exact for the
    site features the head gives). ``explain(features_file, class_name=None)`` → :class:`TileAttribution` of the
    predicted class, or of ``class_name``.
    """

    def __init__(
        self,
        model: str | Path,
        checkpoint: str | Path | None = None,
        views_per_tile: int = 8,
        seed: int = 0,
        batch_views: int = 4096,
        device: str = "cpu",
        sparse_backend: str = "auto",
        mixed_precision: bool = True,
    ) -> None:
        self.model_path = Path(model)
        self.mixed_precision = mixed_precision
        self.classifier = load_classifier(self.model_path)
        if self.classifier.provenance.get("task", "classification") != "classification":
            raise UserError(
                f"{self.model_path} is a {self.classifier.provenance['task']} model: explain splits class scores; fit a classifier"
            )
        self.views_per_tile, self.seed, self.batch_views = views_per_tile, seed, batch_views
        self.network: Any = None
        self.contract: Any = None
        if self.classifier.method == "gigassl":
            self._load_network(checkpoint, device, sparse_backend)

    def _load_network(self, checkpoint: str | Path | None, device: str, sparse_backend: str) -> None:
        from extract.device import resolve_device
        from gigassl.embed import FeatureContract
        from gigassl.training.checkpoint import load_model

        if checkpoint is None:
            raise UserError(f"{self.model_path} is a Giga-SSL model: pass --checkpoint, the checkpoint its embeddings came from")
        check_checkpoint(self.classifier, file_sha256(checkpoint), self.model_path, Path(checkpoint))
        self.network, state = load_model(checkpoint, resolve_device(device), sparse_backend)
        self.contract = FeatureContract.of(self.network, state)

    def _class_index(self, probability: np.ndarray, class_name: str | None) -> int:
        return self.classifier.class_index(class_name) if class_name else int(np.argmax(probability))

    def explain(self, features_file: str | Path, class_name: str | None = None) -> TileAttribution:
        """The attribution of one slide's features file (see the class docstring)."""
        slide = read_plain_features(features_file)
        if self.classifier.method == "gigassl":
            return self._explain_gigassl(slide, class_name)
        check_slide_encoder(self.classifier, slide.encoder_sha256, self.model_path, slide.path)
        if self.classifier.method == "average":
            return self._explain_average(slide, class_name)
        return self._explain_attention(slide, class_name)

    def _attribution(self, slide: PlainFeatures, class_index: int, **values: Any) -> TileAttribution:
        return TileAttribution(
            slide.slide_id,
            self.classifier.method,
            self.classifier.classes[class_index],
            slide.coords,
            slide.tile_step_level0,
            **values,
        )

    def _explain_gigassl(self, slide: PlainFeatures, class_name: str | None) -> TileAttribution:
        from extract.device import autocast

        with autocast(next(self.network.parameters()).device, self.mixed_precision):
            return self._explain_gigassl_in(slide, class_name)

    def _explain_gigassl_in(self, slide: PlainFeatures, class_name: str | None) -> TileAttribution:
        from gigassl.embed import pool_views, sample_views, slide_generator

        self.contract.check(slide)
        provenance = self.classifier.provenance
        n_tiles, n_views, seed = (int(provenance[k]) for k in ("n_tiles_per_view", "n_views", "seed"))
        views = sample_views(
            slide.features, slide.coords, slide.tile_step_level0, n_views, n_tiles, slide_generator(seed, slide.slide_id)
        )
        stored = pool_views(self.network, views, n_views)[0].astype(np.float64)  # what `gigassl embed` makes (same autocast)
        assert self.classifier.linear is not None, "a gigassl model is linear"
        probability = probabilities(self.classifier.linear.logits(stored[None]))[0]
        k = self._class_index(probability, class_name)
        u, c = linear_direction(self.classifier, k)
        rng = slide_generator(self.seed, slide.slide_id)
        rows = explaining_views(len(slide.features), n_tiles, n_views, self.views_per_tile, rng)
        contributions, covered, projection, spread = gigassl_contributions(
            self.network, slide, u, rows, n_views, self.batch_views
        )
        return self._attribution(
            slide,
            k,
            contributions=contributions,
            n_views=covered,
            intercept=c,
            score=projection + c,
            reference_score=float(stored @ u + c),
            probability=float(probability[k]),
            n_explaining_views=len(rows),
            score_sd=spread,
        )

    def _explain_average(self, slide: PlainFeatures, class_name: str | None) -> TileAttribution:
        assert self.classifier.linear is not None, "an average model is linear"
        logits = self.classifier.linear.logits(slide.features.astype(np.float64).mean(axis=0)[None])[0]
        probability = probabilities(logits[None])[0]
        k = self._class_index(probability, class_name)
        contributions, c = average_contributions(self.classifier, slide, k)
        score = class_score(logits, k)
        ones = np.ones(len(contributions), np.int64)
        return self._attribution(
            slide,
            k,
            contributions=contributions,
            n_views=ones,
            intercept=c,
            score=score,
            reference_score=score,
            probability=float(probability[k]),
        )

    def _explain_attention(self, slide: PlainFeatures, class_name: str | None) -> TileAttribution:
        terms = attention_terms(self.classifier, slide)
        probability = probabilities(terms.logits[None])[0]
        k = self._class_index(probability, class_name)
        contributions, c = terms.contributions(k)
        score = class_score(terms.logits, k)
        return self._attribution(
            slide,
            k,
            contributions=contributions,
            n_views=np.ones(len(contributions), np.int64),
            intercept=c,
            score=score,
            reference_score=score,
            probability=float(probability[k]),
            attention=terms.attention,
        )


# ---------------------------------------------------------------------------------------------
# The job


@dataclass(frozen=True)
class ExplainResult:
    """What ``gigassl explain`` wrote: one summary row per slide, the failed slides."""

    out: Path
    rows: list[dict[str, Any]]
    failed: list[tuple[str, str]]
    exit_code: int

    def format(self) -> str:
        """One line per explained slide (score, its reproduction, coverage, the stored embedding's score), then the failures."""
        lines = [f"explained {len(self.rows)} slide(s) → {self.out}"]
        for row in self.rows:
            lines.append(
                f"  {row['slide_id']} [{row['method']}] class {row['class_name']!r} (p = {row['probability']:.3f}): score "
                f"{row['score']:+.4f} = intercept {row['intercept']:+.4f} + Σ of {row['n_tiles']} tile contributions "
                f"(reproduced to {abs(row['reproduced_score'] - row['score']):.1e}); "
                + (
                    f"{row['n_explaining_views']} views, every tile in ≥ {row['min_views_per_tile']}; the embedding "
                    f"`gigassl embed` makes scores {row['reference_score']:+.4f} (gap {row['score'] - row['reference_score']:+.4f}; "
                    f"R-view embeddings of this slide score ± {row['score_sd']:.4f} s.d.)"
                    if row["method"] == "gigassl"
                    else "exact on all tiles"
                )
            )
        if self.failed:
            lines.append(f"{len(self.failed)} slide(s) failed:")
            lines += [f"  {path}: {reason}" for path, reason in self.failed]
        return "\n".join(lines)


def _named(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)


def _slide_images(attribution: TileAttribution, features_file: Path, config: ExplainConfig, stem: Path) -> list[Path]:
    """The heatmap (over the thumbnail, or a blank canvas without the slide) and the tile grid."""
    from extract.slides.formats import open_slide
    from extract.slides.tiling import thumbnail_side
    from gigassl.classifier.explain_outputs import write_heatmap, write_tile_grid
    from gigassl.evaluation.inputs import slide_tiles

    try:
        source = slide_tiles([features_file], config.slides)[0]
    except (FileNotFoundError, UserError) as error:
        logger.warning("%s: no slide to read (heatmap on a blank canvas, no tile grid): %s", attribution.slide_id, error)
        size = attribution.tile_size_level0
        extent = attribution.coords.max(axis=0) + size
        side = thumbnail_side((int(extent[0]), int(extent[1])), size)
        downsample = max(float(extent.max()) / side, 1.0)
        canvas = np.full((int(extent[1] / downsample) + 1, int(extent[0] / downsample) + 1, 3), 255, np.uint8)
        return [write_heatmap(attribution, canvas, downsample, _named(stem, ".heatmap.png"))]
    with open_slide(source.slide_path, source.level0_mpp) as reader:
        thumbnail, downsample = reader.thumbnail(thumbnail_side(reader.dimensions, source.size_level0))
    heatmap = write_heatmap(attribution, thumbnail, downsample, _named(stem, ".heatmap.png"))
    return [heatmap, write_tile_grid(attribution, source.read, config.top_k, _named(stem, ".tiles.png"))]


def write_explanation(
    attribution: TileAttribution, features_file: Path, config: ExplainConfig, provenance: dict[str, Any]
) -> list[Path]:
    """All the files of one slide's attribution in ``config.out`` (``{slide}.{method}.*``)."""
    from gigassl.classifier.explain_outputs import write_attribution_h5, write_geojson

    stem = Path(config.out) / f"{attribution.slide_id}.{attribution.method}"
    written = [
        write_attribution_h5(attribution, _named(stem, ".h5"), provenance),
        write_geojson(attribution, _named(stem, ".geojson")),
    ]
    return written + (_slide_images(attribution, features_file, config, stem) if config.images else [])


def _selected(config: ExplainConfig) -> dict[str, Path]:
    from gigassl.evaluation.inputs import feature_paths

    files = feature_paths(config.features)
    if not config.slide_ids:
        return files
    unknown = [s for s in config.slide_ids if s not in files]
    if unknown:
        raise UserError(f"--slide-ids {', '.join(unknown)}: no such slide in {config.features} (its slide ids are file stems)")
    return {s: files[s] for s in config.slide_ids}


def run_explain(config: ExplainConfig) -> ExplainResult:
    """``gigassl explain``: attribute every selected slide of ``config.features`` and write its files."""
    from extract.progress import progress
    from gigassl.classifier.explain_outputs import summary_attrs

    explainer = SlideExplainer(
        config.model,
        config.checkpoint,
        config.views_per_tile,
        config.seed,
        config.batch_views,
        config.device,
        config.sparse_backend,
    )
    provenance = dict(model=str(config.model), model_sha256=file_sha256(config.model), settings=settings_dict(config))
    rows: list[dict[str, Any]] = []
    failed: list[tuple[str, str]] = []
    for _, path in progress(sorted(_selected(config).items()), desc="explain", unit="slide", log=logger):
        try:
            attribution = explainer.explain(path, config.class_name or None)
            write_explanation(attribution, path, config, provenance)
        except (UserError, OSError, ValueError) as error:
            logger.warning("skipping %s: %s", path, error)
            failed.append((str(path), str(error)))
            continue
        rows.append(summary_attrs(attribution))
    if not rows:
        raise UserError(
            f"no slide of {config.features} could be explained" + (f": {failed[0][0]}: {failed[0][1]}" if failed else "")
        )
    return ExplainResult(Path(config.out), rows, failed, int(bool(failed) and config.strict))
