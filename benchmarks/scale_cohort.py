"""Synthetic feature folders of TCGA-like size for ``bench_scale.py``.

Each slide gets a number of tissue tiles drawn from a log-normal spread (biopsies of a few dozen
tiles to resections of thousands; median ``median_tiles``), laid out as a blob of grid cells at
``gigassl.synthetic.cohort.TILE_STEP_LEVEL0`` level-0 pixels (the coords layout `gigassl extract`
writes), plain features (N, 256) float32 and a bank of A × K tiles sampled from them. Features
are non-negative like a ResNet's pooled ReLU outputs, so the bank compresses about as real banks
do (≈ 50 %). Written with the package's own writer, so every stage reads them; slides are
written by a process pool.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extract.features.slide_file import SlideFileWriter
from gigassl.synthetic.cohort import GRID_ATTRS, TILE_STEP_LEVEL0, random_encoder_info, write_synthetic_labels


@dataclass(frozen=True)
class CohortSpec:
    n_slides: int
    n_augmentations: int
    bank_size: int
    median_tiles: int = 300
    max_tiles: int = 5000
    seed: int = 0


def tiles_per_slide(spec: CohortSpec, index: int) -> int:
    rng = np.random.default_rng([spec.seed, index, 1])
    return int(np.clip(rng.lognormal(np.log(spec.median_tiles), 1.0), 16, spec.max_tiles))


def _cells(rng: np.random.Generator, n_tiles: int) -> np.ndarray:
    side = int(np.ceil(np.sqrt(n_tiles * 1.6))) + 2
    ys, xs = np.mgrid[0:side, 0:side]
    centre = (side - 1) / 2.0
    distance = ((xs - centre) / rng.uniform(0.7, 1.0)) ** 2 + ((ys - centre) / rng.uniform(0.7, 1.0)) ** 2
    chosen = np.argsort(distance.ravel() + rng.uniform(0, 0.5, distance.size))[:n_tiles]
    return np.stack([xs.ravel()[chosen], ys.ravel()[chosen]], axis=1).astype(np.int64)


def write_slide(folder: Path, spec: CohortSpec, index: int) -> None:
    rng = np.random.default_rng([spec.seed, index])
    encoder = random_encoder_info()
    n_tiles = tiles_per_slide(spec, index)
    coords = _cells(rng, n_tiles) * TILE_STEP_LEVEL0 + rng.integers(0, 50, 2) * TILE_STEP_LEVEL0
    signature = rng.standard_normal(encoder.width).astype(np.float32)
    features = np.maximum(rng.standard_normal((n_tiles, encoder.width), dtype=np.float32) + 0.3 * signature, 0)
    grid = dict(
        GRID_ATTRS,
        level0_width=int(coords[:, 0].max()) + TILE_STEP_LEVEL0,
        level0_height=int(coords[:, 1].max()) + TILE_STEP_LEVEL0,
    )
    slide_id = f"slide_{index:03d}"
    replace = spec.bank_size > n_tiles
    with SlideFileWriter(
        folder / f"{slide_id}.h5", slide_id=slide_id, source="scale.synthetic", settings={"synthetic": True}, encoder=encoder
    ) as writer:
        writer.create_plain(coords, grid)
        writer.write_plain_rows(0, features)
        writer.create_bank(
            spec.n_augmentations,
            spec.bank_size,
            {"seed": spec.seed, "sampled_with_replacement": replace, "augmentation": {}},
            grid,
        )
        for a in range(spec.n_augmentations):
            rows = rng.choice(n_tiles, size=spec.bank_size, replace=replace)
            shift = 0.2 * rng.standard_normal(encoder.width, dtype=np.float32)
            writer.write_augmentation(a, np.maximum(features[rows] + shift, 0), coords[rows])


def _write_range(folder: Path, spec: CohortSpec, start: int, stop: int) -> None:
    for index in range(start, stop):
        write_slide(folder, spec, index)


def write_cohort(folder: Path, spec: CohortSpec, workers: int | None = None) -> None:
    """Write ``spec.n_slides`` feature files and ``labels.csv`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    step = max(1, spec.n_slides // (workers * 8))
    with ProcessPoolExecutor(workers) as pool:
        for done in [
            pool.submit(_write_range, folder, spec, s, min(s + step, spec.n_slides)) for s in range(0, spec.n_slides, step)
        ]:
            done.result()
    write_synthetic_labels(folder / "labels.csv", spec.n_slides)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.iterdir() if p.is_file())


def evict(folder: Path) -> None:
    """Drop the files of ``folder`` from the page cache (``posix_fadvise(DONTNEED)``), so the next reads are cold."""
    os.sync()  # dirty pages are not dropped
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
