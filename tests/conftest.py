"""Shared fixtures: the real test slides (in the repository, and the data beside the project), and
small helpers."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from fixtures.processes import descendants, describe, wait_until_gone

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GIGASSL_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
# The real slides whose licences allow copying, in the repository (tests/fixtures/README.md):
# CMU-1-Small-Region.svs (CC0) and the openslide-python fixtures in openslide/ (LGPL-2.1).
REPO_SLIDES = REPO_ROOT / "tests" / "fixtures"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: the data that may not be copied into the repository (the BACH images,
    the TCGA slide). Only tests marked ``shared_data`` may ask for it; they are deselected (and
    counted) where the folder is absent, an error under ``GIGASSL_REQUIRE_SHARED_DATA=1`` (CI)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA}; set GIGASSL_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    """The in-repository real slides: ``CMU-1-Small-Region.svs`` and ``openslide/`` (the
    openslide-python fixtures ``boxes.tiff``, ``small.svs``, ``unopenable.tiff``, ``unreadable.svs``)."""
    return REPO_SLIDES


# Helpers of the interpreter itself that end with it (multiprocessing's resource tracker and
# fork server); anything else still running when the session ends was left by a test.
_INTERPRETER_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """At the end of the session, fail if the suite left a process running (a planner, a
    DataLoader worker, a job a test started): each gets a few seconds to end first.

    On Linux the session is made a child subreaper, so that the helpers of a job a test killed
    are re-parented to it (not to init) and are seen here.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    yield
    left = [pid for pid in descendants(os.getpid()) if not any(h in describe(pid) for h in _INTERPRETER_HELPERS)]
    left = wait_until_gone(left, timeout_s=10.0)
    if left:
        pytest.fail("the test session left processes running:\n" + "\n".join(describe(pid) for pid in left), pytrace=False)


def _spconv_imports() -> bool:
    from gigassl.sparse.conv import spconv_available

    return spconv_available()


def _can_mount_tmpfs() -> bool:
    """Whether this process may mount a small tmpfs (root with mount rights; tried once, undone)."""
    import subprocess
    import tempfile

    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    with tempfile.TemporaryDirectory() as folder:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", folder], capture_output=True).returncode == 0
        if mounted:
            subprocess.run(["umount", folder], capture_output=True)
    return mounted


def _shared_data_reason(items: list[pytest.Item]) -> list[tuple[str, str]]:
    """The deselection reason for ``shared_data`` tests, if ``../shared/data`` is absent; a test
    asking for the ``shared_data`` fixture without the marker is refused, so none is forgotten."""
    unmarked = [
        item.nodeid
        for item in items
        if "shared_data" in getattr(item, "fixturenames", ()) and item.get_closest_marker("shared_data") is None
    ]
    if unmarked:
        raise pytest.UsageError("tests use the shared_data fixture without @pytest.mark.shared_data: " + ", ".join(unmarked))
    if SHARED_DATA.is_dir():
        return []
    if os.environ.get("GIGASSL_REQUIRE_SHARED_DATA") == "1":
        raise pytest.UsageError(f"GIGASSL_REQUIRE_SHARED_DATA=1 but {SHARED_DATA} is not a folder; set GIGASSL_SHARED_DATA")
    return [("shared_data", f"{SHARED_DATA} is absent: BACH images and the TCGA slide may not be copied here")]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect, and count aloud, the tests a machine cannot run: ``cuda`` without a GPU, ``spconv``
    where spconv does not import, ``mount`` where a small tmpfs cannot be mounted (the injected
    full-disk tests cover the same code), ``wsidicomizer`` where it is not installed (it needs
    Python ≥ 3.11; the DICOM reading itself does not), ``shared_data`` where ``../shared/data`` is
    absent (a bare clone). ``GIGASSL_REQUIRE_SPCONV=1`` (CI's first pass) and
    ``GIGASSL_REQUIRE_SHARED_DATA=1`` (CI) make a missing spconv or data folder an error instead, so
    those tests can never disappear unnoticed."""
    reasons = _shared_data_reason(items)
    if any(item.get_closest_marker("mount") for item in items) and not _can_mount_tmpfs():
        reasons.append(("mount", "cannot mount a tmpfs here: needs root with mount rights"))
    if not torch.cuda.is_available():
        reasons.append(("cuda", "no CUDA device"))
    if importlib.util.find_spec("wsidicomizer") is None:
        reasons.append(("wsidicomizer", "wsidicomizer, which writes the test DICOM slides, is not installed (Python ≥ 3.11)"))
    if not _spconv_imports():
        if os.environ.get("GIGASSL_REQUIRE_SPCONV") == "1":
            raise pytest.UsageError("GIGASSL_REQUIRE_SPCONV=1 but spconv does not import: pip install -e '.[spconv]'")
        reasons.append(("spconv", "spconv does not import"))
    for marker, why in reasons:
        dropped = [item for item in items if item.get_closest_marker(marker) is not None]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = [item for item in items if item.get_closest_marker(marker) is None]
            config._gigassl_deselected = getattr(config, "_gigassl_deselected", []) + [f"{len(dropped)} '{marker}' tests ({why})"]


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    for line in getattr(config, "_gigassl_deselected", []):
        terminalreporter.write_line(f"deselected: {line}")
