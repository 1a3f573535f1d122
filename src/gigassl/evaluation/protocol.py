"""The evaluation protocol's inputs and splits: labels, training budgets, seeded splits.

- Labels: a CSV with a slide column, a label column and optionally a patient column; slides
  without an embedding (or features) are dropped with a warning, or refused with ``strict``.
- Budgets: ``100%``/``25%`` (a share of the training part), ``50`` (a slide count) or
  ``4/class`` (K per class), each drawn as a stratified subset once per (split, budget).
- Splits: ``n_splits`` seeded, stratified train/test splits; with patients, all slides of a
  patient fall on one side (``StratifiedGroupKFold``, one fold held out per repeat).
"""

from __future__ import annotations

import csv
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedShuffleSplit

from extract.errors import UserError

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Budget:
    """A training budget: ``kind`` is "fraction" (value in (0, 1]), "count" or "per_class"."""

    text: str
    kind: str
    value: float


def parse_budgets(text: str | Sequence[str]) -> list[Budget]:
    """``"100%,25%,50,4/class"`` (or those items as a sequence) → budgets, in the given order."""
    budgets = []
    for item in (t.strip() for t in (text.split(",") if isinstance(text, str) else text)):
        if not item:
            continue
        if match := re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", item):
            value = float(match.group(1)) / 100
            if not 0 < value <= 1:
                raise UserError(f"budget {item!r}: a percentage must be in (0, 100]")
            budgets.append(Budget(item, "fraction", value))
        elif match := re.fullmatch(r"(\d+)\s*/\s*class", item):
            budgets.append(Budget(item, "per_class", float(match.group(1))))
        elif re.fullmatch(r"\d+", item):
            budgets.append(Budget(item, "count", float(item)))
        else:
            raise UserError(
                f"budget {item!r} not understood; use a percentage (25%), a slide count (50) "
                "or slides per class (4/class), comma-separated"
            )
        if budgets[-1].value <= 0:
            raise UserError(f"budget {item!r} must be positive")
    if not budgets:
        raise UserError(f"--budgets {text!r} names no budget; e.g. '100%,25%,50,4/class'")
    return budgets


@dataclass(frozen=True)
class Labels:
    """One row per labelled slide: ids, string labels, patients (None without a patient column)."""

    slide_ids: list[str]
    labels: np.ndarray
    patients: np.ndarray | None

    def subset(self, rows: Sequence[int]) -> "Labels":
        rows = list(rows)
        return Labels(
            [self.slide_ids[i] for i in rows], self.labels[rows], None if self.patients is None else self.patients[rows]
        )


def read_labels(
    path: str | Path, slide_column: str = "slide", label_column: str = "label", patient_column: str = "patient"
) -> Labels:
    """Read the labels CSV; labels are kept as strings; a repeated slide id is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels CSV {path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        for needed in (slide_column, label_column):
            if needed not in columns:
                raise UserError(
                    f"labels CSV {path}: no column {needed!r} (found {columns}); "
                    f"name the columns with --slide-column / --label-column"
                )
        has_patient = patient_column in columns
        ids, labels, patients = [], [], []
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if not row[slide_column]:
                continue
            if not row[label_column]:
                raise UserError(f"labels CSV {path} line {line}: slide {row[slide_column]!r} has an empty label")
            ids.append(row[slide_column])
            labels.append(row[label_column])
            patients.append(row[patient_column] or row[slide_column] if has_patient else "")
    repeated = sorted({s for s in ids if ids.count(s) > 1}) if len(set(ids)) != len(ids) else []
    if repeated:
        raise UserError(f"labels CSV {path}: slide ids listed more than once: {repeated[:10]}")
    if not ids:
        raise UserError(f"labels CSV {path} holds no labelled slide")
    return Labels(ids, np.array(labels, dtype=str), np.array(patients, dtype=str) if has_patient else None)


def near_match_hint(missing: Sequence[str], available: set[str]) -> str:
    """A hint when labelled ids almost match the slide ids (a file extension, leading zeros, case), else ""."""
    by_number = {int(a): a for a in available if a.isdigit()}
    by_case = {a.casefold(): a for a in available}
    for slide_id in missing:
        stem, suffix = Path(slide_id).stem, Path(slide_id).suffix
        if suffix and stem in available:
            return f"; ids in the labels CSV end in {suffix} ({slide_id!r}): the slide ids are file stems ({stem!r})"
        if slide_id.isdigit() and int(slide_id) in by_number:
            return (
                f"; ids in the labels CSV lack the slide ids' leading zeros ({slide_id!r} for "
                f"{by_number[int(slide_id)]!r}): write them as the file stems are"
            )
        if slide_id.casefold() in by_case:
            return f"; ids differ in case only ({slide_id!r} for {by_case[slide_id.casefold()]!r}): ids are case-sensitive"
    return ""


def keep_available(labels: Labels, available: set[str], what: str, strict: bool) -> tuple[Labels, list[str]]:
    """Drop labelled slides that ``what`` lacks (warning), or raise with ``strict``, or when none is left."""
    missing = [s for s in labels.slide_ids if s not in available]
    if missing:
        shown = ", ".join(missing[:20]) + (f" … ({len(missing)} in all)" if len(missing) > 20 else "")
        hint = near_match_hint(missing, available)
        if len(missing) == len(labels.slide_ids):
            example = ", ".join(sorted(available)[:3]) or "none"
            raise UserError(
                f"none of the {len(missing)} labelled slides is in {what} (labels: {shown}; slide ids there: {example} …)"
                + (hint or "; check --slide-column and the ids")
            )
        message = f"{len(missing)} of {len(labels.slide_ids)} labelled slides are missing from {what}: {shown}{hint}"
        if strict:
            raise UserError(message + "; fix the labels CSV or the inputs, or drop --strict to ignore them")
        logger.warning("%s; they are ignored", message)
    return labels.subset([i for i, s in enumerate(labels.slide_ids) if s in available]), missing


def check_classes(labels: Labels, n_folds_needed: int, source: str) -> np.ndarray:
    """The sorted class names; raises when a split cannot hold every class on both sides."""
    classes, _counts = np.unique(labels.labels, return_counts=True)
    if len(classes) < 2:
        raise UserError(
            f"{source}: a single class {[str(c) for c in classes]} among {len(labels.slide_ids)} slides; "
            "classification needs at least two classes — check --label-column"
        )
    unit = "patients" if labels.patients is not None else "slides"
    for name in classes:
        members = labels.labels == name
        n = len(np.unique(labels.patients[members])) if labels.patients is not None else int(members.sum())
        if n < n_folds_needed:
            raise UserError(
                f"{source}: class {str(name)!r} has {n} {unit}; each split needs at least {n_folds_needed} per class "
                f"(some for training, some for testing) — add {unit}, or merge or drop the class"
            )
    return classes


# ---------------------------------------------------------------------------------------------
# Splits and budgets


def n_folds_for(test_fraction: float) -> int:
    """Folds of the grouped split whose held-out fold is about ``test_fraction``."""
    if not 0 < test_fraction < 1:
        raise UserError(f"--test-fraction {test_fraction} must be in (0, 1)")
    return max(2, int(round(1 / test_fraction)))


def make_splits(
    y: np.ndarray, groups: np.ndarray | None, n_splits: int, test_fraction: float, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_splits`` stratified (train, test) index pairs; grouped (patients never straddle) when
    ``groups`` is given. Raises when a split lacks a class on one side."""
    if n_splits < 1:
        raise UserError(f"--n-splits {n_splits} must be ≥ 1")
    if groups is None:
        splitter = StratifiedShuffleSplit(n_splits=n_splits, test_size=test_fraction, random_state=seed)
        splits = list(splitter.split(np.zeros(len(y)), y))
    else:
        n_folds = n_folds_for(test_fraction)
        splits = []
        for repeat in range(n_splits):
            folder = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed + repeat)
            with warnings.catch_warnings():  # "least populated class" warnings: checked below instead
                warnings.simplefilter("ignore", UserWarning)
                train, test = next(folder.split(np.zeros(len(y)), y, groups))
            splits.append((train, test))
    n_classes = len(np.unique(y))
    for index, (train, test) in enumerate(splits):
        if len(np.unique(y[train])) < n_classes:
            raise UserError(f"split {index}: a class has no training slide; lower --test-fraction or add slides")
        if len(np.unique(y[test])) < 2:
            raise UserError(f"split {index}: the test part holds a single class; raise --test-fraction or add slides")
    return splits


def budget_subset(
    train: np.ndarray,
    y: np.ndarray,
    budget: Budget,
    rng: np.random.Generator,
    split_index: int = 0,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """A stratified subset of ``train`` (indices into ``y``) of the budget's size, sorted.

    ``class_names[c]`` names class ``c`` in error messages."""
    classes, counts = np.unique(y[train], return_counts=True)
    n_train = len(train)
    if budget.kind == "per_class":
        k = int(budget.value)
        short = [(c, n) for c, n in zip(classes, counts) if n < k]
        if short:
            raise UserError(
                f"budget {budget.text!r} asks for {k} training slides per class, but in split {split_index} "
                f"class {_name(short[0][0], class_names)!r} has only {short[0][1]} training slides; use a smaller K"
            )
        per_class = np.full(len(classes), k)
    else:
        n = int(round(budget.value * n_train)) if budget.kind == "fraction" else int(budget.value)
        if n > n_train:
            raise UserError(
                f"budget {budget.text!r} asks for {n} training slides, but the training part of split "
                f"{split_index} holds {n_train}; use a smaller count or a percentage"
            )
        n = max(n, len(classes))
        if budget.kind == "count" and int(budget.value) < len(classes):
            raise UserError(
                f"budget {budget.text!r} is smaller than the number of classes ({len(classes)}); "
                "every class needs a training slide"
            )
        per_class = _allocate(n, counts)
    chosen = [rng.choice(train[y[train] == c], size=m, replace=False) for c, m in zip(classes, per_class)]
    return np.sort(np.concatenate(chosen))


def _name(code: int, class_names: Sequence[str] | None) -> str:
    return str(class_names[int(code)]) if class_names is not None else str(code)


def _allocate(n: int, counts: np.ndarray) -> np.ndarray:
    """Split ``n`` over classes proportionally to ``counts`` (largest remainder), ≥ 1 each."""
    exact = n * counts / counts.sum()
    share = np.clip(np.floor(exact).astype(int), 1, counts)
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    while share.sum() < n:
        for i in order:
            if share.sum() >= n:
                break
            if share[i] < counts[i]:
                share[i] += 1
    while share.sum() > n:
        i = int(np.argmax(share))
        share[i] -= 1
    return share
