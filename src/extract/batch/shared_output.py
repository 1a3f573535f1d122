"""What a ``gigassl extract`` job shares with the other jobs writing to its output folder.

- ``OUT/claims/{stem}.claim``: the slides being worked on, one claim per slide
  (:mod:`extract.batch.claims`), so that any number of jobs split the cohort dynamically;
- ``OUT/progress.jsonl``: one line per slide finished, done or failed
  (:mod:`extract.batch.progress_record`), appended as it finishes;
- ``OUT/features/.manifest.jsonl``: the files known complete and verified
  (:mod:`extract.features.manifest`), so that a restart reads only the files that changed.

The order in which a finished slide is published makes every crash safe: the file is renamed
complete, then its facts are recorded, then its progress line is appended, then its claim is
released. A job killed at any point leaves no record of a slide that is not complete, and at
worst a claim that the next job takes over (its writer is gone).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from extract.batch.claims import CLAIMS_DIR, ClaimBoard
from extract.batch.progress_record import PROGRESS_FILE, append_record, latest_by_slide, read_records
from extract.batch.summary import SlideOutcome
from extract.features.manifest import Manifest
from extract.partial_files import host_name

logger = logging.getLogger(__name__)


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class SharedOutput:
    """The claims, progress record and manifest of one job's output folder (a context manager)."""

    def __init__(self, out: Path, features_dir: Path, claim_timeout_s: float) -> None:
        self.out, self.features_dir = Path(out), Path(features_dir)
        self.manifest = Manifest(self.features_dir)
        self.claims = ClaimBoard(self.out / CLAIMS_DIR, claim_timeout_s)
        self.record_path = self.out / PROGRESS_FILE
        self._seen: dict[Path, tuple[int, int, int] | None] = {}

    def target(self, slide: Path) -> Path:
        return self.features_dir / f"{slide.stem}.h5"

    def note_before(self, slide: Path) -> None:
        """Remember the state of ``slide``'s output when the job decided to extract it."""
        self._seen[slide] = _identity(self.target(slide))

    def take(self, slide: Path) -> bool:
        """Claim ``slide`` for this job; False when another job holds it, or has finished it since
        this job decided to extract it (its output changed meanwhile)."""
        if not self.claims.claim(slide.stem):
            return False
        if _identity(self.target(slide)) != self._seen.get(slide):
            logger.info("%s was finished by another job meanwhile", slide.name)
            self.claims.release(slide.stem)
            return False
        return True

    def finished(self, outcome: SlideOutcome, slide: Path) -> None:
        """Record ``outcome`` (done or failed; its file, when done, is already complete) and release
        or keep the claim."""
        append_record(self.record_path, {**dataclasses.asdict(outcome), "host": host_name(), "pid": os.getpid()})
        if outcome.status == "done":
            self.claims.release(slide.stem)
        else:
            self.claims.mark_failed(slide.stem)

    def folder_state(self) -> dict[str, int]:
        """Slides of the folder by their latest recorded status, all jobs together."""
        latest = latest_by_slide(read_records(self.record_path))
        statuses = [record.get("status") for record in latest.values()]
        return {"n_done": statuses.count("done"), "n_failed": statuses.count("failed")}

    def close(self) -> None:
        self.claims.close()

    def __enter__(self) -> "SharedOutput":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
