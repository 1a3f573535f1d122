"""What ``gigassl fit`` reads (every task): each labelled slide's embedding or tile features with
their provenance, and what a fit returns (:class:`FitResult`).

- Embeddings (method ``gigassl``): the slide vectors of an embeddings file, in label order, and the
  embedding settings and hashes the model keeps (:data:`EMBEDDING_PROVENANCE`), so that
  ``predict`` and ``explain`` refuse inputs of another checkpoint or encoder.
- Tile features (``average``, ``abmil``): each slide's bag, or its mean tile feature, read one
  file at a time, and the tile encoder they came from (one encoder and width, or an error).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from extract.encoders.tile_encoder import file_sha256
from extract.errors import UserError
from gigassl.classifier.config import FitConfig
from gigassl.evaluation.protocol import Labels, keep_available

# the embedding settings and hashes a gigassl model keeps from its embeddings file
EMBEDDING_PROVENANCE = (
    "checkpoint",
    "checkpoint_sha256",
    "checkpoint_epoch",
    "n_views",
    "n_tiles_per_view",
    "seed",
    "encoder_sha256",
    "checkpoint_encoder_sha256",
    "feature_dim",
    "architecture",
    "sparse_backend",
)


@dataclass(frozen=True)
class FitResult:
    """What ``gigassl fit`` wrote."""

    out: Path
    method: str
    classes: list[str]
    n_slides: int
    missing: list[str]
    exit_code: int = 0

    def format(self) -> str:
        """One line per fact: the model file, its method, classes and training slides."""
        lines = [f"fitted {self.method} on {self.n_slides} slides, classes {self.classes} → {self.out}"]
        if self.missing:
            lines.append(f"{len(self.missing)} labelled slide(s) had no input and were left out: {', '.join(self.missing[:10])}")
        return "\n".join(lines)


def read_embedding_vectors(config: FitConfig, labels: Labels) -> tuple[np.ndarray, Labels, list[str], dict[str, Any]]:
    """(S, D) the embeddings of the labelled slides that have one (in label order), those labels,
    the missing ids, and the provenance the model keeps."""
    from gigassl.embeddings_file import read_embeddings

    assert config.embeddings is not None, "FitConfig requires --embeddings for method gigassl"
    embeddings = read_embeddings(config.embeddings)
    labels, missing = keep_available(labels, set(embeddings.slide_ids), f"the embeddings {config.embeddings}", config.strict)
    rows = embeddings.index()
    provenance = {k: embeddings.provenance[k] for k in EMBEDDING_PROVENANCE if k in embeddings.provenance}
    provenance.update(embeddings=str(config.embeddings), embeddings_sha256=file_sha256(config.embeddings))
    return embeddings.embeddings[[rows[s] for s in labels.slide_ids]], labels, missing, provenance


def read_slides(config: FitConfig, labels: Labels) -> tuple[list[np.ndarray], Labels, list[str], dict[str, Any]]:
    """Each labelled slide's bag (abmil) or mean tile feature (average), read one file at a time
    (an AverageMIL fit never holds more than one slide's tiles), and the features' provenance."""
    from extract.features.plain import read_plain_features
    from gigassl.evaluation.inputs import feature_paths

    assert config.features is not None, "FitConfig requires --features for the MIL methods"
    files = feature_paths(config.features)
    labels, missing = keep_available(labels, set(files), f"the features folder {config.features}", config.strict)
    inputs, encoders, names, widths = [], set(), set(), set()
    for slide_id in labels.slide_ids:
        slide = read_plain_features(files[slide_id])
        inputs.append(slide.features if config.method == "abmil" else slide.features.mean(axis=0, dtype=np.float64))
        encoders.add(slide.encoder_sha256)
        names.add(slide.encoder_name)
        widths.add(slide.feature_dim)
    encoders.discard("")
    if len(widths) > 1 or len(encoders) > 1:
        raise UserError(
            f"{config.features}: features of {len(encoders)} tile encoders, widths {sorted(widths)}; fit on features of one tile encoder"
        )
    provenance = dict(
        features=str(config.features),
        encoder=",".join(sorted(names)),
        encoder_sha256=min(encoders, default=""),
        feature_dim=widths.pop(),
    )
    return inputs, labels, missing, provenance
