"""The labels CSV of a survival or regression evaluation: follow-up times and events, or a
continuous target, per slide (with patients when a patient column is present).

- Survival: a time column (a duration ≥ 0 in any unit, e.g. months; the same unit for all rows)
  and an event column: ``1``/``true`` when the event (e.g. death, recurrence) was observed at
  that time, ``0``/``false`` when the patient was censored (last seen alive then).
- Regression: a column of numbers (e.g. a biomarker score).

Every bad cell is refused in one line naming the file, the line, the column and what to write.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from extract.errors import UserError
from gigassl.evaluation.protocol import Labels

EVENT_VALUES = {"1": True, "0": False, "true": True, "false": False, "1.0": True, "0.0": False}


@dataclass(frozen=True)
class Targets:
    """One row per slide: ids, patients (None without a patient column), and either ``time``
    (S,) + ``event`` (S,) bool (survival) or ``value`` (S,) (regression)."""

    slide_ids: list[str]
    patients: np.ndarray | None
    time: np.ndarray | None = None
    event: np.ndarray | None = None
    value: np.ndarray | None = None

    def subset(self, rows: Sequence[int]) -> "Targets":
        rows = list(rows)

        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[rows]

        return Targets(
            [self.slide_ids[i] for i in rows], pick(self.patients), pick(self.time), pick(self.event), pick(self.value)
        )

    def strata(self) -> np.ndarray:
        """(S,) integers the splits are stratified on: the event, or the target's terciles."""
        if self.event is not None:
            return self.event.astype(np.int64)
        assert self.value is not None, "a regression target"
        edges = np.quantile(self.value, [1 / 3, 2 / 3])
        return np.searchsorted(edges, self.value, side="right").astype(np.int64)

    def as_labels(self) -> Labels:
        """The strata as :class:`~gigassl.evaluation.protocol.Labels` (for the protocol's availability checks and splits)."""
        return Labels(self.slide_ids, self.strata().astype(str), self.patients)


def _rows(path: Path, slide_column: str, columns: dict[str, str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, stripped row) of every row with a slide id; ``columns``: column → its flag."""
    if not path.is_file():
        raise FileNotFoundError(f"labels CSV {path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        found = [c.strip() for c in (reader.fieldnames or [])]
        for column, flag in {slide_column: "--slide-column", **columns}.items():
            if column not in found:
                raise UserError(f"labels CSV {path}: no column {column!r} (found {found}); name it with {flag}")
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if row[slide_column]:
                yield line, row


def _number(text: str, where: str, column: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        shown = "empty" if not text else f"{text!r}, not a finite number"
        raise UserError(f"{where}: {column} is {shown}; give {what}")
    return value


def _finish(path: Path, ids: list[str], patients: list[str], has_patient: bool, **arrays: np.ndarray) -> Targets:
    repeated = sorted({s for s in ids if ids.count(s) > 1}) if len(set(ids)) != len(ids) else []
    if repeated:
        raise UserError(f"labels CSV {path}: slide ids listed more than once: {repeated[:10]}")
    if not ids:
        raise UserError(f"labels CSV {path} holds no slide")
    return Targets(ids, np.array(patients, dtype=str) if has_patient else None, **arrays)


def _has_column(path: Path, column: str) -> bool:
    if not path.is_file():
        return False
    with open(path, newline="", encoding="utf-8-sig") as handle:
        return column in [c.strip() for c in (csv.DictReader(handle).fieldnames or [])]


def read_survival_targets(
    path: str | Path, slide_column: str, time_column: str, event_column: str, patient_column: str = "patient"
) -> Targets:
    """Times and events per slide; refuses a missing column, a non-number, a negative time, an
    event other than 0/1/true/false, and a cohort without any event."""
    path = Path(path)
    has_patient = _has_column(path, patient_column)
    ids, patients, times, events = [], [], [], []
    for line, row in _rows(path, slide_column, {time_column: "--time-column", event_column: "--event-column"}):
        where = f"labels CSV {path} line {line} (slide {row[slide_column]!r})"
        time = _number(row[time_column], where, f"time column {time_column!r}", "the follow-up time as a number ≥ 0")
        if time < 0:
            raise UserError(f"{where}: time column {time_column!r} is negative ({time:g}); times are follow-up durations ≥ 0")
        event = EVENT_VALUES.get(row[event_column].lower())
        if event is None:
            raise UserError(
                f"{where}: event column {event_column!r} is {row[event_column]!r}; write 1 (or true) when the event "
                "was observed, 0 (or false) when the patient was censored"
            )
        ids.append(row[slide_column])
        patients.append(row.get(patient_column) or row[slide_column])
        times.append(time)
        events.append(event)
    targets = _finish(path, ids, patients, has_patient, time=np.array(times, float), event=np.array(events, bool))
    if not any(events):
        raise UserError(
            f"labels CSV {path}: no event among {len(ids)} slides (column {event_column!r} is 0/false everywhere); "
            "a survival evaluation needs observed events: check --event-column"
        )
    return targets


def read_regression_targets(path: str | Path, slide_column: str, target_column: str, patient_column: str = "patient") -> Targets:
    """A continuous target per slide; refuses a missing column, a non-number, a constant target."""
    path = Path(path)
    has_patient = _has_column(path, patient_column)
    ids, patients, values = [], [], []
    for line, row in _rows(path, slide_column, {target_column: "--label-column"}):
        where = f"labels CSV {path} line {line} (slide {row[slide_column]!r})"
        values.append(_number(row[target_column], where, f"target column {target_column!r}", "the target as a number"))
        ids.append(row[slide_column])
        patients.append(row.get(patient_column) or row[slide_column])
    targets = _finish(path, ids, patients, has_patient, value=np.array(values, float))
    if len(set(values)) < 2:
        raise UserError(f"labels CSV {path}: column {target_column!r} is constant; a regression needs a target that varies")
    return targets
