"""The manifest of a features folder: what is known of each file, so that restarts read only what changed.

``FEATURES/.manifest.jsonl`` holds one JSON line per fact learnt about a file at one identity
(inode, size, mtime in ns): its checksums were all read and found good (``verified``), its bank
is free of NaN/inf (``finite``), what it holds (plain features, bank) and its content settings.
``gigassl extract`` appends a line when it finishes a file (its checksums were computed as it
was written, its bank was checked finite in memory) and when it verifies an existing one;
``gigassl train`` appends one when it has scanned a file (what its bank holds, where its chunks
lie, and whether it is free of NaN/inf), so its next start-up opens no unchanged file. A file whose identity no
longer matches its last line (rewritten, replaced, truncated, touched) is verified again in
full, so a restart over 12,000 finished files costs one ``stat`` each instead of reading them
whole; ``--verify-all`` (extract) and ``--recheck-finite`` (train) read everything regardless,
e.g. to find damage that left size and mtime unchanged (failing media).

Several jobs append at once (``O_APPEND``, one write per line); a torn line is skipped and the
last line of a file wins. A read-only folder keeps its facts in memory only (logged once).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extract.batch.progress_record import append_json_line
from extract.features.slide_file import FORMAT_VERSION, FeatureFileError, SlideFeatures, verify_checksums

logger = logging.getLogger(__name__)

MANIFEST_NAME = ".manifest.jsonl"
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


@dataclass(frozen=True)
class FileFacts:
    """What is known of one file at one identity (inode, size, mtime_ns)."""

    name: str
    inode: int
    size: int
    mtime_ns: int
    verified: bool = False  # every chunk read and its checksum checked (or written so by extract)
    finite: bool | None = None  # the bank holds no NaN/inf (None: not checked)
    has_plain: bool = False
    has_bank: bool = False
    settings: dict[str, Any] | None = None  # the file's content settings (its ``settings`` attribute)
    train_entry: dict[str, Any] | None = None  # what training's scan found (gigassl.training.slide_entry)
    format_version: int | None = None  # the file format the recording package read (FORMAT_VERSION then)

    def matches(self, stat: os.stat_result) -> bool:
        return (self.inode, self.size, self.mtime_ns) == (stat.st_ino, stat.st_size, stat.st_mtime_ns)


class Manifest:
    """The facts recorded for the files of ``folder`` (read once, appended as learnt)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST_NAME
        self._facts: dict[str, FileFacts] | None = None
        self._writable = True

    def _load(self) -> dict[str, FileFacts]:
        if self._facts is None:
            self._facts = {}
            try:
                lines = self.path.read_text().splitlines()
            except FileNotFoundError:
                lines = []
            fields = {f.name for f in dataclasses.fields(FileFacts)}
            for line in lines:
                try:
                    facts = FileFacts(**{k: v for k, v in json.loads(line).items() if k in fields})
                except (ValueError, TypeError):
                    continue  # a torn line (a job killed while writing it)
                self._facts[facts.name] = facts
        return self._facts

    def known(self, path: Path) -> FileFacts | None:
        """The facts of ``path`` if it has not changed since they were recorded by a package that
        reads this file format, else None."""
        facts = self._load().get(path.name)
        if facts is None or facts.format_version != FORMAT_VERSION:
            return None
        try:
            return facts if facts.matches(path.stat()) else None
        except FileNotFoundError:
            return None

    def record(self, path: Path, **learnt: Any) -> FileFacts:
        """Add ``learnt`` facts (fields of :class:`FileFacts`) about ``path`` as it is now; the facts
        already known for this identity are kept."""
        stat = path.stat()
        before = self.known(path)
        base = before if before is not None else FileFacts(path.name, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        facts = dataclasses.replace(base, format_version=FORMAT_VERSION, **learnt)
        self._load()[path.name] = facts
        if self._writable:
            self._append(facts)
        return facts

    def _append(self, facts: FileFacts) -> None:
        try:
            append_json_line(self.path, dataclasses.asdict(facts), durable=False)  # lost lines are only re-verified
        except OSError as error:
            if error.errno not in _READ_ONLY:
                raise
            self._writable = False
            logger.info("%s cannot be written (%s): what is verified now will be verified again next time", self.path, error)


def _verify(path: Path) -> tuple[str | None, dict[str, Any]]:
    """Read ``path`` whole: (None, what it holds) when it is complete and every checksum holds,
    else (why not, {})."""
    if not path.is_file():
        return "no such file", {}
    try:
        with SlideFeatures(path) as features:
            verify_checksums(features.file, path)
            return None, dict(has_plain=features.has_plain, has_bank=features.has_bank, settings=features.settings)
    except FeatureFileError as error:
        return str(error), {}


def check_existing(
    path: Path, manifest: Manifest, *, require_plain: bool = False, require_bank: bool = False, full: bool = False
) -> tuple[str | None, FileFacts | None]:
    """Whether the existing ``path`` can be reused: (None, its facts) or (why not, None).

    Read whole only when it changed since its facts were recorded (or with ``full``); a file
    found good is recorded, so the next restart only ``stat``s it.
    """
    facts = None if full else manifest.known(path)
    if facts is None or not facts.verified:
        reason, holds = _verify(path)
        if reason is not None:
            return reason, None
        facts = manifest.record(path, verified=True, **holds)
    if require_plain and not facts.has_plain:
        return f"{path}: has no plain features; run `gigassl extract` with plain features", None
    if require_bank and not facts.has_bank:
        return f"{path}: has no augmented bank (aug_features); run `gigassl extract` with the bank", None
    return None, facts
