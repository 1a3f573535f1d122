"""``gigassl embed``: one L2-normalised W-d vector per slide from a trained checkpoint.

For every slide, ``n_views`` (R, default 50) views of ``n_tiles_per_view`` (T, default the
checkpoint's) tiles are drawn from the *plain* features — no tile augmentation, no slide-level
augmentation (the original's "plain" features were augmented; docs/design.md §2.3) — placed on their
grid cells with the features file's ``tile_step_level0`` (the divisor training uses), run
through the sparse head and pooled to W-d (before the projector; W = 512, or 2048 for a ResNet50
head: the checkpoint's ``architecture``), averaged over the R views
and L2-normalised. A slide's views depend only on the seed and its id (its own generator), so
embeddings do not depend on the batch or the order of the folder. Slides are processed
``batch_size`` at a time and appended to the output, so memory does not grow with the cohort.

The output file (an HDF5 file of slide ids, (S, W) embeddings and their provenance) and its
``--export npz,csv`` copies are described, written and read by :mod:`gigassl.embeddings_file`.

Inputs are checked per slide, and a slide that fails is listed in ``failed`` (the run goes on;
``--strict`` makes the exit status non-zero): unreadable files, files without tiles, NaN or inf
features (:mod:`extract.features.plain`, which also reads TRIDENT/CLAM-layout files), features
of another width than the model takes ("features are 1024-d, this model expects 256-d"),
features made by another tile encoder than the checkpoint was trained on (by the hash both
record; ``--allow-other-encoder`` embeds them anyway) and a slide id already taken by another
file of the folder (a copied file: the file named after the id is kept, else the first by
name). ``encoder_sha256`` in the output is the features' own tile encoder (comma-separated
when several were allowed); ``checkpoint_encoder_sha256`` the one the checkpoint was trained on.
Files that do not record their tile encoder's sha256 (TRIDENT/CLAM files, which lack this
package's provenance) are embedded when their width matches, with a warning that their encoder
cannot be verified; their slide ids are listed in ``unverified``.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from torch import nn

from extract.batch.output_folder import ensure_writable
from extract.device import autocast
from extract.encoders.tile_encoder import SLIDE_FEATURE_DIM, TILE_FEATURE_DIM, file_sha256
from extract.errors import UserError
from extract.features.plain import PlainFeatures, read_plain_features, split_duplicate_ids
from extract.features.slide_file import FeatureFileError
from extract.partial_files import remove_stale_partials_of
from extract.seeding import slide_seed_sequence
from extract.settings import settings_dict
from gigassl.config import EmbedConfig
from gigassl.embeddings_file import (  # also offered here: gigassl.evaluate and user code import them from embed
    EmbeddingFileError,
    EmbeddingWriter,
    SlideEmbeddings,
    export_embeddings,
    read_embeddings,
)
from gigassl.model import GigaSSLModel
from gigassl.sparse.maps import collate_views, tile_cells
from gigassl.training.checkpoint import load_model
from gigassl.training.data import feature_files_in

if TYPE_CHECKING:
    from sklearn.utils import Tags  # scikit-learn ≥ 1.6, the versions that call __sklearn_tags__

__all__ = [
    "EmbedResult",
    "EmbeddingFileError",
    "EmbeddingWriter",
    "FeatureContract",
    "SlideEmbedder",
    "SlideEmbeddings",
    "embed_slides",
    "export_embeddings",
    "iter_embeddings",
    "read_embeddings",
    "run_embedding",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedResult:
    """What ``gigassl embed`` did; ``exit_code`` is non-zero when ``strict`` and a slide failed."""

    out: Path
    n_slides: int
    failed: list[tuple[str, str]]
    exports: list[Path]
    exit_code: int

    def format(self) -> str:
        """A short report: what was written, and the slides that failed."""
        lines = [
            f"embedded {self.n_slides} slides → {self.out}"
            + (f" (+ {', '.join(map(str, self.exports))})" if self.exports else "")
        ]
        if self.failed:
            lines.append(f"{len(self.failed)} slide file(s) failed:")
            lines += [f"  {path}: {reason}" for path, reason in self.failed]
        return "\n".join(lines)


def slide_generator(seed: int, slide_id: str) -> np.random.Generator:
    """The generator of one slide's views, from (seed, slide id) only."""
    return np.random.default_rng(slide_seed_sequence(seed, slide_id))


def sample_views(
    features: np.ndarray,
    coords: np.ndarray,
    tile_step_level0: float,
    n_views: int,
    n_tiles_per_view: int,
    generator: np.random.Generator,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """R views of one slide: (T, D) features and (T, 2) grid cells each, tiles drawn without
    replacement within a view (all tiles when the slide has fewer than T)."""
    n = len(features)
    t = min(n_tiles_per_view, n)
    views = []
    for _ in range(n_views):
        rows = np.sort(generator.choice(n, size=t, replace=False))
        views.append((features[rows], tile_cells(coords[rows], tile_step_level0)))
    return views


@torch.no_grad()
def pool_views(model: GigaSSLModel, views: Sequence[tuple[np.ndarray, np.ndarray]], n_views: int) -> np.ndarray:
    """Views of S slides (R consecutive views each) → (S, W) float32 unit-norm embeddings."""
    pooled = model.pool(collate_views(views)).float()  # (S·R, W)
    mean = pooled.view(-1, n_views, pooled.shape[1]).mean(dim=1)
    return torch.nn.functional.normalize(mean, dim=1).cpu().numpy().astype(np.float32)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are."""
    return next(model.parameters()).device


def model_feature_dim(model: nn.Module) -> int:
    """The tile feature width ``model`` takes (the input channels of its sparse layer4)."""
    width = getattr(model, "feature_dim", None)
    if width is not None:
        return int(width)
    shortcut = model.state_dict().get("layer4.block0.shortcut_conv.weight")  # (512, D): the 1×1 conv
    return int(shortcut.shape[1]) if shortcut is not None else TILE_FEATURE_DIM


def model_slide_dim(model: nn.Module) -> int:
    """W, the width of the slide vectors ``model`` pools (512, 2048 for a ResNet50 head)."""
    return int(getattr(model, "slide_dim", SLIDE_FEATURE_DIM))


@dataclass(frozen=True)
class FeatureContract:
    """What a checkpoint needs of the plain features it embeds: their width and, when the
    checkpoint records it, the tile encoder that made them (``encoder_sha256`` "" = unchecked)."""

    feature_dim: int
    encoder_name: str = ""
    encoder_sha256: str = ""
    allow_other_encoder: bool = False

    @classmethod
    def of(
        cls, model: nn.Module, checkpoint: dict[str, Any] | None = None, allow_other_encoder: bool = False
    ) -> "FeatureContract":
        """The contract of ``model`` and its checkpoint dict (whose ``encoder`` names the features' encoder)."""
        encoder = (checkpoint or {}).get("encoder") or {}
        encoder = encoder if isinstance(encoder, dict) else {}
        return cls(model_feature_dim(model), str(encoder.get("name", "")), str(encoder.get("sha256", "")), allow_other_encoder)

    def check(self, slide: PlainFeatures) -> bool:
        """Raise a one-line :class:`FeatureFileError` when ``slide`` breaks the contract; else
        whether its tile encoder was verified (False when the file or the checkpoint records no
        encoder sha256, e.g. a TRIDENT/CLAM file)."""
        if slide.feature_dim != self.feature_dim:
            raise FeatureFileError(
                f"{slide.path}: features are {slide.feature_dim}-d, this model expects {self.feature_dim}-d; embed "
                "features extracted with the tile encoder the model was trained on"
            )
        if (
            self.encoder_sha256
            and slide.encoder_sha256
            and slide.encoder_sha256 != self.encoder_sha256
            and not self.allow_other_encoder
        ):
            raise FeatureFileError(
                f"{slide.path}: features made by the tile encoder {slide.encoder_name!r} (sha256 "
                f"{slide.encoder_sha256[:12]}…), but the model was trained on features of {self.encoder_name!r} "
                f"(sha256 {self.encoder_sha256[:12]}…); embed features of that encoder, or pass --allow-other-encoder "
                "to embed these anyway (recorded in the output)"
            )
        return bool(self.encoder_sha256 and slide.encoder_sha256)


def iter_embeddings(
    model: GigaSSLModel,
    feature_files: Sequence[str | Path],
    n_views: int,
    n_tiles_per_view: int,
    seed: int = 0,
    batch_size: int = 64,
    failed: list[tuple[str, str]] | None = None,
    contract: FeatureContract | None = None,
    encoders: Counter | None = None,
    unverified: list[str] | None = None,
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yield (ids, (s, W) float32) per batch of ``batch_size`` slides.

    Each file is read with :func:`~extract.features.plain.read_plain_features` and checked
    against ``contract`` (default: the model's feature width only). Files that fail are logged
    and appended to ``failed`` as (path, reason) when a list is given; otherwise they raise.
    ``encoders``, when given, counts the embedded slides per (encoder name, sha256);
    ``unverified`` collects the ids of the slides whose tile encoder could not be verified.
    """
    if n_views < 1 or n_tiles_per_view < 1 or batch_size < 1:
        raise UserError(f"n_views ({n_views}), n_tiles_per_view ({n_tiles_per_view}) and batch_size ({batch_size}) must be ≥ 1")
    contract = contract or FeatureContract(model_feature_dim(model))
    files = [Path(p) for p in feature_files]
    for start in range(0, len(files), batch_size):
        ids, views = [], []
        for path in files[start : start + batch_size]:
            try:
                slide = read_plain_features(path)
                verified = contract.check(slide)
            except (FeatureFileError, OSError, KeyError) as error:
                if failed is None:
                    raise
                logger.warning("skipping %s: %s", path, error)
                failed.append((str(path), str(error)))
                continue
            ids.append(slide.slide_id)
            if encoders is not None:
                encoders[(slide.encoder_name, slide.encoder_sha256)] += 1
            if unverified is not None and not verified:
                unverified.append(slide.slide_id)
            views.extend(
                sample_views(
                    slide.features,
                    slide.coords,
                    slide.tile_step_level0,
                    n_views,
                    n_tiles_per_view,
                    slide_generator(seed, slide.slide_id),
                )
            )
        if ids:
            yield ids, pool_views(model, views, n_views)


def embed_slides(
    model: GigaSSLModel,
    feature_files: Sequence[str | Path],
    n_views: int = 50,
    n_tiles_per_view: int = 5,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    contract: FeatureContract | None = None,
    mixed_precision: bool = True,
) -> tuple[list[str], np.ndarray]:
    """Slide ids and (S, W) float32 unit-norm embeddings of ``feature_files`` (in memory).

    ``model`` is a :class:`~gigassl.model.GigaSSLModel` in eval mode; ``device`` moves it
    there first (default: where it is). ``mixed_precision``: the device's autocast (bf16 on GPUs
    and on CPUs with bf16 units; see :func:`extract.device.autocast_dtype`). Raises on an
    unreadable file, NaN features or a file that breaks ``contract`` (default: the model's
    feature width), naming the file.
    """
    if device is not None:
        model = model.to(torch.device(device))
    ids: list[str] = []
    chunks: list[np.ndarray] = []
    with autocast(model_device(model), mixed_precision):
        for chunk_ids, chunk in iter_embeddings(
            model, feature_files, n_views, n_tiles_per_view, seed, batch_size, contract=contract
        ):
            ids.extend(chunk_ids)
            chunks.append(chunk)
    return ids, (np.concatenate(chunks) if chunks else np.zeros((0, model_slide_dim(model)), np.float32))


def _features_encoders(
    encoders: Counter, contract: FeatureContract, unverified: Sequence[str], out: Path
) -> tuple[str, list[list[Any]]]:
    """(``encoder_sha256`` attribute: the features' own encoder(s), [[name, sha256, n_slides], …])."""
    if unverified:
        logger.warning(
            "%d slide file(s) without this package's provenance (e.g. TRIDENT/CLAM files: %s): their tile "
            "encoder cannot be verified against the checkpoint's (%s); embedded because their width matches, "
            "listed as `unverified` in %s",
            len(unverified),
            ", ".join(unverified[:3]) + (" …" if len(unverified) > 3 else ""),
            f"{contract.encoder_name}, {contract.encoder_sha256[:12]}…" if contract.encoder_sha256 else "it records none",
            out,
        )
    if contract.allow_other_encoder and {sha for _, sha in encoders} - {contract.encoder_sha256, ""}:
        logger.warning(
            "embedded features of another tile encoder than the checkpoint's (--allow-other-encoder): %s",
            ", ".join(f"{name} ({sha[:12]}…): {n} slides" for (name, sha), n in encoders.items()),
        )
    hashes = sorted({sha for _, sha in encoders if sha})
    return ",".join(hashes), [[name, sha, n] for (name, sha), n in sorted(encoders.items())]


def run_embedding(config: EmbedConfig) -> EmbedResult:
    """``gigassl embed``: embed every slide of ``config.features`` into ``config.out``."""
    from extract.device import resolve_device
    from extract.progress import progress as progress_bar
    from gigassl.training.checkpoint import load_model

    files, failed = split_duplicate_ids(feature_files_in(config.features))
    ensure_writable(Path(config.out).parent)  # one line for a read-only folder, before any work
    remove_stale_partials_of(Path(config.out))
    device = resolve_device(config.device)
    model, checkpoint = load_model(config.model, device, config.sparse_backend)
    n_tiles = config.n_tiles_per_view or int(checkpoint["config"]["n_tiles_per_view"])
    contract = FeatureContract.of(model, checkpoint, config.allow_other_encoder)
    provenance = dict(
        checkpoint=str(config.model),
        checkpoint_sha256=file_sha256(config.model),
        checkpoint_epoch=int(checkpoint.get("epoch", -1)),
        n_views=config.n_views,
        n_tiles_per_view=n_tiles,
        seed=config.seed,
        features=str(config.features),
        checkpoint_encoder_sha256=contract.encoder_sha256,
        sparse_backend=model.sparse_backend,
        feature_dim=contract.feature_dim,
        architecture=checkpoint.get("architecture") or {},
        settings=settings_dict(config),
    )
    logger.info(
        "embedding %d slides from %s: R=%d views of T=%d tiles, seed %d, on %s",
        len(files),
        config.features,
        config.n_views,
        n_tiles,
        config.seed,
        device,
    )
    encoders: Counter = Counter()
    unverified: list[str] = []
    progress = progress_bar(total=len(files) + len(failed), initial=len(failed), unit="slide", desc="embed", log=logger)
    writer = EmbeddingWriter(config.out, provenance, model_slide_dim(model))
    with writer, autocast(device, config.mixed_precision):
        for ids, chunk in iter_embeddings(
            model, files, config.n_views, n_tiles, config.seed, config.batch_size, failed, contract, encoders, unverified
        ):
            writer.append(ids, chunk)
            progress.update(writer.n_slides + len(failed) - progress.n)
        encoder_sha256, features_encoders = _features_encoders(encoders, contract, unverified, Path(config.out))
        writer.set_attr("unverified", unverified)
        writer.set_attr("encoder_sha256", encoder_sha256)
        writer.set_attr("features_encoders", features_encoders)
        writer.set_attr("failed", failed)
        if writer.n_slides == 0:
            raise UserError(
                f"no slide of {config.features} could be embedded: {len(failed)} file(s) failed, the first "
                f"{failed[0][0]}: {failed[0][1]}"
                if failed
                else f"no slide of {config.features} to embed"
            )
    progress.close()
    exported = read_embeddings(config.out) if config.export else None
    written = [export_embeddings(exported, config.out, kind) for kind in config.export] if exported is not None else []
    return EmbedResult(Path(config.out), writer.n_slides, failed, written, int(bool(failed) and config.strict))


@functools.lru_cache(maxsize=2)
def _cached_slide_encoder(
    path: str, mtime_ns: int, device: str, sparse_backend: str
) -> tuple[GigaSSLModel, int, FeatureContract]:
    # cross_val_score clones and re-transforms many times; the file's mtime keys out stale copies
    model, checkpoint = load_model(path, device, sparse_backend)
    return model, int(checkpoint["config"]["n_tiles_per_view"]), FeatureContract.of(model, checkpoint)


class SlideEmbedder(TransformerMixin, BaseEstimator):
    """scikit-learn transformer: slide feature files → (S, W) Giga-SSL embeddings (W = 512, 2048 for ResNet50).

    ``model``: a `gigassl train` checkpoint path, or a ``GigaSSLModel``. ``fit`` learns nothing
    (returns ``self``); ``transform(paths)`` embeds the files, so the transformer fits in
    ``make_pipeline(SlideEmbedder(ckpt), LogisticRegression())`` and ``cross_val_score``.
    """

    def __init__(
        self,
        model: Any = None,
        n_views: int = 50,
        n_tiles_per_view: int | None = None,
        seed: int = 0,
        batch_size: int = 64,
        device: str = "cpu",
        sparse_backend: str = "auto",
        mixed_precision: bool = True,
    ) -> None:
        self.model = model
        self.n_views = n_views
        self.n_tiles_per_view = n_tiles_per_view
        self.seed = seed
        self.batch_size = batch_size
        self.device = device
        self.sparse_backend = sparse_backend
        self.mixed_precision = mixed_precision

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        return tags

    def fit(self, X: Sequence[str | Path], y: Any = None) -> "SlideEmbedder":
        return self

    def _model(self) -> tuple[GigaSSLModel, int, FeatureContract]:
        if self.model is None:
            raise UserError("SlideEmbedder needs model=<checkpoint path or GigaSSLModel>")
        if isinstance(self.model, (str, Path)):
            path = Path(self.model).resolve()
            if not path.is_file():
                raise FileNotFoundError(f"SlideEmbedder: checkpoint {path} does not exist")
            model, n_tiles, contract = _cached_slide_encoder(str(path), path.stat().st_mtime_ns, self.device, self.sparse_backend)
            return model, self.n_tiles_per_view or n_tiles, contract
        model = self.model.eval()
        return model, self.n_tiles_per_view or 5, FeatureContract.of(model)

    def transform(self, X: Sequence[str | Path]) -> np.ndarray:
        """(S, W) embeddings of the feature files ``X``; raises naming the first file that fails."""
        model, n_tiles, contract = self._model()
        paths = [str(p) for p in np.asarray(X, dtype=object).ravel()]
        _, embeddings = embed_slides(
            model, paths, self.n_views, n_tiles, self.seed, self.batch_size, self.device, contract, self.mixed_precision
        )
        return embeddings
