"""The shared-augmentation bank of one slide: A augmentations × K tiles, embedded.

For each augmentation ``a`` (docs/design.md §1.1, step 2):

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

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np
import torch

from extract.augment import AugmentationParams, TileAugmentation
from extract.config import ExtractConfig
from extract.device import autocast, autocast_dtype
from extract.encoders.tile_encoder import TileEncoder
from extract.errors import UserError
from extract.seeding import slide_seed_sequence

if TYPE_CHECKING:
    from extract.slides.reader import SlideReader
    from extract.slides.tiling import TileGrid

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BUDGET_BYTES = 1 << 30
FEW_TILES_WARNING = 5
# Decoded tiles kept between the plain pass and the bank (a constant, not the slide's size).
KEEP_DECODED_BYTES = 512 << 20


class TileSource(Protocol):
    """What the bank needs of a slide reader (:class:`extract.slides.reader.SlideReader`)."""

    def read_tile(self, x0: int, y0: int, size_level0: float, out_px: int) -> np.ndarray: ...


class Grid(Protocol):
    """What the bank needs of a tile grid (:class:`extract.slides.tiling.TileGrid`)."""

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


def sample_tile_indices(
    n_tissue_tiles: int, n_augmentations: int, n_tiles_per_augmentation: int, rng: np.random.Generator
) -> tuple[np.ndarray, bool]:
    """(A, K) int64 tile rows, one uniform draw per augmentation, and whether with replacement."""
    if n_tissue_tiles < 1:
        raise ValueError("no tissue tiles to sample a bank from")
    with_replacement = n_tissue_tiles < n_tiles_per_augmentation
    rows = [rng.choice(n_tissue_tiles, size=n_tiles_per_augmentation, replace=with_replacement) for _ in range(n_augmentations)]
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


class DecodedTiles:
    """A tile source answering from tiles decoded by the plain pass, else from the slide.

    Lets the bank reuse the plain pass's pixels, so each tile is decoded once per slide when
    the slide's tiles fit ``KEEP_DECODED_BYTES``. ``tiles`` (N, H, W, 3) uint8 are the rows of
    ``grid.coords``.
    """

    def __init__(self, reader: SlideReader, grid: TileGrid, tiles: np.ndarray) -> None:
        self.reader, self.slide_id = reader, reader.slide_id
        self._tiles, self._size_level0, self._tile_px = tiles, grid.size_level0, grid.tile_size_px
        self._rows = {(int(x), int(y)): row for row, (x, y) in enumerate(grid.coords)}

    def read_tile(self, x0: int, y0: int, size_level0: float, out_px: int) -> np.ndarray:
        row = self._rows.get((int(x0), int(y0)))
        if row is None or out_px != self._tile_px or abs(size_level0 - self._size_level0) > 1e-9:
            return self.reader.read_tile(x0, y0, size_level0, out_px)
        return self._tiles[row]


class _DrawEmbedder:
    """Applies one augmentation draw to a batch of tiles and embeds them, timing both on ``clock``."""

    def __init__(self, trunk: TileEncoder, augmentation: TileAugmentation, device: torch.device, mixed_precision: bool) -> None:
        self.trunk, self.augmentation, self.device, self.mixed_precision = trunk, augmentation, device, mixed_precision
        self.work_dtype = (autocast_dtype(device) if mixed_precision else None) or torch.float32
        self.clock = _Clock(device)

    def __call__(self, tiles: np.ndarray, params: AugmentationParams) -> np.ndarray:
        """Augment (b, H, W, 3) uint8 tiles with one shared draw and embed them → (b, D) float16."""
        images = torch.from_numpy(tiles).to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        images = self.augmentation.apply(images, params, normalize=(self.trunk.mean, self.trunk.std), dtype=self.work_dtype)
        images = images.contiguous(memory_format=torch.channels_last)
        self.clock.lap("augment")
        with torch.inference_mode(), autocast(self.device, enabled=self.mixed_precision):
            out = self.trunk(images)
        out = out.float().cpu().numpy().astype(np.float16)
        self.clock.lap("encode")
        return out


def _check_inputs(reader: TileSource, grid: Grid, trunk: TileEncoder, config: ExtractConfig, slide_id: str | None) -> str:
    """The slide id that seeds the draws; raises on a bank that cannot be built."""
    if config.n_augmentations < 1 or config.n_tiles_per_augmentation < 1:
        raise UserError(
            f"bank of {config.n_augmentations} augmentations × {config.n_tiles_per_augmentation} tiles: both must be ≥ 1"
        )
    if trunk.training:
        raise ValueError("the trunk is in training mode (batch-norm would use batch statistics); call trunk.eval()")
    slide_id = slide_id if slide_id is not None else getattr(reader, "slide_id", None)
    if slide_id is None:
        raise ValueError("build_bank needs the slide id to seed its draws: pass slide_id= or a reader with .slide_id")
    if len(grid.coords) == 0:
        raise UserError(f"{slide_id}: no tissue tiles, so no bank can be sampled; lower --tissue-threshold or check the slide")
    if len(grid.coords) < FEW_TILES_WARNING:
        logger.warning("%s: only %d tissue tiles; the bank repeats them (sampled with replacement)", slide_id, len(grid.coords))
    return slide_id


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
    slide_id = _check_inputs(reader, grid, trunk, config, slide_id)
    coords = np.asarray(grid.coords, dtype=np.int64).reshape(-1, 2)
    augmentation = augmentation or TileAugmentation()
    tile_seeds, augmentation_seed = slide_seed_sequence(config.seed, slide_id).spawn(2)
    indices, with_replacement = sample_tile_indices(
        len(coords), config.n_augmentations, config.n_tiles_per_augmentation, np.random.default_rng(tile_seeds)
    )
    generator = torch.Generator().manual_seed(int(augmentation_seed.generate_state(1, np.uint64)[0] >> 1))
    draws = [augmentation.sample(1, config.tile_size_px, generator) for _ in range(config.n_augmentations)]
    keep = len(np.unique(indices)) * config.tile_size_px**2 * 3 <= cache_budget_bytes
    cache = _TileCache(reader, grid, config.tile_size_px, keep)
    embed = _DrawEmbedder(trunk, augmentation, device, config.mixed_precision)
    features, n_encoded = _embed_augmentations(indices, draws, cache, embed, config, progress)
    attrs = {
        "n_augmentations": config.n_augmentations,
        "n_tiles": config.n_tiles_per_augmentation,  # K, under the attribute name of the file format
        "seed": int(config.seed),
        "sampled_with_replacement": bool(with_replacement),
        "n_tissue_tiles": int(len(coords)),
        "augmentation": {
            "settings": augmentation.settings.to_json(),
            "draws": [draw for params in draws for draw in params.to_json()],
        },
    }
    timings = dict(embed.clock.seconds, n_encoded=float(n_encoded), n_reads=float(cache.n_reads))
    return BankResult(features=features, coords=coords[indices], indices=indices, attrs=attrs, timings=timings)


def _embed_augmentations(
    indices: np.ndarray,
    draws: list[AugmentationParams],
    cache: _TileCache,
    embed: _DrawEmbedder,
    config: ExtractConfig,
    progress: Callable[[int], None] | None,
) -> tuple[np.ndarray, int]:
    """(A, K, D) float16 features of the (A, K) tile rows ``indices``, and the number of tiles encoded.

    Each augmentation embeds its distinct tiles once (sorted: reads in grid order); the next
    batch is read in background threads while this one is augmented and encoded.
    """
    distinct = [np.unique(rows, return_inverse=True) for rows in indices]
    batch_size = config.batch_size
    batches = [
        (a, start, rows[start : start + batch_size])
        for a, (rows, _) in enumerate(distinct)
        for start in range(0, len(rows), batch_size)
    ]
    width = embed.trunk.feature_dim
    embedded = [np.empty((len(rows), width), dtype=np.float16) for rows, _ in distinct]
    features = np.empty((*indices.shape, width), dtype=np.float16)
    clock = embed.clock
    with ThreadPoolExecutor(1) as prefetch, ThreadPoolExecutor(max(1, config.num_workers)) as readers:
        pending = prefetch.submit(cache.read_batch, batches[0][2], readers)
        for i, (a, start, rows) in enumerate(batches):
            clock.start()
            tiles = pending.result()
            clock.lap("read")
            if i + 1 < len(batches):
                pending = prefetch.submit(cache.read_batch, batches[i + 1][2], readers)
            embedded[a][start : start + len(rows)] = embed(tiles, draws[a])
            if start + len(rows) == len(embedded[a]):
                features[a] = embedded[a][distinct[a][1].reshape(-1)]
                if progress is not None:
                    progress(indices.shape[1])
    return features, sum(len(rows) for rows, _ in distinct)
