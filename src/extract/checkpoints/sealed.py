"""Training checkpoints on disk: written atomically, sealed with a content hash, checked when loaded.

Shared by the MoCo job (``OUT/last.pt``) and Giga-SSL training (``OUT/checkpoint.pt``): each
writes ``OUT/checkpoints/epoch_NNNN.pt``, points its latest file at it (a hard link, so a
100 MB checkpoint is not stored twice; a copy where links are not possible) and keeps the
newest ``keep`` snapshots.

Integrity: :func:`save_atomic` refuses to write a payload whose tensors hold NaN or inf (naming
the tensor) and stores ``content_sha256``, a hash of every tensor (path, dtype, shape, bytes) and
every plain value of the payload; :func:`verify_payload` recomputes it after loading (a flipped
byte in weights, optimizer state or history is found) and checks the tensors finite again. The
hash costs about one read of the tensors (~0.2 s for 100 MB on a 2-core CPU). A full disk stops the job
(:mod:`extract.disk_errors`); the partial file is removed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from extract.disk_errors import raise_if_disk_full
from extract.errors import UserError
from extract.partial_files import temporary_path

CONTENT_HASH_KEY = "content_sha256"


class CheckpointIntegrityError(UserError):
    """A checkpoint whose content hash does not match, or whose tensors hold NaN or inf."""


def _leaves(value: Any, where: str) -> Iterator[tuple[str, Any]]:
    """(path, leaf) of a nested payload in a fixed order: dict keys sorted, sequences in order."""
    if isinstance(value, Mapping):
        for key in sorted(value, key=str):
            yield from _leaves(value[key], f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _leaves(item, f"{where}[{index}]")
    else:
        yield where, value


def content_hash(payload: Mapping[str, Any]) -> str:
    """sha256 of every tensor (path, dtype, shape, bytes) and plain value of ``payload`` but the hash itself."""
    digest = hashlib.sha256()
    for where, leaf in _leaves({k: v for k, v in payload.items() if k != CONTENT_HASH_KEY}, ""):
        digest.update(where.encode())
        if torch.is_tensor(leaf):
            tensor = leaf.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
        else:
            digest.update(repr(leaf).encode())
    return digest.hexdigest()


def non_finite_tensors(payload: Mapping[str, Any]) -> list[str]:
    """The floating-point tensors of ``payload`` holding NaN or inf, as 'path (n of m values)'."""
    found = []
    for where, leaf in _leaves(payload, ""):
        if torch.is_tensor(leaf) and leaf.is_floating_point():
            bad = int((~torch.isfinite(leaf.detach())).sum())
            if bad:
                found.append(f"{where.lstrip('[').replace('][', '.').rstrip(']')} ({bad} of {leaf.numel()} values)")
    return found


def verify_payload(payload: Mapping[str, Any], label: str) -> None:
    """Refuse a loaded payload without a ``content_sha256`` (not sealed by :func:`save_atomic`), one
    whose hash does not match its content, or one whose tensors hold NaN or inf
    (:class:`CheckpointIntegrityError` naming ``label`` and the tensor)."""
    stored = payload.get(CONTENT_HASH_KEY)
    if stored is None:
        raise CheckpointIntegrityError(
            f"{label}: no content hash, so its bytes cannot be verified (written by an older gigassl, or by another "
            "tool); train again to get a sealed checkpoint"
        )
    if stored != content_hash(payload):
        raise CheckpointIntegrityError(
            f"{label}: damaged file — its content does not match the hash written with it (a changed byte on disk or "
            "in a copy); use an earlier checkpoint (checkpoints/epoch_*.pt) or copy it again"
        )
    bad = non_finite_tensors(payload)
    if bad:
        raise CheckpointIntegrityError(
            f"{label}: NaN or inf in {len(bad)} tensor(s), first {bad[0]}; such weights give NaN results — use an "
            "earlier checkpoint (checkpoints/epoch_*.pt) or train again"
        )


def load_weights_only(path: str | Path, label: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; any failure becomes a ValueError
    starting with ``label`` (checkpoints are untrusted input: tensors and plain data only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the same to a user
        raise UserError(f"{label}: not a loadable weights-only torch checkpoint ({error})") from error


def load_sealed(path: str | Path, label: str, format_name: str, version: int, what: str, remedy: str) -> dict[str, Any]:
    """A checkpoint of ``format_name`` at ``version``, loaded weights-only and verified (seal, finite tensors).

    Anything else (another format, another version, a broken seal) is refused in one line starting
    with ``label``: ``what`` names the expected file, ``remedy`` what to run instead of reading an old one.
    """
    payload = load_weights_only(path, label)
    if not isinstance(payload, dict) or payload.get("format") != format_name:
        raise UserError(f"{label}: not {what}")
    if payload.get("format_version") != version:
        raise UserError(
            f"{label}: checkpoint format version {payload.get('format_version')} (an older gigassl's), this package reads "
            f"only version {version}; {remedy}"
        )
    verify_payload(payload, label)
    return payload


def save_atomic(payload: Mapping[str, Any], path: Path) -> None:
    """``torch.save`` of plain data, sealed with its content hash, to a temporary file beside
    ``path``, then an atomic rename. Refuses NaN or inf tensors; a full disk raises DiskFullError."""
    bad = non_finite_tensors(payload)
    if bad:
        raise CheckpointIntegrityError(
            f"{path}: not written — NaN or inf in {len(bad)} tensor(s), first {bad[0]} (the training diverged); "
            "lower --lr or raise --temperature and resume from the last checkpoint written"
        )
    sealed = {k: v for k, v in payload.items() if k != CONTENT_HASH_KEY}
    sealed[CONTENT_HASH_KEY] = content_hash(sealed)
    temp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temp, "wb") as handle:  # a Python file keeps the errno of a full disk (torch's writer drops it)
            torch.save(sealed, handle)
        os.replace(temp, path)
    except (OSError, RuntimeError) as error:
        raise_if_disk_full(error, path)
        raise
    finally:
        temp.unlink(missing_ok=True)


def write_epoch_snapshot(folder: Path, epoch: int, payload: Mapping[str, Any], latest: Path, keep: int) -> Path:
    """``folder/epoch_NNNN.pt``, ``latest`` made the same file, all but the newest ``keep`` snapshots deleted."""
    path = folder / f"epoch_{epoch:04d}.pt"
    save_atomic(payload, path)
    temp = temporary_path(latest)
    temp.unlink(missing_ok=True)
    try:
        try:
            os.link(path, temp)
        except OSError:
            temp.write_bytes(path.read_bytes())
        os.replace(temp, latest)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise_if_disk_full(error, latest)
        raise
    for old in sorted(folder.glob("epoch_*.pt"), key=lambda p: int(p.stem.split("_")[1]))[:-keep]:
        old.unlink()
    return latest
