"""A full disk or an exceeded quota: one policy for every job that writes (extract, train, embed).

ENOSPC / EDQUOT is never a problem of one slide: the next file would fail the same way. So it
ends the job with one line naming the path and the free space there (:class:`DiskFullError`,
a :class:`~extract.errors.UserError`: exit status 2), and what was being written is discarded;
complete files already written are kept, so a rerun after freeing space goes on from there.

HDF5 cannot close a file whose write failed (closing it again, even at interpreter exit, crashes
the process), so the package's HDF5 writers write through :class:`GuardedFile`: a write that
fails for a full disk is recorded and reported as done, HDF5 closes the file normally, and the
writer then deletes it and raises (:mod:`extract.partial_files`).
"""

from __future__ import annotations

import errno
import io
import shutil
from pathlib import Path
from typing import Any

from extract.errors import UserError

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# What the messages of libraries that drop the errno (HDF5, torch's zip writer) say instead.
_DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "errno = 28", "errno = 122", "[errno 28]", "[errno 122]")


class DiskFullError(UserError):
    """The disk (or the user's quota) is full where the job writes; the job stops."""


def is_disk_full(error: BaseException | None) -> bool:
    """True when ``error`` (or an error it was raised from) is ENOSPC or EDQUOT."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, DiskFullError) or getattr(error, "errno", None) in DISK_FULL_ERRNOS:
            return True
        if any(text in str(error).lower() for text in _DISK_FULL_TEXTS):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def free_space(path: str | Path) -> str:
    """The free space of the filesystem holding ``path`` (or its nearest existing parent), e.g. "12.3 MB"."""
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = float(shutil.disk_usage(where).free)
    except OSError:
        return "unknown"
    for unit in ("bytes", "KB", "MB", "GB"):
        if free < 1000 or unit == "GB":
            return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
        free /= 1000
    raise AssertionError("unreachable")


def disk_full_error(path: str | Path, error: BaseException | None = None) -> DiskFullError:
    """The one-line error of a full disk at ``path`` (the error's own file name, when it has one)."""
    path = getattr(error, "filename", None) or path
    quota = error is not None and (getattr(error, "errno", None) == errno.EDQUOT or "quota" in str(error).lower())
    cause = "the disk quota is exceeded" if quota else "no space left on the device"
    return DiskFullError(
        f"{path}: {cause} ({free_space(path)} free there); the job stopped and the file being written was "
        "discarded — free space (or write to another folder) and run it again: complete files are kept"
    )


def raise_if_disk_full(error: BaseException, path: str | Path) -> None:
    """Raise :func:`disk_full_error` (from ``error``) when ``error`` is a full disk; else return."""
    if is_disk_full(error) and not isinstance(error, DiskFullError):
        raise disk_full_error(path, error) from error
    if isinstance(error, DiskFullError):
        raise error


class GuardedFile(io.FileIO):
    """A binary file whose writes never fail for a full disk: the first such failure is kept in
    ``error`` and every later write is dropped (the file is to be deleted). For HDF5, which must
    be able to close a file whatever happened to its writes (see the module docstring)."""

    error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        written = 0
        while self.error is None and written < len(view):  # a short write: the disk filled up mid-way
            try:
                written += self._write_some(view[written:])
            except OSError as error:
                if error.errno not in DISK_FULL_ERRNOS:
                    raise
                self.error = error
        return len(view)

    def _write_some(self, data: memoryview) -> int:
        """One ``write(2)``: the bytes written (fewer than asked when the disk fills up)."""
        return super().write(data) or 0
