"""A synthetic survival (and regression) cohort whose hazards are known, for tests and checks.

Each patient has a tumour fraction ``f ~ U(0.05, 0.95)`` and two slides. A slide's tiles are
tumour tiles with probability ``f`` (the painted tumour share of the demo's slides, at the level
of tile features): a tumour tile carries a fixed tumour direction on top of the noise every tile
has. Survival follows a proportional-hazards model in ``f``:

    hazard = base_hazard · exp(log_hazard_ratio · f),   T ~ Exponential(hazard),

censored by an independent ``C ~ Exponential(censoring_hazard)`` (observed: ``min(T, C)``, event
``T ≤ C``). The true risk ``log_hazard_ratio · f`` is the best any model can rank by, so its
C-index on a test part is the ceiling a fitted model is checked against. A continuous target
``score = 10 f + N(0, score_noise²)`` serves the regression check.

Files: ``{folder}/slide_{i:03d}.h5`` (plain tile features, valid inputs of every stage-2 job)
and ``{folder}/labels.csv`` with ``slide,patient,time,event,score,true_risk``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extract.features.slide_file import SlideFileWriter
from gigassl.synthetic.cohort import GRID_ATTRS, TILE_STEP_LEVEL0, random_encoder_info

SURVIVAL_LABELS = "labels.csv"


@dataclass(frozen=True)
class SurvivalCohort:
    """Per slide (S,): ids, patients, tumour fraction, true risk, time, event, score."""

    slide_ids: list[str]
    patients: list[str]
    tumour_fraction: np.ndarray
    true_risk: np.ndarray
    time: np.ndarray
    event: np.ndarray
    score: np.ndarray


def draw_survival_cohort(
    n_patients: int = 40,
    seed: int = 0,
    log_hazard_ratio: float = 3.0,
    base_hazard: float = 0.05,
    censoring_hazard: float = 0.05,
    score_noise: float = 1.0,
) -> SurvivalCohort:
    """Patients' tumour fractions, survival and score (two slides per patient share them)."""
    rng = np.random.default_rng([seed, 7])
    fraction = rng.uniform(0.05, 0.95, n_patients)
    risk = log_hazard_ratio * fraction
    event_time = rng.exponential(1.0 / (base_hazard * np.exp(risk)))
    censoring_time = rng.exponential(1.0 / censoring_hazard, n_patients)
    time = np.round(np.minimum(event_time, censoring_time), 3) + 0.001  # times > 0, rounded as a registry would
    event = event_time <= censoring_time
    score = 10 * fraction + score_noise * rng.standard_normal(n_patients)
    patient = np.repeat(np.arange(n_patients), 2)
    return SurvivalCohort(
        [f"slide_{i:03d}" for i in range(2 * n_patients)],
        [f"patient_{p:03d}" for p in patient],
        fraction[patient],
        risk[patient],
        time[patient],
        event[patient],
        score[patient],
    )


def slide_tile_features(
    fraction: float, n_tiles: int, direction: np.ndarray, rng: np.random.Generator, strength: float = 1.0
) -> np.ndarray:
    """(n_tiles, D) features: noise, plus ``strength · direction`` on the tumour tiles (each with probability ``fraction``)."""
    features = 1.0 + 0.5 * rng.standard_normal((n_tiles, len(direction))).astype(np.float32)
    tumour = rng.random(n_tiles) < fraction
    features[tumour] += strength * direction
    return features


def write_survival_cohort(
    folder: str | Path, n_patients: int = 40, n_tiles: int = 32, seed: int = 0, **hazards: float
) -> SurvivalCohort:
    """Write the cohort's feature files and ``labels.csv`` into ``folder``; returns the cohort."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cohort = draw_survival_cohort(n_patients, seed, **hazards)
    encoder = random_encoder_info()
    rng = np.random.default_rng([seed, 11])
    direction = rng.standard_normal(encoder.width).astype(np.float32)
    direction *= 2.0 / np.linalg.norm(direction) * np.sqrt(encoder.width) / 4
    side = int(np.ceil(np.sqrt(n_tiles)))
    cells = np.stack(np.divmod(np.arange(n_tiles), side), axis=1)[:, ::-1].astype(np.int64)
    coords = cells * TILE_STEP_LEVEL0
    grid = dict(
        GRID_ATTRS,
        level0_width=int(coords[:, 0].max() + TILE_STEP_LEVEL0),
        level0_height=int(coords[:, 1].max() + TILE_STEP_LEVEL0),
    )
    for index, slide_id in enumerate(cohort.slide_ids):
        features = slide_tile_features(
            float(cohort.tumour_fraction[index]), n_tiles, direction, np.random.default_rng([seed, index])
        )
        with SlideFileWriter(
            folder / f"{slide_id}.h5",
            slide_id=slide_id,
            source=f"{slide_id}.synthetic",
            settings={"synthetic": True, "seed": seed},
            encoder=encoder,
        ) as writer:
            writer.create_plain(coords, grid)
            writer.write_plain_rows(0, features)
    with open(folder / SURVIVAL_LABELS, "w", newline="") as handle:
        table = csv.writer(handle)
        table.writerow(["slide", "patient", "time", "event", "score", "true_risk"])
        for i, slide_id in enumerate(cohort.slide_ids):
            table.writerow(
                [
                    slide_id,
                    cohort.patients[i],
                    f"{cohort.time[i]:.3f}",
                    int(cohort.event[i]),
                    f"{cohort.score[i]:.4f}",
                    f"{cohort.true_risk[i]:.4f}",
                ]
            )
    return cohort


def write_mean_embeddings(features: str | Path, out: str | Path) -> Path:
    """A stand-in embeddings file: each slide's L2-normalised mean tile feature (for checks that
    need slide vectors without training a Giga-SSL model)."""
    from extract.features.plain import read_plain_features
    from gigassl.embeddings_file import EmbeddingWriter

    paths = sorted(Path(features).glob("*.h5"))
    slides = [read_plain_features(p) for p in paths]
    vectors = np.stack([s.features.mean(axis=0) for s in slides]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with EmbeddingWriter(
        out, dict(checkpoint="mean tile features (stand-in)", n_views=1, n_tiles_per_view=1), vectors.shape[1]
    ) as writer:
        writer.append([s.slide_id for s in slides], vectors)
    return Path(out)
