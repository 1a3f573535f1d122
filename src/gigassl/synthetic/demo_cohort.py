"""The demo cohort: small synthetic whole-slide images painted from real Kather 2016 tiles.

Each slide is a real pyramidal TIFF (tiled, deflate, levels at downsample 1, 2, 4, …, µm/px
in the resolution tags, so OpenSlide reports ``openslide.mpp-x``). Tissue is a few smooth
random blobs over a white background; inside, regions of one tissue class are filled with
that class's Kather tiles, flipped and rotated at random. The slide label is whether tumour
texture (``01_TUMOR``) is present (labels balanced). Every slide also gets its own stain
shift, a random linear map in optical-density space (white stays white) — a nuisance that a
good slide representation must ignore.

The 24 tiles (3 per class, 150×150 px at 0.495 µm/px) ship inside the package:
Kather et al. 2016, "Multi-class texture analysis in colorectal cancer histology",
Zenodo record 53169, CC BY 4.0 (see ``gigassl/assets/kather2016/ATTRIBUTION.md``).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from extract.errors import UserError

logger = logging.getLogger(__name__)

KATHER_MPP = 0.495
TUMOUR_CLASS = "01_TUMOR"
# 08_EMPTY is background-like and 07_ADIPOSE mostly white; both stay as normal tissue classes
# except EMPTY, which would blur the tissue/background distinction.
NORMAL_CLASSES = ("02_STROMA", "03_COMPLEX", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA", "07_ADIPOSE")
COHORT_MANIFEST = "cohort.json"
LABELS_CSV = "labels.csv"
SLIDES_FOLDER = "slides"
MANIFEST_FORMAT = "gigassl-demo-cohort"
MANIFEST_VERSION = 2  # 2: ground-truth class maps beside the slides
BACKGROUND_RGB = 242
# Optical-density colour vectors of haematoxylin, eosin and DAB (Ruifrok & Johnston 2001);
# DAB stands in for the residual channel of H&E.
_HED_VECTORS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
# Tissue blobs and class regions are drawn on a grid this many times coarser than level 0,
# then upsampled; 4 px steps are invisible at the tile sizes the demo extracts. The random
# fields behind them are smoothed on a much coarser grid (cheap) and interpolated.
_FIELD_STEP = 4
CLASS_MAP_STEP_PX = _FIELD_STEP  # level-0 px per cell of the ground-truth class maps
CLASS_MAPS_FOLDER = "class_maps"
_NOISE_STEP = 32


@dataclass(frozen=True)
class CohortSettings:
    """How the demo slides are drawn (all sizes in level-0 pixels at :data:`KATHER_MPP`)."""

    n_slides: int = 40
    seed: int = 0
    width_px: int = 1536
    height_px: int = 1152
    n_levels: int = 3
    tile_px: int = 256
    tissue_fraction: tuple[float, float] = (0.45, 0.65)
    tumour_fraction: tuple[float, float] = (0.3, 0.55)
    blob_sigma_px: float = 240.0
    region_sigma_px: float = 160.0
    stain_strength: float = 0.08


@dataclass(frozen=True)
class DemoSlide:
    """What the manifest records about one slide (label, tumour share, its stain map)."""

    slide: str
    label: int
    tissue_fraction: float
    tumour_fraction: float
    stain_matrix: list[list[float]]


def kather_tiles_dir() -> Path:
    """Folder of the Kather 2016 tiles shipped inside the package (one sub-folder per class)."""
    folder = Path(str(resources.files("gigassl") / "assets" / "kather2016"))
    if not (folder / TUMOUR_CLASS).is_dir():
        raise FileNotFoundError(
            f"{folder}: the packaged Kather 2016 tiles are missing; reinstall gigassl "
            "(the wheel must include gigassl/assets/kather2016/*/*)"
        )
    return folder


def load_kather_tiles(folder: Path | None = None) -> dict[str, list[np.ndarray]]:
    """Class name → list of (150, 150, 3) uint8 RGB tiles, in sorted file order."""
    folder = kather_tiles_dir() if folder is None else Path(folder)
    tiles: dict[str, list[np.ndarray]] = {}
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in {".tif", ".tiff", ".png", ".jpg"})
        tiles[class_dir.name] = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    missing = [c for c in (TUMOUR_CLASS, *NORMAL_CLASSES) if not tiles.get(c)]
    if missing:
        raise FileNotFoundError(f"{folder}: no tiles for classes {missing}; expected one sub-folder per class")
    return tiles


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-variance smooth random field on the (h, w) grid of step :data:`_FIELD_STEP`.

    ``sigma_px`` is the correlation length in level-0 pixels.
    """
    ratio = _NOISE_STEP // _FIELD_STEP
    coarse_shape = (-(-shape[0] // ratio) + 1, -(-shape[1] // ratio) + 1)
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape), sigma_px / _NOISE_STEP, mode="wrap")
    field = ndimage.zoom(coarse, ratio, order=3, grid_mode=False)[: shape[0], : shape[1]]
    return (field - field.mean()) / (field.std() + 1e-12)


def _quantile_mask(values: np.ndarray, within: np.ndarray, fraction: float) -> np.ndarray:
    """The ``fraction`` of ``within`` where ``values`` is largest."""
    threshold = np.quantile(values[within], 1.0 - fraction)
    return within & (values >= threshold)


def _class_map(rng: np.random.Generator, settings: CohortSettings, positive: bool) -> tuple[np.ndarray, float, float]:
    """Coarse (h, w) int map: -1 background, 0 tumour, 1… normal classes; tissue and tumour shares."""
    step = _FIELD_STEP
    shape = (settings.height_px // step, settings.width_px // step)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    # A centred bump keeps the tissue away from the borders, like a section on a glass slide.
    bump = -(((yy / shape[0] - 0.5) / 0.35) ** 2 + ((xx / shape[1] - 0.5) / 0.35) ** 2)
    tissue_field = _smooth_field(rng, shape, settings.blob_sigma_px) + 2.0 * bump
    tissue_share = float(rng.uniform(*settings.tissue_fraction))
    tissue = _quantile_mask(tissue_field, np.ones(shape, bool), tissue_share)

    normal = np.stack([_smooth_field(rng, shape, settings.region_sigma_px) for _ in NORMAL_CLASSES])
    # Per-slide class weights, so slides differ in their mix of normal tissue.
    normal += rng.normal(0.0, 0.7, size=(len(NORMAL_CLASSES), 1, 1))
    classes = np.where(tissue, 1 + normal.argmax(axis=0), -1)
    tumour_share = 0.0
    if positive:
        tumour_share = float(rng.uniform(*settings.tumour_fraction))
        tumour_field = _smooth_field(rng, shape, settings.region_sigma_px)
        classes[_quantile_mask(tumour_field, tissue, tumour_share)] = 0
    return classes, float(tissue.mean()), tumour_share


def _texture(rng: np.random.Generator, tiles: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8 canvas tiled with random flips/rot90 of ``tiles``, random grid offset."""
    side = tiles[0].shape[0]
    rows, cols = height // side + 2, width // side + 2
    canvas = np.empty((rows * side, cols * side, 3), np.uint8)
    for r in range(rows):
        for c in range(cols):
            tile = tiles[int(rng.integers(len(tiles)))]
            tile = np.rot90(tile, k=int(rng.integers(4)))
            if rng.integers(2):
                tile = tile[:, ::-1]
            canvas[r * side : (r + 1) * side, c * side : (c + 1) * side] = tile
    dy, dx = rng.integers(side, size=2)
    return canvas[dy : dy + height, dx : dx + width]


def random_stain_matrix(rng: np.random.Generator, strength: float) -> np.ndarray:
    """(3, 3) map of optical densities, ``od_out = od_in @ matrix``, that re-stains a slide.

    Optical densities are unmixed into haematoxylin, eosin and residual concentrations with
    Ruifrok & Johnston's vectors, the H and E concentrations are scaled and their colour
    vectors tilted at random (by about ``strength``), then mixed back: plausible H&E shifts.
    """
    stains = _HED_VECTORS / np.linalg.norm(_HED_VECTORS, axis=1, keepdims=True)
    shifted = stains.copy()
    shifted[:2] = np.abs(stains[:2] + rng.normal(0.0, strength, size=(2, 3)))
    shifted /= np.linalg.norm(shifted, axis=1, keepdims=True)
    gains = np.exp(np.r_[rng.normal(0.0, 1.5 * strength, size=2), 0.0])
    return np.linalg.inv(stains) @ np.diag(gains) @ shifted


def apply_stain(rgb: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a stain map to (H, W, 3) uint8 RGB in optical-density space; white stays white."""
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)
    od = np.clip(od @ matrix.astype(np.float32), 0.0, None)
    return np.clip(256.0 * np.exp(-od) - 1.0, 0, 255).round().astype(np.uint8)


def paint_slide(
    rng: np.random.Generator, tiles: dict[str, list[np.ndarray]], settings: CohortSettings, positive: bool
) -> tuple[np.ndarray, DemoSlide, np.ndarray]:
    """One slide's level-0 (H, W, 3) uint8 RGB, its record (slide id left empty) and its ground
    truth: the coarse class map (one cell per ``CLASS_MAP_STEP_PX`` level-0 px, -1 background,
    0 tumour, 1… the normal classes in ``NORMAL_CLASSES`` order)."""
    classes, tissue_share, tumour_share = _class_map(rng, settings, positive)
    step = _FIELD_STEP
    full = np.repeat(np.repeat(classes, step, axis=0), step, axis=1)
    height, width = settings.height_px, settings.width_px
    full = np.pad(full, ((0, height - full.shape[0]), (0, width - full.shape[1])), mode="edge")

    image = np.full((height, width, 3), BACKGROUND_RGB, np.uint8)
    for index, name in enumerate((TUMOUR_CLASS, *NORMAL_CLASSES)):
        where = full == index
        if where.any():
            image[where] = _texture(rng, tiles[name], height, width)[where]

    matrix = random_stain_matrix(rng, settings.stain_strength)
    image = apply_stain(image, matrix)
    record = DemoSlide("", int(positive), round(tissue_share, 4), round(tumour_share, 4), matrix.round(6).tolist())
    return image, record, classes


def write_class_map(path: Path, classes: np.ndarray) -> None:
    """The ground-truth class map as an 8-bit PNG: 255 background, 0 tumour, 1… normal classes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(classes < 0, 255, classes).astype(np.uint8)).save(path)


def read_class_map(path: Path) -> np.ndarray:
    """A map written by :func:`write_class_map`, back to -1 background, 0 tumour, 1… normal."""
    values = np.asarray(Image.open(path)).astype(np.int64)
    return np.where(values == 255, -1, values)


def write_pyramidal_tiff(path: Path, image: np.ndarray, mpp: float, n_levels: int, tile_px: int, description: str) -> None:
    """Tiled deflate TIFF with levels at downsample 1, 2, 4, … and µm/px in the resolution tags.

    Levels go into the main IFD chain (what OpenSlide's generic-TIFF reader expects);
    resolution is in pixels per centimetre, which OpenSlide turns into ``openslide.mpp-x``.
    """
    import tifffile

    temp = path.with_name(path.name + ".partial")
    level = Image.fromarray(image)
    with tifffile.TiffWriter(temp) as writer:
        for index in range(n_levels):
            downsample = 2**index
            if index:
                level = level.reduce(2)
            per_cm = 1e4 / (mpp * downsample)
            writer.write(
                np.asarray(level),
                tile=(tile_px, tile_px),
                compression="zlib",
                predictor=True,
                photometric="rgb",
                resolution=(per_cm, per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if index == 0 else 1,
                description=description if index == 0 else None,
                metadata=None,
            )
    temp.replace(path)


def _slide_labels(n_slides: int, seed: int) -> np.ndarray:
    """Balanced 0/1 labels (one more negative when ``n_slides`` is odd), shuffled by ``seed``."""
    labels = np.arange(n_slides) < n_slides // 2
    np.random.default_rng([seed, 7]).shuffle(labels)
    return labels


def _manifest_matches(folder: Path, settings: CohortSettings) -> bool:
    manifest = folder / COHORT_MANIFEST
    if not manifest.is_file() or not (folder / LABELS_CSV).is_file():
        return False
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False
    same = data.get("format_version") == MANIFEST_VERSION and data.get("settings") == json.loads(json.dumps(asdict(settings)))
    return same and all(
        (folder / SLIDES_FOLDER / f"{s['slide']}.tiff").is_file() and (folder / CLASS_MAPS_FOLDER / f"{s['slide']}.png").is_file()
        for s in data.get("slides", [])
    )


def write_demo_cohort(
    folder: str | Path,
    n_slides: int = 40,
    seed: int = 0,
    *,
    settings: CohortSettings | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> tuple[list[Path], Path]:
    """Write ``folder/slides/demo_000.tiff …`` plus ``folder/labels.csv`` and ``folder/cohort.json``.

    Returns (slide paths, labels CSV path). The labels CSV has columns ``slide,label``
    (1 = tumour texture present); ``class_maps/{slide}.png`` is each slide's ground truth
    (:func:`write_class_map`); ``cohort.json`` records each slide's label, tissue and
    tumour shares and stain map. Slides get their own sub-folder so that it can be handed
    to ``gigassl extract`` as is. The same ``seed`` gives the same files; a folder that
    already holds this exact cohort is reused unless ``overwrite``.
    """
    base = settings or CohortSettings()
    settings = CohortSettings(**{**asdict(base), "n_slides": n_slides, "seed": seed})
    if n_slides < 2:
        raise UserError(f"n_slides={n_slides}: the demo cohort needs at least 2 slides (one per label)")
    folder = Path(folder)
    slides_dir = folder / SLIDES_FOLDER
    slides_dir.mkdir(parents=True, exist_ok=True)
    names = [f"demo_{i:03d}" for i in range(n_slides)]
    paths = [slides_dir / f"{name}.tiff" for name in names]
    if not overwrite and _manifest_matches(folder, settings):
        logger.info("reusing the demo cohort in %s (%d slides)", folder, n_slides)
        return paths, folder / LABELS_CSV

    tiles = load_kather_tiles()
    labels = _slide_labels(n_slides, seed)
    records = []
    iterator = zip(range(n_slides), names, paths)
    if progress:
        from extract.progress import progress as progress_bar

        iterator = progress_bar(iterator, total=n_slides, desc="demo slides", unit="slide", log=logger)
    for index, name, path in iterator:
        rng = np.random.default_rng([seed, index])
        image, record, classes = paint_slide(rng, tiles, settings, bool(labels[index]))
        write_class_map(folder / CLASS_MAPS_FOLDER / f"{name}.png", classes)
        record = DemoSlide(name, *list(asdict(record).values())[1:])
        description = (
            f"gigassl synthetic demo slide {name}; label={record.label}; painted from Kather et al. 2016 "
            "tiles (Zenodo 53169, CC BY 4.0)"
        )
        write_pyramidal_tiff(path, image, KATHER_MPP, settings.n_levels, settings.tile_px, description)
        records.append(record)

    labels_csv = folder / LABELS_CSV
    with labels_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide", "label"])
        writer.writerows((r.slide, r.label) for r in records)
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "mpp": KATHER_MPP,
        "class_maps": {"folder": CLASS_MAPS_FOLDER, "step_px": CLASS_MAP_STEP_PX, "background": 255, "tumour": 0},
        "settings": asdict(settings),
        "slides": [asdict(r) for r in records],
        "source": "Kather et al. 2016, Zenodo record 53169, CC BY 4.0",
    }
    (folder / COHORT_MANIFEST).write_text(json.dumps(manifest, indent=1))
    logger.info("wrote %d demo slides to %s", n_slides, folder)
    return paths, labels_csv
