"""Per-slide claims: any number of jobs on one output folder take slides one at a time.

A job takes a slide by creating ``OUT/claims/{stem}.claim`` with ``O_CREAT | O_EXCL`` (atomic,
also over NFS v3+), holding JSON ``{host, pid, started, status}``; the file's mtime is the
job's heartbeat, touched every ``timeout_s / 10`` by a background thread. So SLURM array tasks
run with the same command share the cohort dynamically and finish together, and the slides of
a preempted task are picked up by the others.

A claim is released (deleted) when its slide is done; a failed slide's claim is kept with status
``failed`` so that the other jobs running now do not retry it (a later job does, once this one
has ended). A claim is taken over, like a stale partial file (:mod:`extract.partial_files`), when
its writer is gone: on this host, its process has ended; on another host, its heartbeat is older
than ``timeout_s``. Two jobs that find one stale claim race on a takeover marker
(``{stem}.claim.takeover-{inode}-{mtime_ns}``, ``O_EXCL`` again): one wins, the other moves on.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from extract.partial_files import host_name, temporary_path, writer_alive

logger = logging.getLogger(__name__)

CLAIMS_DIR = "claims"
CLAIM_SUFFIX = ".claim"
DEFAULT_TIMEOUT_S = 600.0
_OPEN_BOARDS: set[float] = set()  # ``started`` of the boards open in this process (jobs run one after another, or at once)


class ClaimBoard:
    """This job's claims in ``folder`` (created if needed); use as a context manager."""

    def __init__(self, folder: Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.folder, self.timeout_s = Path(folder), float(timeout_s)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.host, self.pid, self.started = host_name(), os.getpid(), time.time()
        while self.started in _OPEN_BOARDS:  # two boards opened within the clock's resolution
            self.started += 1e-6
        _OPEN_BOARDS.add(self.started)
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="claim-heartbeat", daemon=True)
        self._beat.start()

    def path(self, stem: str) -> Path:
        return self.folder / f"{stem}{CLAIM_SUFFIX}"

    def _content(self, status: str) -> bytes:
        return json.dumps({"host": self.host, "pid": self.pid, "started": self.started, "status": status}).encode()

    def claim(self, stem: str) -> bool:
        """Take ``stem`` for this job: True when it is now ours (new, or taken over from a job that
        is gone), False when another live job holds it."""
        path = self.path(stem)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return self._take_over(stem)
        try:
            os.write(fd, self._content("running"))
        finally:
            os.close(fd)
        with self._lock:
            self._held.add(stem)
        return True

    def stale_reason(self, path: Path) -> str | None:
        """Why the claim at ``path`` may be taken over (its job is gone), or None."""
        try:
            stat = path.stat()
            owner = json.loads(path.read_text() or "{}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            owner = {}  # being written, or damaged: judged by its age alone
        host, pid = owner.get("host"), owner.get("pid")
        if host == self.host and isinstance(pid, int):
            if pid == self.pid:  # a job of this process: this one's (e.g. a failed slide), another's, or an ended one's
                return None if owner.get("started") in _OPEN_BOARDS else "an earlier job of this process has ended"
            alive = writer_alive(pid, float(owner.get("started", stat.st_mtime)))
            return None if alive else f"its job (pid {pid} on this host) has ended"
        idle_s = time.time() - stat.st_mtime
        if idle_s > self.timeout_s:
            return f"no heartbeat for {idle_s:.0f} s from its job ({host or 'unknown host'}, pid {pid})"
        return None

    def _take_over(self, stem: str) -> bool:
        path = self.path(stem)
        try:
            seen = path.stat()
        except FileNotFoundError:
            return self.claim(stem)  # released meanwhile: try again from the start
        reason = self.stale_reason(path)
        if reason is None:
            return False
        marker = path.with_name(f"{path.name}.takeover-{seen.st_ino}-{seen.st_mtime_ns}")
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False  # another job is taking it over
        try:
            now = path.stat()
        except FileNotFoundError:
            now = None
        if now is None or (now.st_ino, now.st_mtime_ns) != (seen.st_ino, seen.st_mtime_ns):
            return False  # replaced since it was judged stale
        temp = temporary_path(path)
        temp.write_bytes(self._content("running"))
        os.replace(temp, path)
        logger.info("taking over the claim on %s: %s", stem, reason)
        with self._lock:
            self._held.add(stem)
        return True

    def release(self, stem: str) -> None:
        """Delete this job's claim on ``stem`` (its slide is done) and any takeover markers."""
        with self._lock:
            self._held.discard(stem)
        path = self.path(stem)
        for marker in self.folder.glob(f"{path.name}.takeover-*"):
            marker.unlink(missing_ok=True)
        path.unlink(missing_ok=True)

    def mark_failed(self, stem: str) -> None:
        """Keep the claim on ``stem`` with status ``failed``: no job running now retries it."""
        path = self.path(stem)
        temp = temporary_path(path)
        temp.write_bytes(self._content("failed"))
        os.replace(temp, path)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.timeout_s / 10):
            with self._lock:
                held = list(self._held)
            for stem in held:
                try:
                    os.utime(self.path(stem))
                except FileNotFoundError:
                    pass

    def close(self) -> None:
        """Stop the heartbeat; claims still running (the job stopped mid-slide) are released.
        Failed slides keep their claim, which the next job takes over."""
        self._stop.set()
        self._beat.join()
        _OPEN_BOARDS.discard(self.started)
        with self._lock:
            held, self._held = set(self._held), set()
        for stem in held:
            try:
                running = json.loads(self.path(stem).read_text()).get("status") == "running"
            except (OSError, ValueError):
                running = False
            if running:
                self.path(stem).unlink(missing_ok=True)

    def __enter__(self) -> "ClaimBoard":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
