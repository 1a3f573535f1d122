"""Synthetic cohorts of per-slide feature files with a planted structure, for tests and benchmarks.

Each slide is a blob of tissue tiles on a grid. Its tile features share

- a slide signature: a random direction in feature space common to all tiles of the slide,
  so two views of one slide are more alike than views of two slides (what NT-Xent can learn);
- a class signal: a fixed direction added to the tiles of the label-1 slides (half the cohort),
  so a linear classifier on slide embeddings can separate the classes.

The bank's A augmentations each add one shift shared by all K tiles of that augmentation (the
shared augmentation of stage 1) plus a little per-tile noise. Files are written with
:class:`extract.features.slide_file.SlideFileWriter`, so they are valid inputs of every stage-2 job,
and they say ``encoder="random"`` with the hash of ``load_resnet18("random")`` (seed 0), which
is what training re-creates for its initial layer4. A ``labels.csv`` (slide, label, patient)
is written beside the files.
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import numpy as np

from extract.encoders.tile_encoder import EncoderInfo
from extract.features.slide_file import SlideFileWriter

# A tile of 224 px at 0.5 µm/px from a 0.25 µm/px level 0 spans 448 level-0 pixels.
TILE_STEP_LEVEL0 = 448
GRID_ATTRS = dict(
    patch_size=224,
    patch_size_level0=TILE_STEP_LEVEL0,
    patch_size_level0_exact=float(TILE_STEP_LEVEL0),
    mpp=0.25,
    target_mpp=0.5,
    tissue_threshold=0.5,
)
LABELS_FILE = "labels.csv"


@functools.lru_cache(maxsize=1)
def random_encoder_info() -> EncoderInfo:
    """The provenance of ``load_resnet18("random")`` (seed 0), as stage 1 records it."""
    from extract.encoders.tile_encoder import load_resnet18

    return load_resnet18("random")[1]


def synthetic_label(index: int) -> int:
    """Label of slide ``index``: pairs of slides share a patient, patients alternate classes."""
    return (index // 2) % 2


def _tissue_cells(rng: np.random.Generator, n_tiles: int) -> np.ndarray:
    """(n_tiles, 2) distinct grid cells (x, y) forming a roughly elliptic blob."""
    side = int(np.ceil(np.sqrt(n_tiles * 2.0))) + 2
    ys, xs = np.mgrid[0:side, 0:side]
    centre = (side - 1) / 2.0
    radii = rng.uniform(0.6, 1.0, size=2) * side / 2.0
    distance = ((xs - centre) / radii[0]) ** 2 + ((ys - centre) / radii[1]) ** 2
    order = np.argsort(distance.ravel() + rng.uniform(0, 0.05, size=distance.size), kind="stable")
    chosen = order[:n_tiles]
    return np.stack([xs.ravel()[chosen], ys.ravel()[chosen]], axis=1).astype(np.int64)


def _planted_signal(slide_rng: np.random.Generator, signature_strength: float, class_signal: np.ndarray) -> np.ndarray:
    """(D,) what every tile of a slide shares: a random slide signature plus its class's direction."""
    width = int(class_signal.shape[0])
    signature = slide_rng.standard_normal(width).astype(np.float32)
    signature *= signature_strength / np.linalg.norm(signature) * np.sqrt(width) / 4
    return signature + class_signal * 4


def write_synthetic_cohort(
    folder: str | Path,
    n_slides: int = 16,
    n_tiles: int = 64,
    n_augmentations: int = 4,
    bank_size: int = 32,
    seed: int = 0,
    planted: bool = True,
    *,
    signature_strength: float = 1.0,
    class_strength: float = 1.0,
    plain: bool = True,
    grid_attrs: dict | None = None,
    encoder: EncoderInfo | None = None,
) -> list[Path]:
    """Write ``n_slides`` feature files (plain features + bank) into ``folder``.

    Slide ``i`` is ``folder/slide_{i:03d}.h5`` with ``n_tiles`` plain tiles (N, D) and a bank of
    ``n_augmentations`` × ``bank_size`` tiles (sampled with replacement when
    ``bank_size > n_tiles``). With ``planted=False`` the features are pure noise (no slide
    signature, no class signal). ``plain=False`` writes the bank only (as ``gigassl extract
    --no-plain``); ``grid_attrs`` overrides attributes of the tile grid (``patch_size``,
    ``target_mpp`` …). ``encoder``: the provenance written (default: ``load_resnet18("random")``'s,
    D = 256); its ``width`` is D. Returns the paths in slide order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    encoder = encoder or random_encoder_info()
    width = encoder.width
    class_direction = rng.standard_normal(width).astype(np.float32)
    class_direction /= np.linalg.norm(class_direction)
    paths = []
    for index in range(n_slides):
        slide_rng = np.random.default_rng([seed, index])
        slide_id = f"slide_{index:03d}"
        cells = _tissue_cells(slide_rng, n_tiles)
        offset = slide_rng.integers(0, 50, size=2) * TILE_STEP_LEVEL0
        coords = cells * TILE_STEP_LEVEL0 + offset
        features = 1.0 + 0.5 * slide_rng.standard_normal((n_tiles, width)).astype(np.float32)
        if planted:
            features += _planted_signal(slide_rng, signature_strength, class_strength * synthetic_label(index) * class_direction)
        grid = dict(
            GRID_ATTRS,
            level0_width=int(coords[:, 0].max() + TILE_STEP_LEVEL0),
            level0_height=int(coords[:, 1].max() + TILE_STEP_LEVEL0),
            **(grid_attrs or {}),
        )
        with_replacement = bank_size > n_tiles
        path = folder / f"{slide_id}.h5"
        with SlideFileWriter(
            path,
            slide_id=slide_id,
            source=f"{slide_id}.synthetic",
            settings={"synthetic": True, "seed": seed, "planted": planted},
            encoder=encoder,
        ) as writer:
            if plain:
                writer.create_plain(coords, grid)
                writer.write_plain_rows(0, features)
            writer.create_bank(
                n_augmentations,
                bank_size,
                {
                    "seed": seed,
                    "sampled_with_replacement": with_replacement,
                    "augmentation": {"synthetic": True},
                },
                grid,
            )
            for a in range(n_augmentations):
                rows = slide_rng.choice(n_tiles, size=bank_size, replace=with_replacement)
                shift = 0.3 * slide_rng.standard_normal(width).astype(np.float32)
                jitter = 0.1 * slide_rng.standard_normal((bank_size, width)).astype(np.float32)
                writer.write_augmentation(a, features[rows] + shift + jitter, coords[rows])
        paths.append(path)
    write_synthetic_labels(folder / LABELS_FILE, n_slides)
    return paths


def write_synthetic_labels(path: Path, n_slides: int) -> None:
    """The labels CSV of a synthetic cohort: slide, its planted class, a patient per two slides."""
    with open(path, "w", newline="") as handle:
        table = csv.writer(handle)
        table.writerow(["slide", "label", "patient"])
        for index in range(n_slides):
            table.writerow([f"slide_{index:03d}", synthetic_label(index), f"patient_{index // 2:03d}"])
