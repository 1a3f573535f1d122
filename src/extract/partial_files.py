"""Temporary files: how they are named, and when one is stale and may be deleted.

Every output (slide HDF5 file, QC image, summary, checkpoint, embeddings) is written to
``{name}.{host}-{pid}.partial`` beside its final path and renamed when complete
(:func:`finish_hdf5` for HDF5 writers), so nothing half-written looks finished. A name too long
for that suffix to fit in 255 bytes is cut, and a hash of the whole name appended
(``{start}~{hash8}.{host}-{pid}.partial``). HDF5 files are written through
:class:`extract.disk_errors.GuardedFile`: a full disk discards the file and stops the job. A partial whose writer has ended is stale: a killed job
leaves them, and the next job in the same folder deletes them. A partial may belong to another
job still running (another shard, on this node or another), so one is deleted only when its
writer is known to be gone:

- written on this host: its process no longer exists (or the pid now names a process started
  after the file was last written, i.e. a reused pid);
- written on another host, or by an older version that did not record the host: it has not
  been modified for ``FOREIGN_STALE_S`` (a day; a running writer touches its file far more often).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from extract.disk_errors import GuardedFile, disk_full_error, raise_if_disk_full

logger = logging.getLogger(__name__)

TEMP_SUFFIX = ".partial"
FOREIGN_STALE_S = 24 * 3600.0
NAME_MAX_BYTES = 255  # of one file name, on every common filesystem
_OWNER_BYTES = 64  # ".{host ≤ 40}-{pid ≤ 10}.partial" fits in this


def host_name() -> str:
    """This machine's name as partial and claim files record it (no dots or dashes, ≤ 40 characters)."""
    return (socket.gethostname().replace(".", "_").replace("-", "_") or "localhost")[:40]


def partial_prefix(path: str | Path) -> str:
    """The start of the name of every partial of ``path`` (whoever writes it): the file name,
    cut and hashed when the owner suffix would not fit in a file name otherwise."""
    name = Path(path).name
    if len(name.encode()) + _OWNER_BYTES <= NAME_MAX_BYTES:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    start = name.encode()[: NAME_MAX_BYTES - _OWNER_BYTES - 9].decode("utf-8", errors="ignore")
    return f"{start}~{digest}"


def temporary_path(path: str | Path, pid: int | None = None) -> Path:
    """Where ``path`` is written before it is complete (same folder, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f"{partial_prefix(path)}.{host_name()}-{os.getpid() if pid is None else pid}{TEMP_SUFFIX}")


def finish_hdf5(handle: Any, temp_path: Path, path: Path, succeeded: bool, guard: GuardedFile | None = None) -> None:
    """Close an open ``h5py.File`` written at ``temp_path`` (through ``guard``, when given): when
    ``succeeded``, marked ``complete`` (readers refuse files without it) and renamed to ``path``;
    else deleted. A write that met a full disk deletes it and raises :class:`DiskFullError`."""
    if succeeded and (guard is None or guard.error is None):
        handle.attrs["complete"] = True
        handle.flush()
    handle.close()
    if guard is not None:
        guard.close()
    if succeeded and (guard is None or guard.error is None):
        os.replace(temp_path, path)
        return
    temp_path.unlink(missing_ok=True)
    if guard is not None and guard.error is not None:
        raise disk_full_error(path, guard.error) from guard.error


class AtomicHDF5Writer:
    """Base of the package's HDF5 writers: the file is written at ``temp_path``; leaving the
    ``with`` block finishes it (:func:`finish_hdf5`: renamed to ``path`` on success, deleted on
    an exception or a full disk). Subclasses open ``_file`` with :meth:`_open` in ``__enter__``."""

    _file: Any
    _guard: GuardedFile | None = None
    temp_path: Path
    path: Path

    def _open(self) -> Any:
        """A new ``h5py.File`` at ``temp_path``, written through a :class:`GuardedFile`."""
        import h5py

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._guard = GuardedFile(self.temp_path, "w+")
        except OSError as error:
            raise_if_disk_full(error, self.temp_path)
            raise
        return h5py.File(self._guard, "w")

    def check_space(self) -> None:
        """Raise :class:`DiskFullError` as soon as a write has met a full disk (not at the end)."""
        if self._guard is not None and self._guard.error is not None:
            raise disk_full_error(self.path, self._guard.error)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        handle, self._file = self._file, None
        if handle is not None:
            finish_hdf5(handle, self.temp_path, self.path, succeeded=exc_type is None, guard=self._guard)


def writer_of(partial: Path) -> tuple[str | None, int | None]:
    """(host, pid) recorded in a partial's name; (None, pid) for the older ``{name}.{pid}.partial``."""
    owner = partial.name[: -len(TEMP_SUFFIX)].rsplit(".", 1)[-1]
    host, _, pid_text = owner.rpartition("-")
    pid = int(pid_text) if pid_text.isdigit() else None
    return (host or None), pid


def _start_time(pid: int) -> float | None:
    """Epoch seconds at which process ``pid`` started (Linux /proc), None when unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def writer_alive(pid: int, written_at: float) -> bool:
    """Whether process ``pid`` of this host still runs and is the one that wrote at ``written_at``
    (epoch seconds; a pid reused by a process started later is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if _zombie(pid):
        return False
    started = _start_time(pid)
    # /proc/stat's btime is rounded to the second: allow that much before calling the pid reused.
    return started is None or started <= written_at + 2.0


def stale_reason(partial: Path, now: float | None = None) -> str | None:
    """Why ``partial`` is stale (its writer is gone), or None when it may still be written."""
    try:
        written_at = partial.stat().st_mtime
    except FileNotFoundError:
        return None
    host, pid = writer_of(partial)
    if host == host_name() and pid is not None:
        return None if writer_alive(pid, written_at) else f"its writer (pid {pid} on this host) has ended"
    idle_s = (time.time() if now is None else now) - written_at
    if idle_s > FOREIGN_STALE_S:
        return f"untouched for {idle_s / 3600:.0f} h by its writer ({host or 'unknown host'}, pid {pid})"
    return None


def remove_stale_partials_of(path: Path) -> list[Path]:
    """Delete the stale partials of the file ``path`` (see :func:`remove_stale_partials`)."""
    return remove_stale_partials(path.parent, partial_prefix(path) + ".")


def remove_stale_partials(folder: Path, name_prefix: str = "") -> list[Path]:
    """Delete the stale partials in ``folder`` whose name starts with ``name_prefix``; returns them."""
    removed = []
    for partial in sorted(Path(folder).glob(f"{glob.escape(name_prefix)}*{TEMP_SUFFIX}")):
        reason = stale_reason(partial)
        if reason is not None:
            logger.info("removing %s left by an interrupted run: %s", partial, reason)
            partial.unlink(missing_ok=True)
            removed.append(partial)
    return removed
