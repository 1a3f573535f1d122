"""Helper processes that die with the job that started them.

A job killed with SIGKILL (a SLURM time limit, the OOM killer, ``kill -9``) runs no cleanup, so
its helper processes — the slide planner, the tile-reading DataLoader workers — would be
re-parented to init and live on, blocked on a pipe, holding memory. Each helper calls
:func:`die_with_parent` first thing: on Linux the kernel sends it SIGKILL when its parent dies
(``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread polls the parent's pid once a second.

On Linux the signal is tied to the *thread* that started the helper, so helpers must be
started from a thread that lives as long as the job (here: the main thread).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
PARENT_POLL_S = 1.0


def _set_parent_death_signal() -> bool:
    """Ask the kernel for SIGKILL when the parent dies; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(1)  # the parent is gone: nobody will read what this process makes


def die_with_parent(parent_pid: int) -> None:
    """Make the calling (helper) process end when ``parent_pid``, its parent, ends."""
    if not _set_parent_death_signal():
        threading.Thread(target=_watch_parent, args=(parent_pid,), name="watch-parent", daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the signal was asked for
        os._exit(1)


def die_with_parent_worker(parent_pid: int, worker_id: int) -> None:
    """``worker_init_fn`` for DataLoader workers (bind ``parent_pid`` with functools.partial)."""
    die_with_parent(parent_pid)
