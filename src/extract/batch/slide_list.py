"""The slides of a job: the slide files of a folder, and this process's share of them.

``gigassl extract`` and ``gigassl pretrain-tiles`` both list their input folder here. Scale-out
(extraction): ``--shard i/n`` (SLURM arrays) and torchrun ranks (``RANK``/``WORLD_SIZE``) each
take an interleaved share of the sorted list, so no process group is needed; within its share a
job takes slides one at a time (:class:`SlideQueue`, claiming each through
:mod:`extract.batch.claims`), so any number of jobs can share one output folder.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

from extract.errors import UserError
from extract.slides.dicom import is_dicom_folder
from extract.slides.reader import SLIDE_SUFFIXES

Item = TypeVar("Item")


def list_slides(folder: Path) -> tuple[list[Path], list[Path]]:
    """Sorted entries of ``folder``: (slide candidates, other files to ignore).

    A slide is a file with a slide extension, or a sub-folder holding DICOM instances (one DICOM
    slide, :func:`extract.slides.dicom.is_dicom_folder`). Hidden entries and other sub-folders
    (e.g. MIRAX data folders) are left out of both.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"--slides {folder} is not a folder")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file()]
    slides = [p for p in entries if (p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES) or (p.is_dir() and is_dicom_folder(p))]
    others = [p for p in files if p.suffix.lower() not in SLIDE_SUFFIXES]
    return slides, others


def broken_links(folder: Path) -> list[tuple[Path, str]]:
    """Sorted (link, reason) of the symbolic links of ``folder`` that lead nowhere (dangling or
    looping): :func:`list_slides` cannot tell them from absent files, the summary lists them."""
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or not entry.is_symlink() or entry.exists():
            continue
        target = os.readlink(entry)
        try:
            entry.resolve(strict=True)
            reason = f"symbolic link to {target}, which cannot be read"
        except RuntimeError:  # Python < 3.13 reports a loop this way
            reason = f"symbolic link loop (→ {target}); fix or remove the link"
        except OSError as error:
            loop = error.errno == errno.ELOOP
            reason = (
                f"symbolic link loop (→ {target}); fix or remove the link"
                if loop
                else f"broken symbolic link: its target {target} does not exist; fix or remove the link"
            )
        found.append((entry, reason))
    return found


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → (i, n) with 0 ≤ i < n."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise UserError(f"--shard {text!r}: expected i/n, e.g. 0/4 (SLURM: $SLURM_ARRAY_TASK_ID/N)") from None
    if count < 1 or not 0 <= index < count:
        raise UserError(f"--shard {text!r}: need 0 ≤ i < n")
    return index, count


def process_part(shard: str) -> tuple[int, int]:
    """This process's part of the slide list: the shard refined by the torchrun rank, if any."""
    index, count = parse_shard(shard)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK={rank} / WORLD_SIZE={world} from the environment are inconsistent")
    return index * world + rank, count * world


def select_part(items: list[Item], part: int, n_parts: int) -> list[Item]:
    """Interleaved split: item j goes to part j mod n_parts (balances slide sizes sorted by name)."""
    return items[part::n_parts]


class SlideQueue:
    """The slides a job takes, in order: each candidate is offered to ``take`` (which claims it)
    only when the pipeline first reaches that position, so a job holds just the slides it is
    working on or planning ahead."""

    def __init__(self, candidates: Sequence[Path], take: Callable[[Path], bool] | None = None) -> None:
        self._candidates = iter(candidates)
        self._take = take
        self._taken: list[Path] = []
        self._position: dict[Path, int] = {}
        self._exhausted = False

    def get(self, position: int) -> Path | None:
        """The ``position``-th slide this job takes, or None when no more can be taken."""
        while len(self._taken) <= position and not self._exhausted:
            path = next(self._candidates, None)
            if path is None:
                self._exhausted = True
            elif self._take is None or self._take(path):
                self._position[path] = len(self._taken)
                self._taken.append(path)
        return self._taken[position] if position < len(self._taken) else None

    def position(self, path: Path) -> int:
        """Where ``path`` stands in this job's order, taking slides up to it if needed (KeyError
        when it is not one of the slides taken)."""
        while path not in self._position and self.get(len(self._taken)) is not None:
            pass
        return self._position[path]

    def taken(self) -> list[Path]:
        """The slides taken so far."""
        return list(self._taken)

    def __iter__(self) -> Iterator[Path]:
        position = 0
        while (path := self.get(position)) is not None:
            yield path
            position += 1
