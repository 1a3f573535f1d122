"""The ``gigassl extract`` batch job: a folder of slides → one HDF5 file per slide.

For the slides of this process's share, a background process opens each slide at its µm/px,
finds the tissue tile grid and writes a QC thumbnail ahead of time (:mod:`extract.slide_plan`);
one DataLoader pass reads the tiles of all the slides in turn (:mod:`extract.tile_loader`), and
the main process encodes them in batches under autocast, channels_last, into
``OUT/features/{stem}.h5`` — plain features and/or the shared-augmentation bank. Files are
written to a temporary name and renamed when complete, so a killed run leaves nothing that
looks finished (its QC image is published only then too); a rerun deletes the temporary files
of jobs that have ended, and skips slides whose complete output exists and passes its
checksums — any other existing file is redone, and the log says why. A bad slide is logged on
one line and listed in the end-of-run summary (written to ``OUT/summary[-shardI].json``,
printed by the CLI); the others are still processed.

Scale-out: ``--shard i/n`` (SLURM arrays) and torchrun ranks (``RANK``/``WORLD_SIZE``) each
take an interleaved share of the sorted slide list; no process group is needed because ranks
share nothing but the output folder, where each writes only its own slides' files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from extract.config import settings_dict
from extract.config import ExtractConfig
from extract.device import autocast, rank_device
from extract.encoder import IMAGE_MEAN, IMAGE_STD, EncoderInfo, TileEncoder, load_encoder, parse_channel_stats
from extract.features_file import SlideFeatures, SlideFileWriter, why_incomplete
from extract.partial_files import remove_stale_partials, temporary_path
from extract.progress import progress
from extract.reader import SLIDE_SUFFIXES, SlideReader, load_mpp_overrides, open_slide
from extract.slide_plan import PlanSettings, SlidePlanner
from extract.tile_loader import ReadingWorkerDied, TileStream
from extract.tiling import TileGrid

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- bookkeeping


@dataclass
class SlideOutcome:
    """What happened to one slide: status is ``done``, ``skipped``, ``failed`` or ``ignored``."""

    slide: str
    status: str
    n_tiles: int = 0
    n_bank_tiles: int = 0
    seconds: float = 0.0
    reason: str = ""


@dataclass
class ExtractionSummary:
    """End-of-run summary of one process's share; ``exit_code`` is the command's status."""

    outcomes: list[SlideOutcome] = field(default_factory=list)
    part: int = 0
    n_parts: int = 1
    seconds: float = 0.0
    strict: bool = False

    def _with(self, status: str) -> list[SlideOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def done(self) -> list[SlideOutcome]:
        return self._with("done")

    @property
    def skipped(self) -> list[SlideOutcome]:
        return self._with("skipped")

    @property
    def failed(self) -> list[SlideOutcome]:
        return self._with("failed")

    @property
    def ignored(self) -> list[SlideOutcome]:
        return self._with("ignored")

    @property
    def tiles_per_second(self) -> float:
        """Tiles encoded (plain + bank) per second of slide processing."""
        seconds = sum(o.seconds for o in self.done)
        tiles = sum(o.n_tiles + o.n_bank_tiles for o in self.done)
        return tiles / seconds if seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """1 when every slide this run tried failed (skipped slides were not tried), or with
        ``strict`` when any failed; else 0."""
        if not self.failed:
            return 0
        return 1 if self.strict or not self.done else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "part": self.part,
            "n_parts": self.n_parts,
            "seconds": round(self.seconds, 3),
            "n_done": len(self.done),
            "n_skipped": len(self.skipped),
            "n_failed": len(self.failed),
            "n_ignored": len(self.ignored),
            "tiles_per_second": round(self.tiles_per_second, 2),
            "exit_code": self.exit_code,
            "slides": [dataclasses.asdict(o) for o in self.outcomes],
        }

    def format(self) -> str:
        """A short human-readable report."""
        lines = [
            f"extract: {count(len(self.outcomes) - len(self.ignored), 'slide')}: {len(self.done)} done, "
            f"{len(self.skipped)} skipped, {len(self.failed)} failed"
            + (f", {count(len(self.ignored), 'other file')} ignored" if self.ignored else "")
            + f" in {self.seconds:.1f} s ({self.tiles_per_second:.1f} tiles/s)"
            + (f" [part {self.part + 1}/{self.n_parts}]" if self.n_parts > 1 else "")
        ]
        lines += [f"  FAILED  {o.slide}: {o.reason}" for o in self.failed]
        lines += [f"  ignored {o.slide}: {o.reason}" for o in self.ignored]
        return "\n".join(lines)


def count(n: int, noun: str) -> str:
    """``count(1, "slide")`` → "1 slide", ``count(3, "slide")`` → "3 slides"."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


# ----------------------------------------------------------------------------- slide list


def list_slides(folder: Path) -> tuple[list[Path], list[Path]]:
    """Sorted files of ``folder``: (slide candidates by extension, other files to ignore).

    Hidden files and sub-folders (e.g. MIRAX data folders) are left out of both.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"--slides {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    slides = [p for p in files if p.suffix.lower() in SLIDE_SUFFIXES]
    others = [p for p in files if p.suffix.lower() not in SLIDE_SUFFIXES]
    return slides, others


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → (i, n) with 0 ≤ i < n."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n, e.g. 0/4 (SLURM: $SLURM_ARRAY_TASK_ID/N)") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {text!r}: need 0 ≤ i < n")
    return index, count


def process_part(shard: str) -> tuple[int, int]:
    """This process's part of the slide list: the shard refined by the torchrun rank, if any."""
    index, count = parse_shard(shard)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} / WORLD_SIZE={world} from the environment are inconsistent")
    return index * world + rank, count * world


def select_part(items: list[Path], part: int, n_parts: int) -> list[Path]:
    """Interleaved split: item j goes to part j mod n_parts (balances slide sizes sorted by name)."""
    return items[part::n_parts]


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` and check a file can be written there, else raise a clear PermissionError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise PermissionError(
            f"output folder {folder} is not writable ({error.strerror or error}); "
            "choose another --out or fix its permissions"
        ) from error


# Fields that say how a batch was run, not what a file holds: left out of the settings written
# into each file, so that two shards and one process write the same files.
RUN_CONTROL_FIELDS = frozenset({"out", "overwrite", "strict", "shard", "num_workers", "qc", "progress_interval_s"})


# Settings whose change makes an existing file a different result (checked when skipping).
CONTENT_FIELDS = ("encoder", "encoder_input_size_px", "encoder_mean", "encoder_std", "mpp", "tile_size", "tissue_threshold",
                  "max_ink_fraction", "n_augmentations", "n_tiles_per_augmentation", "seed")


def settings_mismatch(path: Path, settings: dict[str, Any]) -> list[str]:
    """Content settings of the complete file ``path`` that differ from ``settings``, as "name a → b"."""
    with SlideFeatures(path) as existing:
        stored = existing.settings
    return [
        f"{name} {stored[name]!r} → {settings[name]!r}"
        for name in CONTENT_FIELDS
        if name in stored and name in settings and stored[name] != settings[name]
    ]


def settings_of(config: ExtractConfig) -> dict[str, Any]:
    """The settings that shape a slide's file, as plain JSON-able data (paths as str)."""
    return settings_dict(config, drop=RUN_CONTROL_FIELDS)


# ----------------------------------------------------------------------------- tiles → features


def prepare_batch(tiles: torch.Tensor, device: torch.device, mean: tuple[float, ...] = IMAGE_MEAN,
                  std: tuple[float, ...] = IMAGE_STD) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float normalised with ``mean``/``std``, channels_last, on ``device``."""
    x = tiles.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    # NHWC storage permuted to NCHW is already channels_last; contiguous() keeps it so.
    return ((x - mean_t) / std_t).contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def encode_batch(tiles: torch.Tensor, trunk: TileEncoder, device: torch.device, mixed_precision: bool = True) -> np.ndarray:
    """(B, H, W, 3) uint8 tiles → (B, D) float32 features (D = ``trunk.feature_dim``)."""
    with autocast(device, mixed_precision):
        features = trunk(prepare_batch(tiles, device, trunk.mean, trunk.std))
    return features.float().cpu().numpy()


def encode_batches(
    loader: Iterable[torch.Tensor], trunk: TileEncoder, device: torch.device, mixed_precision: bool = True
) -> Iterator[np.ndarray]:
    """Yield (B, D) float32 features batch by batch (memory bounded by the batch size)."""
    for tiles in loader:
        yield encode_batch(tiles, trunk, device, mixed_precision)


# ----------------------------------------------------------------------------- one slide


@dataclass(frozen=True)
class _Job:
    """What every slide of the run shares."""

    config: ExtractConfig
    trunk: TileEncoder
    encoder: EncoderInfo
    device: torch.device
    settings: dict[str, Any]
    features_dir: Path
    tiles: TileStream
    planner: SlidePlanner


class DecodedTiles:
    """A tile source answering from tiles decoded by the plain pass, else from the slide.

    Lets the bank reuse the plain pass's pixels, so each tile is decoded once per slide when
    the slide's tiles fit ``KEEP_DECODED_BYTES``.
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


# Decoded tiles kept between the plain pass and the bank (a constant, not the slide's size).
KEEP_DECODED_BYTES = 512 << 20


def _write_plain(
    writer: SlideFileWriter, path: Path, grid: TileGrid, job: _Job, bar: Any, keep_tiles: bool
) -> np.ndarray | None:
    """Encode every tile into ``features``; returns the decoded tiles (N, H, W, 3) when asked to keep them."""
    config = job.config
    writer.create_plain(grid.coords, grid.attrs())
    side = grid.tile_size_px
    kept = np.empty((len(grid), side, side, 3), dtype=np.uint8) if keep_tiles else None
    start = 0
    with contextlib.closing(job.tiles.tiles(path, grid)) as batches:
        for tiles in batches:
            rows = encode_batch(tiles, job.trunk, job.device, config.mixed_precision)
            writer.write_plain_rows(start, rows)
            if kept is not None:
                kept[start : start + len(rows)] = tiles.numpy()
            start += len(rows)
            bar.update(len(rows))
    if start != len(grid):
        raise RuntimeError(f"{path}: encoded {start} tiles of {len(grid)}")
    return kept


def _write_bank(
    writer: SlideFileWriter, source: SlideReader | DecodedTiles, grid: TileGrid, job: _Job, bar: Any
) -> int:
    from extract.bank import build_bank  # the bank pulls in the augmentations; import only when asked for

    result = build_bank(source, grid, job.trunk, job.config, job.device, slide_id=source.slide_id, progress=bar.update)
    n_augmentations, n_tiles = result.features.shape[:2]
    writer.create_bank(n_augmentations, n_tiles, result.attrs, grid.attrs())
    for index in range(n_augmentations):
        writer.write_augmentation(index, result.features[index], result.coords[index])
    logger.debug("%s bank timings: %s", source.slide_id, result.timings)
    return n_augmentations * n_tiles


def extract_slide(path: Path, job: _Job, position: int = 1) -> SlideOutcome:
    """Extract one slide to ``features_dir/{stem}.h5`` and publish its QC image (raises on any problem)."""
    config = job.config
    started = time.perf_counter()
    remove_stale_partials(job.features_dir, f"{path.stem}.h5.")
    grid = job.planner.plan(path)  # planned in the background while the previous slide was encoded
    bank_total = config.n_augmentations * config.n_tiles_per_augmentation if config.bank else 0
    total = (len(grid) if config.plain else 0) + bank_total
    n_bank = 0
    with progress(total=total, desc=path.stem[:40], unit="tile", position=position, leave=False,
                  interval_s=config.progress_interval_s, log=logger) as bar, \
            SlideFileWriter(job.features_dir / f"{path.stem}.h5", slide_id=path.stem, source=str(path),
                            settings=job.settings, encoder=job.encoder) as writer:
        tile_bytes = grid.tile_size_px**2 * 3
        keep_tiles = config.plain and config.bank and len(grid) * tile_bytes <= KEEP_DECODED_BYTES
        kept = _write_plain(writer, path, grid, job, bar, keep_tiles) if config.plain else None
        if config.bank:
            with open_slide(path, grid.mpp) as reader:
                source = DecodedTiles(reader, grid, kept) if kept is not None else reader
                n_bank = _write_bank(writer, source, grid, job, bar)
    job.planner.publish_qc(path)
    return SlideOutcome(
        path.name, "done", n_tiles=len(grid) if config.plain else 0, n_bank_tiles=n_bank,
        seconds=time.perf_counter() - started,
    )


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):
        # Re-raised from a DataLoader worker: the message carries the worker's traceback,
        # whose last line is the original "Type: message".
        return lines[-1]
    text = " ".join(lines)
    known = isinstance(error, (ValueError, OSError))  # SlideReadError and friends name the file
    return text if known and text else f"{type(error).__name__}: {text}"


# ----------------------------------------------------------------------------- the job


def _validate(config: ExtractConfig) -> None:
    if not config.encoder:
        raise ValueError(
            "--encoder is required: a ResNet18/34/50 checkpoint (torchvision, MoCo, Lightning, or `gigassl "
            "pretrain-tiles` output), a torch.export .pt2 program, or 'random' for an untrained network"
        )
    if not (config.plain or config.bank):
        raise ValueError("nothing to do: both --no-plain and --no-bank given")
    if config.mpp <= 0 or not math.isfinite(config.mpp):
        raise ValueError(f"--mpp {config.mpp}: must be a positive µm/px (0.5 ≈ 20×, 1.0 ≈ 10×)")
    if config.tile_size < 16:
        raise ValueError(f"--tile-size {config.tile_size}: must be at least 16 px")
    if not 0.0 <= config.tissue_threshold <= 1.0:
        raise ValueError(f"--tissue-threshold {config.tissue_threshold}: must lie in [0, 1]")
    if config.batch_size < 1 or config.num_workers < 0:
        raise ValueError(f"--batch-size {config.batch_size} must be ≥ 1 and --num-workers {config.num_workers} ≥ 0")
    if config.default_mpp is not None and not config.default_mpp > 0:
        raise ValueError(f"--default-mpp {config.default_mpp}: must be positive")
    if config.bank and (config.n_augmentations < 1 or config.n_tiles_per_augmentation < 1):
        raise ValueError("--n-augmentations and --n-tiles-per-augmentation must be ≥ 1")


def _write_summary(path: Path, summary: ExtractionSummary) -> None:
    temp = temporary_path(path)
    temp.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    temp.replace(path)


def _not_to_extract(path: Path, config: ExtractConfig, settings: dict[str, Any], features_dir: Path,
                    owner: Path) -> SlideOutcome | None:
    """The outcome of a slide that is not extracted (its stem is taken, its output exists), else None.

    An existing file that is redone is logged with the reason (damaged, incomplete, lacking
    what is asked for, or ``--overwrite``).
    """
    target = features_dir / f"{path.stem}.h5"
    if owner != path:
        reason = f"{path}: same file stem as {owner.name}, both would write {target.name}; rename one"
        logger.error("failed %s: %s", path.name, reason)
        return SlideOutcome(path.name, "failed", reason=reason)
    if not target.exists():
        return None
    if config.overwrite:
        logger.info("redoing %s: --overwrite", target)
        return None
    why_not = why_incomplete(target, require_plain=config.plain, require_bank=config.bank, verify=True)
    if why_not is not None:
        logger.warning("redoing %s: %s", target, why_not)
        return None
    reason = "complete output exists"
    changed = settings_mismatch(target, settings)
    if changed:
        reason += f" with other settings ({', '.join(changed)}); --overwrite or another --out to redo"
        logger.warning("skipping %s: %s", path.name, reason)
    return SlideOutcome(path.name, "skipped", reason=reason)


def _worker_died(error: BaseException) -> bool:
    """A tile-reading worker died: raised by the stream, or by DataLoader's SIGCHLD handler."""
    return isinstance(error, ReadingWorkerDied) or (
        isinstance(error, RuntimeError) and "DataLoader worker" in str(error) and "exited unexpectedly" in str(error))


def _extract_or_fail(path: Path, job: _Job) -> SlideOutcome:
    """Extract one slide; a problem of the slide itself becomes a ``failed`` outcome.

    When a reading worker dies, the culprit may be a later slide the workers were reading
    ahead into: the slide is read again alone, and fails only if a worker dies again.
    """
    for attempt in (1, 2):
        try:
            return extract_slide(path, job)
        except Exception as error:  # noqa: BLE001 - one bad slide must not stop a cohort
            died = _worker_died(error)
            if died and attempt == 1 and job.config.plain:
                logger.warning("a tile-reading worker died while %s was extracted; reading it again alone", path.name)
                job.tiles.isolate(path)
                continue
            reason = (f"{path}: reading this slide kills the tile-reading worker (a fault in the slide library?); "
                      "check that the file opens in another viewer, or move it out of the folder") if died else _one_line(error)
            logger.error("failed %s: %s", path.name, reason)
            logger.debug("traceback of %s", path.name, exc_info=True)
            return SlideOutcome(path.name, "failed", reason=reason)
    raise AssertionError("unreachable")


def run_extraction(config: ExtractConfig) -> ExtractionSummary:
    """Run ``gigassl extract`` over this process's share of ``config.slides``.

    Returns the summary; its ``exit_code`` is 1 when every slide failed (or any, with
    ``strict``). Raises ``ValueError``/``FileNotFoundError``/``PermissionError`` for bad
    settings, a missing slide folder or an unwritable output folder.
    """
    started = time.perf_counter()
    _validate(config)
    part, n_parts = process_part(config.shard)
    slides, others = list_slides(Path(config.slides))
    if not slides:
        raise FileNotFoundError(
            f"--slides {config.slides}: no slide files (extensions {', '.join(sorted(SLIDE_SUFFIXES))})"
        )
    out = Path(config.out)
    features_dir, qc_dir = out / "features", out / "qc"
    ensure_writable(out)
    ensure_writable(features_dir)
    if config.qc:
        ensure_writable(qc_dir)
    for folder in (out, features_dir, qc_dir):  # left by jobs that ended; a running job's survive
        if folder.is_dir():
            remove_stale_partials(folder)
    overrides = load_mpp_overrides(config.mpp_csv) if config.mpp_csv is not None else {}

    device = rank_device(config.device)
    assert config.encoder is not None, "_validate refuses a missing --encoder"
    loaded = load_encoder(config.encoder, seed=config.seed, input_size_px=config.encoder_input_size_px,
                          mean=parse_channel_stats(config.encoder_mean, "--encoder-mean"),
                          std=parse_channel_stats(config.encoder_std, "--encoder-std", positive=True))
    trunk, encoder = loaded.trunk.to(device).eval().to(memory_format=torch.channels_last), loaded.info  # type: ignore[call-overload]  # torch's Module.to overloads omit memory_format, accepted at runtime
    if trunk.input_size_px is not None and trunk.input_size_px != config.tile_size:
        logger.info("tiles of %d px are resized to the encoder's input of %d px", config.tile_size, trunk.input_size_px)
    settings = settings_of(config)
    mine = select_part(slides, part, n_parts)
    summary = ExtractionSummary(part=part, n_parts=n_parts, strict=config.strict)
    first_with_stem: dict[str, Path] = {}
    for path in slides:  # over all parts, so every shard agrees on who owns a stem
        first_with_stem.setdefault(path.stem, path)
    summary.outcomes += [
        SlideOutcome(p.name, "ignored", reason=f"extension {p.suffix or '(none)'} is not a slide format")
        for p in select_part(others, part, n_parts)
    ]
    for outcome in summary.ignored:
        logger.warning("ignoring %s: %s", outcome.slide, outcome.reason)
    logger.info("extract: %s for part %d/%d, encoder %s (%s, %d-d) on %s", count(len(mine), "slide"), part + 1, n_parts,
                encoder.name, encoder.arch, encoder.width, device)

    decided = {path: _not_to_extract(path, config, settings, features_dir, first_with_stem[path.stem]) for path in mine}
    todo = [path for path in mine if decided[path] is None]

    # The next slides are planned in the background, and the reading workers read ahead
    # through every slide of the job in one pass.
    planner = SlidePlanner(todo, overrides, PlanSettings(config.mpp, config.tile_size, config.tissue_threshold,
                                                         config.default_mpp, qc_dir if config.qc else None,
                                                         config.grid_limits(), config.max_ink_fraction))
    tiles = TileStream(todo if config.plain else [], planner.plan, config.batch_size, config.num_workers,
                       pin_memory=device.type == "cuda")
    job = _Job(config, trunk, encoder, device, settings, features_dir, tiles, planner)
    try:
        for path in progress(mine, desc="slides", unit="slide", position=0, interval_s=config.progress_interval_s,
                             log=logger):
            known = decided[path]
            summary.outcomes.append(known if known is not None else _extract_or_fail(path, job))
            planner.forget(path)
    finally:
        tiles.close()
        planner.close()

    summary.seconds = time.perf_counter() - started
    name = "summary.json" if n_parts == 1 else f"summary-shard{part}.json"
    _write_summary(out / name, summary)
    return summary
