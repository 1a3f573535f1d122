"""Training views of slides: a validated cohort index, a two-view Dataset and its batching.

One training view of a slide = one of its A bank augmentations picked at random, T of that
augmentation's K tiles (without replacement when K ≥ T), their level-0 coords turned into grid
cells, a slide-level augmentation of the map (flips, rotation, per-axis scale) and the merging
of tiles that land on one cell. Only the chosen augmentation is read from disk.

Randomness: the views of slide ``i`` in epoch ``e`` depend only on ``(seed, stream, e, i)``, so
a run is reproducible whatever the number of DataLoader workers or ranks, and a resumed run
draws exactly the views the uninterrupted run would have drawn. The batch sampler yields
``(epoch, index)`` keys, which is how the epoch reaches persistent workers.

Bad input, decided once here:

- an empty or missing folder: ``FileNotFoundError``;
- files without a bank, incomplete or unreadable: ``FeatureFileError`` listing all of them,
  or, with ``skip_bad_files``, a warning listing them and training on the rest;
- banks with fewer than T tiles per augmentation: views sample with replacement (warning
  listing the slides);
- NaN or inf in a bank: ``FeatureFileError`` naming the file (checked for every bank up front
  with ``check_finite`` — a bank recorded finite in the folder's manifest since it last changed
  is not read again — and for every augmentation read during training in any case);
- files extracted on different tile grids (tile size in pixels, µm/px): ``FeatureFileError``
  listing the grids and a file of each — a grid cell must mean the same tissue for every
  slide — unless ``allow_mixed_grids`` (a warning; the grids are recorded in the checkpoint).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from extract.encoders.tile_encoder import EncoderInfo
from extract.errors import UserError
from extract.features.bank_chunks import BankChunkReader, locate_bank_chunks
from extract.features.manifest import Manifest
from extract.features.slide_file import FeatureFileError, SlideFeatures
from gigassl.sparse.maps import SparseBatch, augment_cells, collate_views, tile_cells
from gigassl.training.slide_entry import SlideEntry, entry_from_record, entry_record

log = logging.getLogger(__name__)

FEATURE_SUFFIX = ".h5"


def feature_files_in(folder: str | Path) -> list[Path]:
    """The per-slide feature files (``*.h5``) of a folder, sorted by name; a missing or empty
    folder is a one-line error saying where the features come from."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"features folder {folder} does not exist; run `gigassl extract` first")
    files = sorted(folder.glob(f"*{FEATURE_SUFFIX}"))
    if not files:
        raise FileNotFoundError(
            f"features folder {folder} holds no *{FEATURE_SUFFIX} files; point --features "
            "at the `features` folder written by `gigassl extract`"
        )
    return files


STREAM_TRAIN = 0  # seed streams: training views, monitor views, epoch permutations
STREAM_MONITOR = 1
STREAM_PERMUTATION = 2
MAX_OPEN_FILES = 256  # per worker; HDF5 handles are cheap but not free


@dataclass(frozen=True)
class Cohort:
    """The slides of a features folder that training reads, and those it skipped (path, reason)."""

    folder: Path
    slides: tuple[SlideEntry, ...]
    skipped: tuple[tuple[Path, str], ...] = ()

    @property
    def slide_ids(self) -> list[str]:
        return [entry.slide_id for entry in self.slides]

    @property
    def encoder(self) -> EncoderInfo:
        """The tile encoder that embedded every slide (the scan refuses mixed encoders)."""
        return self.slides[0].encoder

    def grids(self) -> list[dict[str, float | int | None]]:
        """The tile grids of the slides: [{"tile_size_px", "mpp", "n_slides"}], most common first."""
        counts: dict[tuple[int | None, float | None], int] = {}
        for entry in self.slides:
            counts[entry.grid] = counts.get(entry.grid, 0) + 1
        return [
            dict(tile_size_px=size, mpp=mpp, n_slides=n) for (size, mpp), n in sorted(counts.items(), key=lambda item: -item[1])
        ]


def _list_reasons(items: Sequence[tuple[Path, str]], limit: int = 10) -> str:
    lines = [f"  {path.name}: {reason}" for path, reason in items[:limit]]
    if len(items) > limit:
        lines.append(f"  … and {len(items) - limit} more")
    return "\n".join(lines)


def _scan_one(path: Path, check_finite: bool, manifest: Manifest | None = None, recheck: bool = False) -> SlideEntry:
    """The entry of one file. Rebuilt from ``manifest`` without opening the file when it has not
    changed since it was scanned (and, with ``check_finite``, found finite), unless ``recheck``;
    else the file is scanned (its bank read whole with ``check_finite``) and the result recorded."""
    known = manifest.known(path) if manifest is not None and not recheck else None
    if known is not None and known.train_entry and (known.finite or not check_finite):
        cached = entry_from_record(path, known.train_entry)
        if cached is not None:
            return cached
    learnt: dict = {}
    with SlideFeatures(path, require_bank=True) as slide:
        attrs = slide.bank_attrs
        encoder = _bank_encoder(attrs, int(slide.file["aug_features"].shape[1]))
        if slide.bank_size < 1 or slide.n_augmentations < 1:
            raise FeatureFileError(f"{path}: empty bank ({slide.n_augmentations} × {slide.bank_size})")
        if check_finite and not (known is not None and known.finite):
            for a in range(slide.n_augmentations):
                features, _ = slide.augmentation(a)
                if not np.isfinite(features).all():
                    raise FeatureFileError(
                        f"{path}: NaN or inf in augmentation {a} of the bank; re-extract this slide "
                        "(`gigassl extract --overwrite`) or move the file out of the folder"
                    )
            learnt["finite"] = True
        entry = SlideEntry(
            path,
            slide.slide_id,
            slide.n_augmentations,
            slide.bank_size,
            slide.tile_step_level0,
            encoder,
            _grid(slide.grid_attrs),
            locate_bank_chunks(slide),
        )
    if manifest is not None:
        manifest.record(path, train_entry=entry_record(entry), **learnt)
    return entry


def _bank_encoder(attrs: dict, width: int) -> EncoderInfo:
    """The tile encoder a bank's attributes name; files from before the architecture attributes
    were ResNet18s. ``width`` (D) is the bank's own."""
    name = str(attrs.get("encoder", "unknown"))
    source = str(attrs.get("encoder_source", "random" if name == "random" else "file"))
    return EncoderInfo(
        name,
        str(attrs.get("encoder_sha256", "")),
        source,
        str(attrs.get("encoder_arch", "resnet18")),
        width,
        str(attrs.get("encoder_layout", "")),
    )


def _grid(attrs: dict) -> tuple[int | None, float | None]:
    """(tile size in pixels, µm/px of the tiles) of a file's grid attributes (None where unsaid)."""
    size, mpp = attrs.get("patch_size"), attrs.get("target_mpp")
    return (None if size is None else int(size), None if mpp is None else round(float(mpp), 4))


def _check_one_grid(folder: Path, slides: Sequence[SlideEntry], allow_mixed_grids: bool) -> None:
    """Refuse (or, when allowed, warn about) slides extracted on different tile grids."""
    grids: dict[tuple[int | None, float | None], list[SlideEntry]] = {}
    for entry in slides:
        grids.setdefault(entry.grid, []).append(entry)
    if len(grids) < 2:
        return
    described = "; ".join(
        f"{size} px at {mpp} µm/px: {len(members)} file{'s' * (len(members) != 1)} (e.g. {members[0].path.name})"
        for (size, mpp), members in sorted(grids.items(), key=lambda item: -len(item[1]))
    )
    if not allow_mixed_grids:
        raise FeatureFileError(
            f"the files in {folder} were extracted on {len(grids)} different tile grids ({described}); a grid "
            "cell must be the same size of tissue for every slide: re-extract them with one --target-mpp and --tile-size-px, "
            "or pass --allow-mixed-grids to train on them anyway (recorded in the checkpoint)"
        )
    log.warning("training on %d different tile grids (--allow-mixed-grids): %s", len(grids), described)


def scan_features_folder(
    folder: str | Path,
    n_tiles_per_view: int,
    *,
    skip_bad_files: bool = False,
    check_finite: bool = True,
    allow_mixed_grids: bool = False,
    recheck_finite: bool = False,
) -> Cohort:
    """Validate the per-slide HDF5 files of ``folder`` for training (see the module docstring).

    The NaN/inf scan (``check_finite``) reads only the banks that changed since the folder's
    manifest (:mod:`extract.features.manifest`) recorded them finite, or every bank with ``recheck_finite``.
    """
    paths = feature_files_in(folder)
    manifest = Manifest(Path(folder))
    if n_tiles_per_view < 1:
        raise UserError(f"n_tiles_per_view must be ≥ 1, got {n_tiles_per_view}")
    slides, bad = [], []
    for path in paths:
        try:
            slides.append(_scan_one(path, check_finite, manifest, recheck_finite))
        except FeatureFileError as error:
            nan = "NaN or inf" in str(error)
            if nan:  # never skipped: a corrupt bank is a problem to fix, not to hide
                raise
            bad.append((path, str(error).removeprefix(f"{path}: ")))
    if bad and not skip_bad_files:
        raise FeatureFileError(
            f"{len(bad)} of {len(paths)} files in {folder} cannot be used for training:\n"
            f"{_list_reasons(bad)}\ntraining reads the augmented bank, which only `gigassl extract --bank` writes "
            "(TRIDENT/CLAM feature files have none: embed and evaluate read those); extract the bank with the same "
            "tile encoder as the other files, move them out of the folder, or pass --skip-bad-files to train on the others"
        )
    if bad:
        log.warning("skipping %d of %d files in %s:\n%s", len(bad), len(paths), folder, _list_reasons(bad))
    if not slides:
        raise FileNotFoundError(f"no usable feature file in {folder}")
    encoders = {(s.encoder.name, s.encoder.sha256, s.encoder.width) for s in slides}
    if len(encoders) > 1:
        by_encoder = [(s.path, f"encoder {s.encoder.name} ({s.encoder.sha256[:12]}, {s.encoder.width}-d)") for s in slides]
        raise FeatureFileError(
            f"the files in {folder} were embedded by {len(encoders)} different tile encoders:\n"
            f"{_list_reasons(by_encoder)}\ntrain on features of one encoder only"
        )
    _check_one_grid(Path(folder), slides, allow_mixed_grids)
    small = [s for s in slides if s.bank_size < n_tiles_per_view]
    if small:
        log.warning(
            "%d slides have fewer than T = %d tiles per augmentation; their views sample tiles "
            "with replacement (duplicates are merged): %s",
            len(small),
            n_tiles_per_view,
            ", ".join(f"{s.slide_id} (K={s.bank_size})" for s in small[:10]) + (" …" if len(small) > 10 else ""),
        )
    return Cohort(Path(folder), tuple(slides), tuple(bad))


def view_seed(seed: int, stream: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of slide ``index``'s views in ``epoch`` (independent of workers and ranks)."""
    return np.random.default_rng([seed, stream, epoch, index])


View = tuple[np.ndarray, np.ndarray]  # (features (t, 256) float32, cells (t, 2) int64 (x, y))


class SlideViewDataset(Dataset):
    """Two augmented views per slide, keyed by ``(epoch, slide_index)``.

    ``dataset[(e, i)]`` → ``(i, view_1, view_2)``, each view ``(features (T, 256) float32,
    cells (T, 2) int64)``; tiles that share a cell are averaged by the collate
    (:func:`gigassl.sparse.maps.collate_views`). HDF5 files are opened lazily in the process
    that reads them (each DataLoader worker its own handles).
    """

    def __init__(
        self,
        cohort: Cohort,
        n_tiles_per_view: int,
        scale_range: tuple[float, float] = (0.5, 2.0),
        seed: int = 0,
        stream: int = STREAM_TRAIN,
    ) -> None:
        self.slides = cohort.slides
        self.n_tiles_per_view = n_tiles_per_view
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.seed = seed
        self.stream = stream
        self._handles: dict[int, SlideFeatures] = {}
        self._pid = os.getpid()
        self._chunk_reader = BankChunkReader(MAX_OPEN_FILES)

    def __len__(self) -> int:
        return len(self.slides)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open HDF5 files never cross a process boundary
        return state

    def _open(self, index: int) -> SlideFeatures:
        if self._pid != os.getpid():  # forked into a worker: the parent's handles are not ours
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(index)
        if handle is None:
            if len(self._handles) >= MAX_OPEN_FILES:
                oldest = next(iter(self._handles))
                self._handles.pop(oldest).close()
            handle = SlideFeatures(self.slides[index].path, require_bank=True)
            self._handles[index] = handle
        return handle

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles = {}
        self._chunk_reader.close()

    def view(self, index: int, rng: np.random.Generator) -> View:
        """One view of slide ``index``: features (t, 256) float32, cells (t, 2) int64."""
        entry = self.slides[index]
        augmentation = int(rng.integers(entry.n_augmentations))
        replace = entry.bank_size < self.n_tiles_per_view
        rows = rng.choice(entry.bank_size, size=self.n_tiles_per_view, replace=replace)
        if entry.chunks is not None:  # one pread + inflate, no h5py (see extract.features.bank_chunks)
            features, coords = self._chunk_reader.read(entry.chunks, augmentation, rows)
        else:
            features, coords = self._open(index).augmentation(augmentation, rows)
        if not np.isfinite(features).all():
            raise FeatureFileError(f"{entry.path}: NaN or inf in augmentation {augmentation} of the bank; re-extract this slide")
        cells = tile_cells(coords, entry.tile_step_level0)
        cells = augment_cells(cells, rng, self.scale_range)
        return features, cells

    def views(self, epoch: int, index: int) -> tuple[View, View]:
        """The two views of slide ``index`` in ``epoch``."""
        rng = view_seed(self.seed, self.stream, epoch, index)
        return self.view(index, rng), self.view(index, rng)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, View, View]:
        epoch, index = key
        return (index, *self.views(epoch, index))


@dataclass(frozen=True)
class ViewBatch:
    """Both views of B slides as one sparse batch of 2B maps: maps 0…B-1 are the first views,
    B…2B-1 the second views of the same slides, in the same order."""

    sparse: SparseBatch
    slide_indices: torch.Tensor  # (B,) int64

    @property
    def n_slides(self) -> int:
        return len(self.slide_indices)

    def pin_memory(self) -> "ViewBatch":
        return ViewBatch(self.sparse.pin_memory(), self.slide_indices)


def collate_slide_views(items: Sequence[tuple[int, View, View]]) -> ViewBatch:
    """``collate_fn`` of the DataLoader: B items ``(index, view_1, view_2)`` → :class:`ViewBatch`."""
    sparse = collate_views([item[1] for item in items] + [item[2] for item in items])
    return ViewBatch(sparse, torch.tensor([item[0] for item in items], dtype=torch.int64))


def global_batch_size(requested: int, n_slides: int, world_size: int) -> int:
    """Slides per optimisation step over all ranks: the request capped at the cohort size and
    rounded down to a multiple of the world size (each rank gets the same share)."""
    batch = min(requested, n_slides)
    batch -= batch % world_size
    if batch < 2:
        raise UserError(
            f"a step needs at least 2 slides (NT-Xent contrasts slides) and a multiple of the "
            f"{world_size} ranks; the cohort has {n_slides} slides and batch_size is {requested}"
        )
    if batch != requested:
        log.info("batch of %d slides per step (asked for %d; cohort of %d, %d ranks)", batch, requested, n_slides, world_size)
    return batch


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, slide_index)`` keys for one rank.

    Each epoch shuffles the slides with a generator seeded by ``(seed, epoch)``, cuts the
    permutation into global batches of ``global_batch`` slides (the incomplete last batch is
    dropped, so every step contrasts a full batch) and gives rank ``r`` the ``r``-th contiguous
    share of each. Call :meth:`set_epoch` before iterating; ``set_epoch(first, last)`` makes
    one pass run through several epochs in turn, so that DataLoader workers prefetch the next
    epoch's first batches instead of idling at every epoch boundary.
    """

    def __init__(self, n_slides: int, global_batch: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if global_batch % world_size or global_batch > n_slides:
            raise ValueError(f"global batch {global_batch} must divide among {world_size} ranks and be ≤ {n_slides} slides")
        self.n_slides, self.global_batch, self.seed = n_slides, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch = global_batch // world_size
        self.epoch = self.last_epoch = 0

    def set_epoch(self, epoch: int, last_epoch: int | None = None) -> None:
        """Iterate epoch ``epoch`` only, or epochs ``epoch`` … ``last_epoch`` one after the other."""
        last_epoch = epoch if last_epoch is None else last_epoch
        if last_epoch < epoch:
            raise ValueError(f"last epoch {last_epoch} comes before first epoch {epoch}")
        self.epoch, self.last_epoch = epoch, last_epoch

    @property
    def steps_per_epoch(self) -> int:
        return self.n_slides // self.global_batch

    def __len__(self) -> int:
        return self.steps_per_epoch * (self.last_epoch - self.epoch + 1)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch in range(self.epoch, self.last_epoch + 1):
            order = np.random.default_rng([self.seed, STREAM_PERMUTATION, epoch]).permutation(self.n_slides)
            for step in range(self.steps_per_epoch):
                batch = order[step * self.global_batch : (step + 1) * self.global_batch]
                local = batch[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]
                yield [(epoch, int(index)) for index in local]
