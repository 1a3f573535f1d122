"""The end-of-run summary of ``gigassl extract``: what happened to each slide, and the exit status.

Written to ``OUT/summary.json`` (``OUT/summary-shardI.json`` for one part of a sharded job) and
printed by the CLI (:meth:`ExtractionSummary.format`). Its done and failed slides are those the
job appended to ``OUT/progress.jsonl`` as they finished (:mod:`extract.batch.progress_record`), which
outlives a killed job; ``folder`` counts the latest status of every slide in that record, all
jobs of the folder together.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extract.partial_files import temporary_path


@dataclass
class SlideOutcome:
    """What happened to one slide: status is ``done``, ``skipped``, ``failed`` or ``ignored``;
    ``n_tiles`` its plain tiles (N), ``n_bank_tiles`` its bank's A × K."""

    slide: str
    status: str
    n_tiles: int = 0
    n_bank_tiles: int = 0
    seconds: float = 0.0
    reason: str = ""


@dataclass
class ExtractionSummary:
    """End-of-run summary of one process's share; ``exit_code`` is the command's status."""

    outcomes: list[SlideOutcome] = field(default_factory=list)
    part: int = 0
    n_parts: int = 1
    seconds: float = 0.0
    strict: bool = False
    folder: dict[str, int] = field(default_factory=dict)  # every job's slides by latest status (progress.jsonl)

    def _with(self, status: str) -> list[SlideOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def done(self) -> list[SlideOutcome]:
        return self._with("done")

    @property
    def skipped(self) -> list[SlideOutcome]:
        return self._with("skipped")

    @property
    def failed(self) -> list[SlideOutcome]:
        return self._with("failed")

    @property
    def ignored(self) -> list[SlideOutcome]:
        return self._with("ignored")

    @property
    def tiles_per_second(self) -> float:
        """Tiles encoded (plain + bank) per second of slide processing."""
        seconds = sum(o.seconds for o in self.done)
        tiles = sum(o.n_tiles + o.n_bank_tiles for o in self.done)
        return tiles / seconds if seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """1 when every slide this run tried failed (skipped slides were not tried), or with
        ``strict`` when any failed; else 0."""
        if not self.failed:
            return 0
        return 1 if self.strict or not self.done else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "part": self.part,
            "n_parts": self.n_parts,
            "seconds": round(self.seconds, 3),
            "n_done": len(self.done),
            "n_skipped": len(self.skipped),
            "n_failed": len(self.failed),
            "n_ignored": len(self.ignored),
            "tiles_per_second": round(self.tiles_per_second, 2),
            "exit_code": self.exit_code,
            "slides": [dataclasses.asdict(o) for o in self.outcomes],
            "folder": self.folder,
        }

    def format(self) -> str:
        """A short human-readable report."""
        lines = [
            f"extract: {count(len(self.outcomes) - len(self.ignored), 'slide')}: {len(self.done)} done, "
            f"{len(self.skipped)} skipped, {len(self.failed)} failed"
            + (f", {count(len(self.ignored), 'other file')} ignored" if self.ignored else "")
            + f" in {self.seconds:.1f} s ({self.tiles_per_second:.1f} tiles/s)"
            + (f" [part {self.part + 1}/{self.n_parts}]" if self.n_parts > 1 else "")
        ]
        lines += [f"  FAILED  {o.slide}: {o.reason}" for o in self.failed]
        lines += [f"  ignored {o.slide}: {o.reason}" for o in self.ignored]
        return "\n".join(lines)

    def write(self, out: Path) -> Path:
        """Write ``out/summary.json`` (``summary-shardI.json`` for part I of several) atomically; returns its path."""
        path = out / ("summary.json" if self.n_parts == 1 else f"summary-shard{self.part}.json")
        temp = temporary_path(path)
        temp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        temp.replace(path)
        return path


def count(n: int, noun: str) -> str:
    """``count(1, "slide")`` → "1 slide", ``count(3, "slide")`` → "3 slides"."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")
