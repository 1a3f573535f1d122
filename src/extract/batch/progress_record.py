"""The progress record of an output folder: one JSON line per slide finished (done or failed).

``OUT/progress.jsonl`` is appended by every job that works in the folder, one line per slide as
soon as it finishes, with a single ``write`` on a descriptor opened ``O_APPEND`` and an
``fsync``: a job killed at its time limit leaves the lines of every slide it finished, and
concurrent jobs never interleave inside a line. A line is written only after the slide's file
is complete (renamed to its final name), so the record never calls done a slide whose file is
missing. A torn last line (a crash inside the write) is ignored when read. The end-of-job
``summary.json`` is derived from this record (:mod:`extract.batch.summary`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PROGRESS_FILE = "progress.jsonl"


def append_json_line(path: Path, data: dict[str, Any], durable: bool = True) -> None:
    """Append ``data`` to ``path`` as one JSON line in one ``O_APPEND`` write (jobs sharing the file
    never interleave inside a line), starting a new line after a torn one; ``durable``: fsync."""
    line = json.dumps(data, sort_keys=True) + "\n"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = "\n" + line  # after a torn line: never glued to it
        os.write(fd, line.encode())
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` (with the time) to ``path`` as one JSON line, durably."""
    append_json_line(path, {**record, "time": round(time.time(), 3)})


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of ``path`` in the order written (none when it does not exist; torn lines skipped)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            logger.warning("%s: line %d is not a complete record (a job was killed while writing it); ignored", path, number)
            continue
        if isinstance(record, dict) and "slide" in record:
            records.append(record)
    return records


def latest_by_slide(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last record of each slide (a slide redone after a failure counts once, as done)."""
    return {record["slide"]: record for record in records}
