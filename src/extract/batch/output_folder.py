"""The output folder of ``gigassl extract``: ``OUT/features/{slide}.h5``, ``OUT/qc/{slide}.png``
and ``OUT/summary[-shardI].json``.

Checked writable before any slide is read, so that a wrong ``--out`` costs one line, not a
cohort's work; partial files left there by jobs that have ended are deleted
(:mod:`extract.partial_files`; a running job's survive).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from extract.disk_errors import raise_if_disk_full
from extract.partial_files import remove_stale_partials


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` and check a file can be written there, else raise a clear PermissionError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise_if_disk_full(error, folder)
        raise PermissionError(
            f"output folder {folder} is not writable ({error.strerror or error}); choose another --out or fix its permissions"
        ) from error


def prepare_output(out: Path, qc: bool) -> tuple[Path, Path]:
    """Create ``out``, ``out/features`` (and ``out/qc`` with ``qc``), check they are writable and
    delete the stale partials in them; returns (features folder, QC folder)."""
    features_dir, qc_dir = out / "features", out / "qc"
    ensure_writable(out)
    ensure_writable(features_dir)
    if qc:
        ensure_writable(qc_dir)
    for folder in (out, features_dir, qc_dir):
        if folder.is_dir():
            remove_stale_partials(folder)
    return features_dir, qc_dir
