"""The model file ``gigassl fit`` writes and ``predict`` / ``explain`` read: a fitted slide
classifier as plain arrays in HDF5 (no pickle), with what it was fitted on.

Layout::

    /linear/mean, /linear/scale   (D,)      the StandardScaler          (methods gigassl, average)
    /linear/coef                  (C', D)   logistic regression weights (C' = 1 for two classes)
    /linear/intercept             (C',)
    /abmil/<parameter>            tensors of the gated attention-MIL (method abmil)
    root attrs: format, format_version, package_version, method, classes (JSON), provenance
                (JSON: checkpoint and tile-encoder hashes, embedding settings …), settings (JSON),
                abmil_dims (JSON), content_sha256, complete

``content_sha256`` covers every dataset and the attributes that give them meaning; a file whose
content does not match it is refused (a damaged copy, an edited file). Written to a temporary
file beside the target and renamed when complete.

A **class score** is what :mod:`gigassl.classifier.attribution` splits into tile terms: with two classes,
the log-odds of the class (``±`` the decision function); with more, the class's logit (the
softmax input). Either way ``score = x · u + c`` for the classifier's input ``x`` (a slide
embedding, a mean tile feature, or attention-MIL's pooled hidden vector), :meth:`direction`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from extract import __version__
from extract.errors import UserError
from extract.partial_files import temporary_path

FORMAT_NAME = "gigassl-slide-classifier"
FORMAT_VERSION = 1
_MEANING_ATTRS = ("method", "classes", "provenance", "abmil_dims")


class ClassifierFileError(UserError):
    """A model file that is missing, damaged, of another version, or applied to the wrong inputs."""


@dataclass(frozen=True)
class LinearClassifier:
    """StandardScaler then logistic regression: mean, scale (D,), coef (C', D), intercept (C',)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray

    @classmethod
    def from_pipeline(cls, pipeline: Any) -> "LinearClassifier":
        """From a fitted ``make_pipeline(StandardScaler(), LogisticRegression[CV]())``."""
        scaler, regression = pipeline[0], pipeline[-1]
        return cls(
            np.asarray(scaler.mean_, np.float64),
            np.asarray(scaler.scale_, np.float64),
            np.atleast_2d(np.asarray(regression.coef_, np.float64)),
            np.atleast_1d(np.asarray(regression.intercept_, np.float64)),
        )

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(S, D) inputs → (S, C') decision values (scikit-learn's ``decision_function``)."""
        return ((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.coef.T + self.intercept

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """The scaler folded into the weights: (C', D) weights and (C',) offsets on raw inputs."""
        weights = self.coef / self.scale
        return weights, self.intercept - weights @ self.mean


def probabilities(logits: np.ndarray) -> np.ndarray:
    """(S, C') decision values → (S, C) probabilities (sigmoid for one column, softmax otherwise)."""
    logits = np.asarray(logits, np.float64)
    if logits.shape[1] == 1:
        p1 = 1.0 / (1.0 + np.exp(-logits[:, 0]))
        return np.stack([1.0 - p1, p1], axis=1)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def class_direction(weights: np.ndarray, offsets: np.ndarray, class_index: int) -> tuple[np.ndarray, float]:
    """(u (D,), c) with class score = x · u + c, from (C', D) weights and (C',) offsets.

    One column (scikit-learn's binary LR): ±. Two columns (attention-MIL's two logits): the
    difference, the log-odds. More: the class's own row, its logit.
    """
    if len(weights) == 1:
        sign = 1.0 if class_index == 1 else -1.0
        return sign * weights[0], float(sign * offsets[0])
    if len(weights) == 2:
        other = 1 - class_index
        return weights[class_index] - weights[other], float(offsets[class_index] - offsets[other])
    return weights[class_index], float(offsets[class_index])


def class_score(logits: np.ndarray, class_index: int) -> float:
    """The class score of one slide from its (C',) decision values, by :func:`class_direction`'s rule."""
    u, c = class_direction(np.eye(len(logits)), np.zeros(len(logits)), class_index)
    return float(np.asarray(logits, np.float64) @ u + c)


@dataclass(frozen=True)
class SlideClassifier:
    """A fitted classifier: ``method`` (gigassl, average, abmil), class names, and its parameters."""

    method: str
    classes: list[str]
    linear: LinearClassifier | None = None
    abmil_state: dict[str, np.ndarray] = field(default_factory=dict)
    abmil_dims: dict[str, int] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def class_index(self, name: str) -> int:
        """The column of class ``name``; a one-line error listing the classes otherwise."""
        if name not in self.classes:
            raise UserError(f"class {name!r} is not one of the model's classes {self.classes}")
        return self.classes.index(name)

    def attention_model(self) -> Any:
        """The fitted :class:`~gigassl.evaluation.mil.GatedAttentionMIL` (eval mode, CPU)."""
        import torch

        from gigassl.evaluation.mil import GatedAttentionMIL

        dims = self.abmil_dims
        model = GatedAttentionMIL(dims["n_classes"], dims["in_dim"], dims["hidden_dim"], dims["attention_dim"], 0.0)
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in self.abmil_state.items()})
        return model.eval()


def _arrays(classifier: SlideClassifier) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    if classifier.linear is not None:
        for name in ("mean", "scale", "coef", "intercept"):
            arrays[f"linear/{name}"] = np.asarray(getattr(classifier.linear, name), np.float64)
    for name, value in classifier.abmil_state.items():
        arrays[f"abmil/{name}"] = np.asarray(value)
    return arrays


def _content_sha256(arrays: Mapping[str, np.ndarray], attrs: Mapping[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    for key in _MEANING_ATTRS:
        digest.update(f"{key}={attrs[key]}|".encode())
    return digest.hexdigest()


def save_classifier(classifier: SlideClassifier, path: str | Path) -> Path:
    """Write ``classifier`` to ``path`` (temporary file, renamed when complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = _arrays(classifier)
    _check_finite(arrays, f"the classifier to be written to {path}")
    attrs = {
        "method": classifier.method,
        "classes": json.dumps(classifier.classes),
        "provenance": json.dumps(classifier.provenance, sort_keys=True, default=str),
        "abmil_dims": json.dumps(classifier.abmil_dims, sort_keys=True),
    }
    temp = temporary_path(path)
    try:
        with h5py.File(temp, "w") as handle:
            for name, value in arrays.items():
                handle.create_dataset(name, data=value)
            handle.attrs.update(attrs)
            handle.attrs["format"] = FORMAT_NAME
            handle.attrs["format_version"] = FORMAT_VERSION
            handle.attrs["package_version"] = __version__
            handle.attrs["settings"] = json.dumps(classifier.settings, default=str)
            handle.attrs["content_sha256"] = _content_sha256(arrays, attrs)
            handle.attrs["complete"] = True
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def _check_finite(arrays: Mapping[str, np.ndarray], what: str) -> None:
    bad = [name for name, value in arrays.items() if value.dtype.kind == "f" and not np.isfinite(value).all()]
    if bad:
        raise ClassifierFileError(f"{what}: NaN or inf in {', '.join(bad)}; fit the model again (check its inputs are finite)")


def _read_arrays(handle: h5py.File) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    handle.visititems(lambda name, item: arrays.__setitem__(name, item[...]) if isinstance(item, h5py.Dataset) else None)
    return arrays


def load_classifier(path: str | Path) -> SlideClassifier:
    """Read a model file; refuses other formats, versions, incomplete or damaged files, in one line."""
    path = Path(path)
    if not path.is_file():
        raise ClassifierFileError(f"model file {path} does not exist; write it with `gigassl fit`")
    try:
        with h5py.File(path, "r") as handle:
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in handle.attrs.items()}
            arrays = _read_arrays(handle)
    except OSError as error:
        raise ClassifierFileError(f"{path}: not a readable model file ({error}); fit it again with `gigassl fit`") from error
    if attrs.get("format") != FORMAT_NAME:
        raise ClassifierFileError(f"{path}: not a gigassl model file (no format={FORMAT_NAME!r}); write it with `gigassl fit`")
    if int(attrs.get("format_version", -1)) != FORMAT_VERSION or not bool(attrs.get("complete", False)):
        raise ClassifierFileError(
            f"{path}: model file version {attrs.get('format_version')} or incomplete; this package reads "
            f"version {FORMAT_VERSION}: fit it again with `gigassl fit`"
        )
    if _content_sha256(arrays, {k: str(attrs.get(k, "")) for k in _MEANING_ATTRS}) != attrs.get("content_sha256"):
        raise ClassifierFileError(f"{path}: the model file is damaged (its content does not match its checksum); fit it again")
    _check_finite(arrays, str(path))
    linear = None
    if "linear/coef" in arrays:
        linear = LinearClassifier(*(arrays[f"linear/{n}"] for n in ("mean", "scale", "coef", "intercept")))
    return SlideClassifier(
        method=str(attrs["method"]),
        classes=list(json.loads(attrs["classes"])),
        linear=linear,
        abmil_state={k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("abmil/")},
        abmil_dims=json.loads(attrs.get("abmil_dims", "{}")),
        provenance=json.loads(attrs.get("provenance", "{}")),
        settings=json.loads(attrs.get("settings", "{}")),
    )


# ---------------------------------------------------------------------------------------------
# What a model may be applied to


def _short(sha: str) -> str:
    return f"sha256 {sha[:12]}…" if sha else "no recorded hash"


def check_embeddings_provenance(
    classifier: SlideClassifier, provenance: Mapping[str, Any], model: Path, embeddings: Path
) -> None:
    """Refuse embeddings made by another checkpoint or from another tile encoder than the model's, in one line."""
    if classifier.method != "gigassl":
        raise ClassifierFileError(
            f"{model} is a {classifier.method} model: it scores tile features, not embeddings; pass --features instead"
        )
    for key, what in (("checkpoint_sha256", "checkpoint"), ("encoder_sha256", "tile encoder")):
        fitted, given = str(classifier.provenance.get(key, "")), str(provenance.get(key, ""))
        if fitted and given and fitted != given:
            raise ClassifierFileError(
                f"{model} was fitted on embeddings of the {what} {classifier.provenance.get(key.replace('_sha256', ''), '')} "
                f"({_short(fitted)}), but {embeddings} comes from {provenance.get(key.replace('_sha256', ''), '')} "
                f"({_short(given)}); embed with the model's {what}, or fit a model on these embeddings"
            )


def check_checkpoint(classifier: SlideClassifier, checkpoint_sha256: str, model: Path, checkpoint: Path) -> None:
    """Refuse a Giga-SSL checkpoint other than the one whose embeddings the model was fitted on."""
    fitted = str(classifier.provenance.get("checkpoint_sha256", ""))
    if fitted and fitted != checkpoint_sha256:
        raise ClassifierFileError(
            f"{model} was fitted on embeddings of the checkpoint {classifier.provenance.get('checkpoint', '')} "
            f"({_short(fitted)}), not of {checkpoint} ({_short(checkpoint_sha256)}); pass the model's checkpoint"
        )


def check_slide_encoder(classifier: SlideClassifier, encoder_sha256: str, model: Path, features_file: Path) -> None:
    """Refuse (per slide) tile features of another encoder than the model was fitted on."""
    fitted = str(classifier.provenance.get("encoder_sha256", ""))
    if fitted and encoder_sha256 and fitted != encoder_sha256:
        raise ClassifierFileError(
            f"{features_file}: features of the tile encoder {_short(encoder_sha256)}, but {model} was fitted on "
            f"features of {classifier.provenance.get('encoder', '')} ({_short(fitted)}); extract with that encoder"
        )
