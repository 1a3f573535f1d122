"""Writing training checkpoints: atomically, and as numbered epoch snapshots with a latest link.

Shared by the MoCo job (``OUT/last.pt``) and Giga-SSL training (``OUT/checkpoint.pt``): each
writes ``OUT/checkpoints/epoch_NNNN.pt``, points its latest file at it (a hard link, so a
100 MB checkpoint is not stored twice; a copy where links are not possible) and keeps the
newest ``keep`` snapshots.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch


def save_atomic(payload: Mapping[str, Any], path: Path) -> None:
    """``torch.save`` of plain data to a temporary file beside ``path``, then an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        torch.save(dict(payload), temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_epoch_snapshot(folder: Path, epoch: int, payload: Mapping[str, Any], latest: Path, keep: int) -> Path:
    """``folder/epoch_NNNN.pt``, ``latest`` made the same file, all but the newest ``keep`` snapshots deleted."""
    path = folder / f"epoch_{epoch:04d}.pt"
    save_atomic(payload, path)
    temp = latest.with_name(f"{latest.name}.{os.getpid()}.partial")
    temp.unlink(missing_ok=True)
    try:
        os.link(path, temp)
    except OSError:
        temp.write_bytes(path.read_bytes())
    os.replace(temp, latest)
    for old in sorted(folder.glob("epoch_*.pt"), key=lambda p: int(p.stem.split("_")[1]))[:-keep]:
        old.unlink()
    return latest
