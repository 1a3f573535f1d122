"""The shared-augmentation bank of one slide: A augmentations × K tiles, embedded.

For each augmentation ``a`` (DESIGN.md §1, stage 1 step 2):

1. sample K of the slide's N tissue tiles, without replacement when N ≥ K, with replacement
   otherwise (``attrs['sampled_with_replacement']``);
2. draw one tile augmentation (:mod:`extract.augment`) and apply it to all K tiles;
3. embed them with the frozen tile encoder → (K, D), stored with the tiles' level-0 coords
   (D = the encoder's ``feature_dim``: 256 for ResNet18/34, 1024 for ResNet50, any for an
   exported program; images normalised with the encoder's ``mean`` / ``std``).

Randomness comes from one ``numpy.random.SeedSequence`` of (``config.seed``, slide id): the
same seed gives identical arrays on the same machine, different slides get different draws,
and augmentation ``a`` does not depend on A (a bank of 10 is the first 10 of a bank of 50).

Work saved without changing a single value: a tile drawn twice in one augmentation (sampling
with replacement) is embedded once and its row copied — same pixels, same augmentation, same
output; decoded tiles are kept for the whole slide when the sampled tiles fit
``cache_budget_bytes`` (a slide with fewer than K tiles is then read once), else re-read.
The next batch is read by ``config.num_workers`` threads while the current one is augmented
and encoded. Peak memory is two batches of tiles plus that budget, whatever the slide's size.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch

from extract.augment import AugmentationParams, TileAugmentation
from extract.config import ExtractConfig
from extract.device import autocast, autocast_dtype
from extract.encoder import TileEncoder

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BUDGET_BYTES = 1 << 30
FEW_TILES_WARNING = 5


class TileSource(Protocol):
    """What the bank needs of a slide reader (:class:`extract.reader.SlideReader`)."""

    def read_tile(self, x0: int, y0: int, size_level0: float, out_px: int) -> np.ndarray: ...


class Grid(Protocol):
    """What the bank needs of a tile grid (:class:`extract.tiling.TileGrid`)."""

    @property
    def coords(self) -> np.ndarray: ...  # (N, 2) int64 level-0 top-left x, y

    @property
    def size_level0(self) -> float: ...


@dataclass(frozen=True)
class BankResult:
    """One slide's bank, ready for :meth:`SlideFileWriter.create_bank` / ``write_augmentation``."""

    features: np.ndarray  # (A, K, D) float16
    coords: np.ndarray  # (A, K, 2) int64 level-0 top-left x, y
    indices: np.ndarray  # (A, K) int64 rows of grid.coords
    attrs: dict[str, Any]  # plain JSON-able values, stored on aug_features
    timings: dict[str, float] = field(default_factory=dict)  # seconds reading, augmenting, encoding


def slide_seed_sequence(seed: int, slide_id: str) -> np.random.SeedSequence:
    """The bank's root of randomness for one slide (stable across runs and machines)."""
    digest = hashlib.sha256(slide_id.encode("utf-8")).digest()
    return np.random.SeedSequence([int(seed), int.from_bytes(digest[:8], "little")])


def sample_tile_indices(
    n_tissue_tiles: int, n_augmentations: int, n_tiles: int, rng: np.random.Generator
) -> tuple[np.ndarray, bool]:
    """(A, K) int64 tile rows, one uniform draw per augmentation, and whether with replacement."""
    if n_tissue_tiles < 1:
        raise ValueError("no tissue tiles to sample a bank from")
    with_replacement = n_tissue_tiles < n_tiles
    rows = [rng.choice(n_tissue_tiles, size=n_tiles, replace=with_replacement) for _ in range(n_augmentations)]
    return np.stack(rows).astype(np.int64), with_replacement


class _TileCache:
    """Decoded uint8 tiles, read on first use and kept when the slide's sampled tiles fit."""

    def __init__(self, reader: TileSource, grid: Grid, tile_px: int, keep: bool) -> None:
        self.reader, self.grid, self.tile_px, self.keep = reader, grid, tile_px, keep
        self.tiles: dict[int, np.ndarray] = {}
        self.n_reads = 0
        self._lock = threading.Lock()

    def get(self, row: int) -> np.ndarray:
        tile = self.tiles.get(row)
        if tile is None:
            x0, y0 = (int(v) for v in self.grid.coords[row])
            tile = self.reader.read_tile(x0, y0, float(self.grid.size_level0), self.tile_px)
            if tile.shape != (self.tile_px, self.tile_px, 3) or tile.dtype != np.uint8:
                raise ValueError(
                    f"reader returned a {tile.shape} {tile.dtype} tile at ({x0}, {y0}); "
                    f"expected ({self.tile_px}, {self.tile_px}, 3) uint8"
                )
            with self._lock:
                self.n_reads += 1
            if self.keep:
                self.tiles[row] = tile
        return tile

    def read_batch(self, rows: np.ndarray, pool: ThreadPoolExecutor) -> np.ndarray:
        """(b, H, W, 3) uint8 tiles of ``rows``, read in parallel (OpenSlide releases the GIL)."""
        return np.stack(list(pool.map(self.get, (int(row) for row in rows))))


class _Clock:
    """Accumulates wall time per stage; waits for the GPU so that its time lands where it is spent."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, {"read": 0.0, "augment": 0.0, "encode": 0.0}
        self._last = time.perf_counter()

    def start(self) -> None:
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[stage] += now - self._last
        self._last = now


def build_bank(
    reader: TileSource,
    grid: Grid,
    trunk: TileEncoder,
    config: ExtractConfig,
    device: torch.device,
    *,
    slide_id: str | None = None,
    augmentation: TileAugmentation | None = None,
    cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
    progress: Callable[[int], None] | None = None,
) -> BankResult:
    """Embed ``config.n_augmentations`` shared augmentations of ``config.n_tiles_per_augmentation``
    tiles of one slide → :class:`BankResult` with features (A, K, D) float16.

    ``trunk``: the frozen tile encoder (D = ``trunk.feature_dim``) in eval mode on ``device``. ``slide_id`` seeds the draws
    (default ``reader.slide_id``). ``progress`` is called with K after each augmentation.
    """
    n_augmentations, n_tiles, tile_px = config.n_augmentations, config.n_tiles_per_augmentation, config.tile_size
    if n_augmentations < 1 or n_tiles < 1:
        raise ValueError(f"bank of {n_augmentations} augmentations × {n_tiles} tiles: both must be ≥ 1")
    if trunk.training:
        raise ValueError("the trunk is in training mode (batch-norm would use batch statistics); call trunk.eval()")
    slide_id = slide_id if slide_id is not None else getattr(reader, "slide_id", None)
    if slide_id is None:
        raise ValueError("build_bank needs the slide id to seed its draws: pass slide_id= or a reader with .slide_id")
    coords = np.asarray(grid.coords, dtype=np.int64).reshape(-1, 2)
    if len(coords) == 0:
        raise ValueError(
            f"{slide_id}: no tissue tiles, so no bank can be sampled; lower --tissue-threshold or check the slide"
        )
    augmentation = augmentation or TileAugmentation()

    tile_seeds, augmentation_seed = slide_seed_sequence(config.seed, slide_id).spawn(2)
    indices, with_replacement = sample_tile_indices(
        len(coords), n_augmentations, n_tiles, np.random.default_rng(tile_seeds)
    )
    if len(coords) < FEW_TILES_WARNING:
        logger.warning("%s: only %d tissue tiles; the bank repeats them (sampled with replacement)", slide_id, len(coords))
    generator = torch.Generator().manual_seed(int(augmentation_seed.generate_state(1, np.uint64)[0] >> 1))
    sampled = np.unique(indices)
    keep = len(sampled) * tile_px * tile_px * 3 <= cache_budget_bytes
    cache = _TileCache(reader, grid, tile_px, keep)

    work_dtype = (autocast_dtype(device) if config.mixed_precision else None) or torch.float32
    draws = [augmentation.sample(1, tile_px, generator) for _ in range(n_augmentations)]
    # Each augmentation embeds its distinct tiles once (sorted: reads in grid order).
    distinct = [np.unique(indices[a], return_inverse=True) for a in range(n_augmentations)]
    batches = [
        (a, start, rows[start : start + config.batch_size])
        for a, (rows, _) in enumerate(distinct)
        for start in range(0, len(rows), config.batch_size)
    ]
    embedded = [np.empty((len(rows), trunk.feature_dim), dtype=np.float16) for rows, _ in distinct]
    features = np.empty((n_augmentations, n_tiles, trunk.feature_dim), dtype=np.float16)
    clock = _Clock(device)
    # The next batch is read in background threads while this one is augmented and encoded.
    with ThreadPoolExecutor(1) as prefetch, ThreadPoolExecutor(max(1, config.num_workers)) as readers:
        pending = prefetch.submit(cache.read_batch, batches[0][2], readers)
        for i, (a, start, rows) in enumerate(batches):
            clock.start()
            tiles = pending.result()
            clock.lap("read")
            if i + 1 < len(batches):
                pending = prefetch.submit(cache.read_batch, batches[i + 1][2], readers)
            embedded[a][start : start + len(rows)] = _embed(
                tiles, draws[a], augmentation, trunk, device, work_dtype, config.mixed_precision, clock
            )
            if start + len(rows) == len(embedded[a]):
                features[a] = embedded[a][distinct[a][1].reshape(-1)]
                if progress is not None:
                    progress(n_tiles)

    attrs = {
        "n_augmentations": n_augmentations,
        "n_tiles": n_tiles,
        "seed": int(config.seed),
        "sampled_with_replacement": bool(with_replacement),
        "n_tissue_tiles": int(len(coords)),
        "augmentation": {
            "settings": augmentation.settings.to_json(),
            "draws": [draw for params in draws for draw in params.to_json()],
        },
    }
    n_encoded = sum(len(rows) for rows, _ in distinct)
    timings = dict(clock.seconds, n_encoded=float(n_encoded), n_reads=float(cache.n_reads))
    return BankResult(features=features, coords=coords[indices], indices=indices, attrs=attrs, timings=timings)


def _embed(
    tiles: np.ndarray,
    params: AugmentationParams,
    augmentation: TileAugmentation,
    trunk: TileEncoder,
    device: torch.device,
    work_dtype: torch.dtype,
    mixed_precision: bool,
    clock: _Clock,
) -> np.ndarray:
    """Augment (b, H, W, 3) uint8 tiles with one shared draw and embed them → (b, D) float16."""
    images = torch.from_numpy(tiles).to(device, non_blocking=True).permute(0, 3, 1, 2)
    images = augmentation.apply(images, params, normalize=(trunk.mean, trunk.std), dtype=work_dtype)
    images = images.contiguous(memory_format=torch.channels_last)
    clock.lap("augment")
    with torch.inference_mode(), autocast(device, enabled=mixed_precision):
        out = trunk(images)
    out = out.float().cpu().numpy().astype(np.float16)
    clock.lap("encode")
    return out
