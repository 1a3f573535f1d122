"""The ``gigassl extract`` batch job: a folder of slides → one HDF5 file per slide.

For the slides of this process's share, a background process opens each slide at its µm/px,
finds the tissue tile grid and writes a QC thumbnail ahead of time (:mod:`extract.batch.slide_plan`);
one DataLoader pass reads the tiles of all the slides in turn (:mod:`extract.tile_loader`), and
the main process encodes them in batches under autocast, channels_last, into
``OUT/features/{stem}.h5`` — plain features and/or the shared-augmentation bank. Files are
written to a temporary name and renamed when complete, so a killed run leaves nothing that
looks finished (its QC image is published only then too); a rerun deletes the temporary files
of jobs that have ended, and skips slides whose complete output exists and passes its
checksums — any other existing file is redone, and the log says why. A bad slide is logged on
one line and listed in the end-of-run summary (:mod:`extract.batch.summary`, written to
``OUT/summary[-shardI].json``, printed by the CLI); the others are still processed.

Scale-out: ``--shard i/n`` (SLURM arrays) and torchrun ranks (``RANK``/``WORLD_SIZE``) each
take an interleaved share of the sorted slide list (:mod:`extract.batch.slide_list`); no process
group is needed because ranks share nothing but the output folder
(:mod:`extract.batch.output_folder`), where each writes only its own slides' files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from extract.batch.output_folder import prepare_output
from extract.batch.shared_output import SharedOutput
from extract.batch.slide_list import SlideQueue, broken_links, list_slides, process_part, select_part
from extract.batch.slide_plan import PlanSettings, SlidePlanner
from extract.batch.summary import ExtractionSummary, SlideOutcome, count
from extract.config import ExtractConfig
from extract.device import rank_device
from extract.disk_errors import raise_if_disk_full
from extract.encoders.kinds import load_encoder
from extract.encoders.tile_encoder import EncoderInfo, TileEncoder, encode_batch
from extract.errors import UserError, one_line
from extract.features.manifest import check_existing
from extract.features.slide_file import SlideFileWriter
from extract.partial_files import remove_stale_partials_of
from extract.progress import progress
from extract.settings import settings_dict
from extract.slides.formats import open_slide
from extract.slides.reader import SLIDE_SUFFIXES, SlideReader, load_mpp_overrides
from extract.slides.tiling import TileGrid
from extract.tile_loader import ReadingWorkerDied, TileStream, is_worker_death

if TYPE_CHECKING:  # the bank pulls in the augmentations: imported only when a bank is asked for
    from extract.bank import DecodedTiles

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- settings


# Fields that say how a batch was run, not what a file holds: left out of the settings written
# into each file, so that two shards and one process write the same files.
RUN_CONTROL_FIELDS = frozenset(
    {"out", "overwrite", "strict", "shard", "num_workers", "qc", "progress_interval_s", "claim_timeout_s", "verify_all"}
)


# Settings whose change makes an existing file a different result (checked when skipping).
CONTENT_FIELDS = (
    "encoder",
    "encoder_input_size_px",
    "encoder_mean",
    "encoder_std",
    "target_mpp",
    "tile_size_px",
    "tissue_threshold",
    "max_ink_fraction",
    "n_augmentations",
    "n_tiles_per_augmentation",
    "seed",
)


def _comparable(value: Any) -> Any:
    """A setting as its JSON reads back (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


def settings_mismatch(stored: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """Content settings ``stored`` in a complete file that differ from ``settings``, as "name a → b"."""
    return [
        f"{name} {stored[name]!r} → {settings[name]!r}"
        for name in CONTENT_FIELDS
        if name in stored and name in settings and _comparable(stored[name]) != _comparable(settings[name])
    ]


def file_settings(config: ExtractConfig) -> dict[str, Any]:
    """The settings that shape a slide's file, as plain JSON-able data (paths as str)."""
    return settings_dict(config, drop=RUN_CONTROL_FIELDS)


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
    shared: SharedOutput


def _write_plain(writer: SlideFileWriter, path: Path, grid: TileGrid, job: _Job, bar: Any, keep_tiles: bool) -> np.ndarray | None:
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
) -> tuple[int, bool]:
    """Build the slide's bank from ``source`` and write it; returns A × K and whether it is finite."""
    from extract.bank import build_bank

    result = build_bank(source, grid, job.trunk, job.config, job.device, slide_id=source.slide_id, progress=bar.update)
    n_augmentations, n_tiles = result.features.shape[:2]
    writer.create_bank(n_augmentations, n_tiles, result.attrs, grid.attrs())
    for index in range(n_augmentations):
        writer.write_augmentation(index, result.features[index], result.coords[index])
    logger.debug("%s bank timings: %s", source.slide_id, result.timings)
    return n_augmentations * n_tiles, bool(np.isfinite(result.features).all())


def _keep_decoded(grid: TileGrid, config: ExtractConfig) -> bool:
    """Whether the plain pass keeps its decoded tiles for the bank (both are asked for, and they fit)."""
    from extract.bank import KEEP_DECODED_BYTES

    return config.plain and config.bank and len(grid) * grid.tile_size_px**2 * 3 <= KEEP_DECODED_BYTES


def extract_slide(path: Path, job: _Job, position: int = 1) -> SlideOutcome:
    """Extract one slide to ``features_dir/{stem}.h5`` and publish its QC image (raises on any problem)."""
    config = job.config
    started = time.perf_counter()
    remove_stale_partials_of(job.features_dir / f"{path.stem}.h5")
    grid = job.planner.plan(path)  # planned in the background while the previous slide was encoded
    bank_total = config.n_augmentations * config.n_tiles_per_augmentation if config.bank else 0
    total = (len(grid) if config.plain else 0) + bank_total
    n_bank, finite = 0, None
    target = job.features_dir / f"{path.stem}.h5"
    with (
        progress(
            total=total,
            desc=path.stem[:40],
            unit="tile",
            position=position,
            leave=False,
            interval_s=config.progress_interval_s,
            log=logger,
        ) as bar,
        SlideFileWriter(target, slide_id=path.stem, source=str(path), settings=job.settings, encoder=job.encoder) as writer,
    ):
        kept = _write_plain(writer, path, grid, job, bar, _keep_decoded(grid, config)) if config.plain else None
        if config.bank:
            from extract.bank import DecodedTiles

            with open_slide(path, grid.level0_mpp) as reader:
                source = DecodedTiles(reader, grid, kept) if kept is not None else reader
                n_bank, finite = _write_bank(writer, source, grid, job, bar)
    # Complete: its checksums were computed as it was written, its bank checked in memory.
    stored = json.loads(json.dumps(job.settings))  # as the file's attribute reads back
    job.shared.manifest.record(
        target, verified=True, finite=finite, has_plain=config.plain, has_bank=config.bank, settings=stored
    )
    job.planner.publish_qc(path)
    return SlideOutcome(
        path.name,
        "done",
        n_tiles=len(grid) if config.plain else 0,
        n_bank_tiles=n_bank,
        seconds=time.perf_counter() - started,
    )


# ----------------------------------------------------------------------------- the job


def _require_encoder(config: ExtractConfig) -> None:
    """The job needs a tile encoder (the settings alone may leave it out, e.g. to build a bank)."""
    if not config.encoder:
        raise UserError(
            "--encoder is required: a ResNet18/34/50 checkpoint (torchvision, MoCo, Lightning, or `gigassl "
            "pretrain-tiles` output), a torch.export .pt2 program, or 'random' for an untrained network"
        )


def _not_to_extract(
    path: Path, config: ExtractConfig, settings: dict[str, Any], shared: SharedOutput, owner: Path
) -> SlideOutcome | None:
    """The outcome of a slide that is not extracted (its stem is taken, its output exists), else None.

    An existing file that is redone is logged with the reason (damaged, incomplete, lacking
    what is asked for, or ``--overwrite``). An existing file is read whole only when it changed
    since the manifest recorded it verified (or with ``--verify-all``).
    """
    target = shared.target(path)
    if owner != path:
        reason = f"{path}: same file stem as {owner.name}, both would write {target.name}; rename one"
        logger.error("failed %s: %s", path.name, reason)
        return SlideOutcome(path.name, "failed", reason=reason)
    if not target.exists():
        return None
    if config.overwrite:
        logger.info("redoing %s: --overwrite", target)
        return None
    why_not, facts = check_existing(
        target, shared.manifest, require_plain=config.plain, require_bank=config.bank, full=config.verify_all
    )
    if why_not is not None or facts is None:
        logger.warning("redoing %s: %s", target, why_not)
        return None
    reason = "complete output exists"
    changed = settings_mismatch(facts.settings or {}, settings)
    if changed:
        reason += f" with other settings ({', '.join(changed)}); --overwrite or another --out to redo"
        logger.warning("skipping %s: %s", path.name, reason)
    return SlideOutcome(path.name, "skipped", reason=reason)


def _worker_died(error: BaseException) -> bool:
    """A tile-reading worker died: raised by the stream, or by DataLoader's SIGCHLD handler."""
    return isinstance(error, ReadingWorkerDied) or is_worker_death(error)


def _extract_or_fail(path: Path, job: _Job) -> SlideOutcome:
    """Extract one slide; a problem of the slide itself becomes a ``failed`` outcome.

    When a reading worker dies, the culprit may be a later slide the workers were reading
    ahead into: the slide is read again alone, and fails only if a worker dies again.
    """
    for attempt in (1, 2):
        try:
            return extract_slide(path, job)
        except Exception as error:  # noqa: BLE001 - one bad slide must not stop a cohort
            raise_if_disk_full(error, job.features_dir)  # … but a full disk stops it: every next slide would fail
            died = _worker_died(error)
            if died and attempt == 1 and job.config.plain:
                logger.warning("a tile-reading worker died while %s was extracted; reading it again alone", path.name)
                job.tiles.isolate(path)
                continue
            reason = (
                (
                    f"{path}: reading this slide kills the tile-reading worker (a fault in the slide library?); "
                    "check that the file opens in another viewer, or move it out of the folder"
                )
                if died
                else one_line(error, with_type=not isinstance(error, (UserError, OSError)))  # those name the file
            )
            if died or isinstance(error, (UserError, OSError)):
                logger.error("failed %s: %s", path.name, reason)
                logger.debug("traceback of %s", path.name, exc_info=True)
            else:  # a bug, not the slide's fault: its traceback, for the report; the cohort goes on
                logger.error("failed %s on an internal error (a bug; please report it): %s", path.name, reason, exc_info=True)
            return SlideOutcome(path.name, "failed", reason=reason)
    raise AssertionError("unreachable")


def _load_trunk(config: ExtractConfig, device: torch.device) -> tuple[TileEncoder, EncoderInfo]:
    """The tile encoder in eval mode, channels_last, on ``device``, and its provenance."""
    assert config.encoder is not None, "_validate refuses a missing --encoder"
    loaded = load_encoder(
        config.encoder,
        seed=config.seed,
        input_size_px=config.encoder_input_size_px,
        mean=config.encoder_mean,
        std=config.encoder_std,
    )
    # torch's Module.to overloads omit memory_format, which it accepts at run time
    trunk = loaded.trunk.to(device).eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if trunk.input_size_px is not None and trunk.input_size_px != config.tile_size_px:
        logger.info("tiles of %d px are resized to the encoder's input of %d px", config.tile_size_px, trunk.input_size_px)
    return trunk, loaded.info


def _ignored(others: list[Path], unusable: list[tuple[Path, str]]) -> list[SlideOutcome]:
    """``ignored`` outcomes (logged) of the files that are not slides and the entries that cannot be read."""
    outcomes = [SlideOutcome(p.name, "ignored", reason=f"extension {p.suffix or '(none)'} is not a slide format") for p in others]
    outcomes += [SlideOutcome(p.name, "ignored", reason=reason) for p, reason in unusable]
    for outcome in outcomes:
        logger.warning("ignoring %s: %s", outcome.slide, outcome.reason)
    return outcomes


def _plan_settings(config: ExtractConfig, qc_dir: Path) -> PlanSettings:
    return PlanSettings(
        config.target_mpp,
        config.tile_size_px,
        config.tissue_threshold,
        config.default_mpp,
        qc_dir if config.qc else None,
        config.grid_limits(),
        config.max_ink_fraction,
    )


def run_extraction(config: ExtractConfig) -> ExtractionSummary:
    """Run ``gigassl extract`` over this process's share of ``config.slides``.

    Returns the summary; its ``exit_code`` is 1 when every slide failed (or any, with
    ``strict``). Raises ``ValueError``/``FileNotFoundError``/``PermissionError`` for bad
    settings, a missing slide folder or an unwritable output folder.
    """
    started = time.perf_counter()
    _require_encoder(config)
    part, n_parts = process_part(config.shard)
    slides, others = list_slides(Path(config.slides))
    unusable = broken_links(Path(config.slides))
    if not slides:
        raise FileNotFoundError(
            f"--slides {config.slides}: no slide files (extensions {', '.join(sorted(SLIDE_SUFFIXES))}) "
            "and no DICOM slide folders"
        )
    out = Path(config.out)
    features_dir, qc_dir = prepare_output(out, config.qc)
    overrides = load_mpp_overrides(config.mpp_csv) if config.mpp_csv is not None else {}
    device = rank_device(config.device)
    trunk, encoder = _load_trunk(config, device)
    settings = file_settings(config)
    mine = select_part(slides, part, n_parts)
    ignored = _ignored(select_part(others, part, n_parts), select_part(unusable, part, n_parts))
    summary = ExtractionSummary(ignored, part, n_parts, strict=config.strict)
    logger.info(
        "extract: %s for part %d/%d, encoder %s (%s, %d-d) on %s",
        count(len(mine), "slide"),
        part + 1,
        n_parts,
        encoder.name,
        encoder.arch,
        encoder.width,
        device,
    )

    first_with_stem: dict[str, Path] = {}
    for path in slides:  # over all parts, so every shard agrees on who owns a stem
        first_with_stem.setdefault(path.stem, path)
    with SharedOutput(out, features_dir, config.claim_timeout_s) as shared:
        decided = {path: _not_to_extract(path, config, settings, shared, first_with_stem[path.stem]) for path in mine}
        summary.outcomes += [outcome for outcome in decided.values() if outcome is not None]
        todo = [path for path in mine if decided[path] is None]
        for path in todo:
            shared.note_before(path)
        # Slides are claimed one at a time as the pipeline reaches them (other jobs may share the
        # folder); the next ones are planned in the background, and the reading workers read
        # ahead through every slide the job takes, in one pass.
        queue = SlideQueue(todo, shared.take)
        planner = SlidePlanner(queue, overrides, _plan_settings(config, qc_dir))
        tiles = TileStream(
            queue if config.plain else [], planner.plan, config.batch_size, config.num_workers, pin_memory=device.type == "cuda"
        )
        job = _Job(config, trunk, encoder, device, settings, features_dir, tiles, planner, shared)
        try:
            bar = progress(queue, total=len(todo), desc="slides", unit="slide", interval_s=config.progress_interval_s, log=logger)
            for path in bar:
                outcome = _extract_or_fail(path, job)
                shared.finished(outcome, path)
                summary.outcomes.append(outcome)
                planner.forget(path)
        finally:
            tiles.close()
            planner.close()
        summary.folder = shared.folder_state()
    order = {path.name: index for index, path in enumerate(mine)}
    summary.outcomes.sort(key=lambda outcome: order.get(outcome.slide, -1))  # the ignored files first

    summary.seconds = time.perf_counter() - started
    summary.write(out)
    return summary
