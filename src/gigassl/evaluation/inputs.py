"""What the baselines of ``gigassl evaluate`` read, and the checks on it.

The plain tile features of each slide (gigassl or TRIDENT/CLAM files, by slide id), loaded all at
once (attention-MIL, top-k) or one file at a time (AverageMIL); the checks that the embeddings and
the features belong together; and, for top-k fine-tuning, where each slide's tiles are re-read and
the tile trunk that produced the features.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import h5py
import numpy as np

from extract.errors import UserError
from gigassl.evaluation.mil import SlideTiles
from gigassl.training.data import feature_files_in

if TYPE_CHECKING:
    from extract.encoders.tile_encoder import TileTrunk
    from gigassl.embed import SlideEmbeddings

logger = logging.getLogger(__name__)


def feature_paths(folder: str | Path) -> dict[str, Path]:
    """slide id → per-slide features file of ``folder`` (gigassl or TRIDENT/CLAM layout).

    The id is the file's ``slide_id`` attribute, else its stem, as ``gigassl embed`` names the
    rows; of two files with one id (a copied file), the one named after the id is used and the
    collision is logged.
    """
    from extract.features.plain import read_slide_id, split_duplicate_ids

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--features {folder} is not a folder; point it at the `features` folder of `gigassl extract`")
    kept, _ = split_duplicate_ids(feature_files_in(folder))
    return {read_slide_id(p): p for p in kept}


def load_bags(paths: Sequence[Path]) -> list[np.ndarray]:
    """(N_i, D) plain tile features of each file, checked (finite, one width D for all)."""
    from extract.features.plain import read_plain_features

    bags, first = [], None
    for path in paths:
        slide = read_plain_features(path)  # refuses no tiles and NaN/inf features, naming the file
        if first is not None and slide.feature_dim != first.feature_dim:
            raise UserError(
                f"{path}: features are {slide.feature_dim}-d, but {first.path.name}'s are "
                f"{first.feature_dim}-d; the baselines need features of one tile encoder"
            )
        first = first or slide
        bags.append(slide.features)
    return bags


def check_embeddings(embeddings: SlideEmbeddings, path: str | Path, slide_ids: Sequence[str]) -> None:
    """Refuse an embeddings file holding a slide id twice, or non-finite vectors for ``slide_ids``."""
    rows: dict[str, list[int]] = {}
    for row, slide_id in enumerate(embeddings.slide_ids):
        rows.setdefault(slide_id, []).append(row)
    repeated = [f"{s} (rows {', '.join(map(str, r))})" for s, r in rows.items() if len(r) > 1]
    if repeated:
        raise UserError(
            f"{path}: {len(repeated)} slide id(s) appear more than once: {', '.join(repeated[:10])}"
            f"{' …' if len(repeated) > 10 else ''}; two feature files carried one slide id (a copied "
            "file?): re-run `gigassl embed`, which keeps one file per id and lists the others"
        )
    finite = np.isfinite(embeddings.embeddings).all(axis=1)
    bad = [s for s in slide_ids if s in rows and not finite[rows[s][0]]]
    if bad:
        raise UserError(
            f"{path}: the vectors of {len(bad)} labelled slide(s) hold NaN or inf: {', '.join(bad[:10])}"
            f"{' …' if len(bad) > 10 else ''}; re-embed them with `gigassl embed` (which lists slides "
            "with NaN features as failed) or drop them from the labels CSV"
        )


def check_feature_width(feature_file: Path, embeddings: SlideEmbeddings, path: str | Path) -> None:
    """Refuse baselines on tile features of another width than the checkpoint behind the
    embeddings took (its ``feature_dim`` provenance; files without it are not checked)."""
    from extract.features.plain import read_plain_features

    expected = embeddings.provenance.get("feature_dim")
    if expected is None:
        return
    found = read_plain_features(feature_file).feature_dim
    if found != int(expected):
        raise UserError(
            f"{feature_file}: features are {found}-d, but the embeddings {path} come from a checkpoint "
            f"that takes {int(expected)}-d features; give --features the folder of the tile features "
            "that were embedded, so that the baselines see the same tile encoder"
        )


def slide_tiles(paths: Sequence[Path], slides_folder: Path | None) -> list[SlideTiles]:
    """Where each slide's tiles are re-read from (the feature file's source and tile grid)."""
    from extract.features.slide_file import SlideFeatures

    tiles = []
    for path in paths:
        with h5py.File(path, "r") as handle:  # the slide file the features were extracted from
            source = Path(str(handle.attrs.get("source", "")))
        with SlideFeatures(path, require_plain=True) as slide:
            grid = slide.grid_attrs
            coords = slide.coords()
            size_level0 = slide.tile_step_level0
        slide_path = slides_folder / source.name if slides_folder is not None else source
        if not slide_path.is_file():
            raise FileNotFoundError(
                f"{path}: its slide {slide_path} does not exist; top-k re-reads tiles from the slides, "
                "pass --slides FOLDER holding them"
            )
        tiles.append(SlideTiles(slide_path, coords, size_level0, int(grid["patch_size"]), grid.get("mpp")))
    return tiles


def trunk_factory(encoder: str, feature_file: Path) -> Callable[[], "TileTrunk"]:
    """A callable building the tile trunk that produced the features (checked by hash)."""
    from extract.encoders.tile_encoder import TileTrunk, load_resnet18
    from extract.features.slide_file import SlideFeatures

    with SlideFeatures(feature_file) as slide:
        expected = slide.encoder_sha256
        seed = int(slide.settings.get("seed", 0))
    if encoder == "auto":
        _, info = load_resnet18("random", seed=seed)
        if info.sha256 != expected:
            raise UserError(
                f"{feature_file}: its features come from a tile encoder checkpoint (sha256 {expected[:12]}…); "
                "top-k fine-tunes that encoder: pass it with --encoder PATH"
            )
        source, load_seed = "random", seed
    else:
        source, load_seed = encoder, 0
        _, info = load_resnet18(encoder)
        if info.sha256 != expected:
            logger.warning(
                "--encoder %s (sha256 %s…) is not the encoder of the features (%s…)", encoder, info.sha256[:12], expected[:12]
            )
    return lambda: TileTrunk(load_resnet18(source, seed=load_seed)[0])


def load_bags_one_by_one(paths: Sequence[Path]) -> Iterator[np.ndarray]:
    """Yield each file's plain features, one file in memory at a time."""
    for path in paths:
        yield load_bags([path])[0]
