"""Issue 30: every environment fault — full disk, read-only folder, unreadable slide, broken
links, long names — ends in one line naming the path and the real cause, never a crash or exit 0."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

from extract.checkpoints import sealed as checkpoint_io
from extract.features.slide_file import is_complete
from extract.slides import reader
from fixtures.make_slides import FAST_EXTRACT as FAST
from fixtures.make_slides import write_tissue_slide
from gigassl.cli import main
from gigassl.synthetic.cohort import write_synthetic_cohort


def errors(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


@pytest.fixture()
def slides(tmp_path: Path) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a", "b", "c"):
        write_tissue_slide(folder / f"{name}.tif", mpp=0.5, seed=ord(name))
    return folder


def _nothing_half_written(out: Path) -> None:
    """Every file left in the features folder is complete and verifies; no partial is left."""
    features = out / "features"
    for path in features.iterdir() if features.is_dir() else []:
        if path.name.startswith("."):  # the folder's manifest of verified files (extract.features.manifest)
            continue
        assert path.suffix == ".h5" and is_complete(path, require_plain=True, verify=True), path


# ----------------------------------------------------------------------------- 4: full disk


def _fail_after(n_bytes: int):
    """A GuardedFile write that meets a full disk once ``n_bytes`` have been written in the process."""
    from extract.disk_errors import GuardedFile  # imported here: the other tests run on versions without it

    budget = {"left": n_bytes}

    def write_some(self, data):
        if budget["left"] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = min(len(data), budget["left"])
        budget["left"] -= n
        return GuardedFile.__mro__[1].write(self, data[:n])

    return write_some


@pytest.mark.parametrize("qc", [False, True], ids=["no-qc", "qc"])
def test_a_full_disk_stops_extraction_in_one_line(slides, tmp_path, caplog, monkeypatch, qc):
    out = tmp_path / "out"
    if qc:  # the QC image is the first thing each slide writes (in the planning process)

        def no_space(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0]))

        monkeypatch.setattr(Image.Image, "save", no_space)
    else:
        from extract.disk_errors import GuardedFile

        monkeypatch.setattr(GuardedFile, "_write_some", _fail_after(40_000))
    with caplog.at_level(logging.ERROR):
        assert main(["extract", "--slides", str(slides), "--out", str(out), *FAST, "--qc" if qc else "--no-qc"]) == 2
    message = errors(caplog).splitlines()[-1]
    assert "no space left on the device" in message and "free there" in message and str(out) in message
    assert not any(r.levelno >= logging.CRITICAL for r in caplog.records)  # not an internal error
    _nothing_half_written(out)


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A real filesystem of ``size`` at ``folder`` (tests using it are marked ``mount``: deselected,
    and counted, where mounting is not allowed)."""
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.slow
@pytest.mark.mount
@pytest.mark.parametrize("qc", [False, True], ids=["no-qc", "qc"])
def test_a_really_full_disk_never_crashes_nor_exits_0(slides, slides_dir, tmp_path, qc):
    shutil.copy(slides_dir / "CMU-1-Small-Region.svs", slides / "real.svs")
    with small_tmpfs(tmp_path / "small", "200k") as small:
        out = small / "out"
        command = [sys.executable, "-m", "gigassl.cli", "extract", "--slides", str(slides), "--out", str(out), *FAST]
        command[command.index("2.0")] = "1.0"  # more tiles than 200 KB can hold
        done = subprocess.run([*command, "--qc" if qc else "--no-qc"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-3000:]
        assert "Traceback" not in done.stderr and "no space left on the device" in done.stderr.splitlines()[-1]
        _nothing_half_written(out)


def test_a_full_disk_while_training_is_one_line(tmp_path, caplog, monkeypatch):
    features = tmp_path / "features"
    write_synthetic_cohort(features, n_slides=6, n_tiles=24, n_augmentations=3, bank_size=10, seed=2)

    def no_space(payload, handle):
        handle.write(b"partly")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_io.torch, "save", no_space)
    out = tmp_path / "run"
    args = ["train", "--features", str(features), "--out", str(out), "--n-tiles-per-view", "3", "--batch-size", "3"]
    with caplog.at_level(logging.ERROR):
        assert main([*args, "--epochs", "1", "--monitor-slides", "4", "--warmup-epochs", "0"]) == 2
    assert "no space left on the device" in errors(caplog) and "epoch_0001.pt" in errors(caplog)
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.partial"))


# ----------------------------------------------------------------------------- 6: the environment


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """``folder`` made unwritable, for root too (the immutable flag)."""
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        assert os.geteuid() != 0 or immutable, "cannot make a read-only folder for root here"
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_a_read_only_output_folder_is_one_line_for_train_and_embed(tmp_path, caplog):
    features = tmp_path / "features"
    write_synthetic_cohort(features, n_slides=6, n_tiles=24, n_augmentations=3, bank_size=10, seed=2)
    with read_only(tmp_path / "ro") as folder, caplog.at_level(logging.ERROR):
        assert main(["train", "--features", str(features), "--out", str(folder), "--epochs", "1"]) == 2
        assert "not writable" in errors(caplog) and str(folder) in errors(caplog)
        caplog.clear()
        model = tmp_path / "model.pt"
        model.write_bytes(b"")  # the folder check comes first
        assert main(["embed", "--features", str(features), "--model", str(model), "--out", str(folder / "e.h5")]) == 2
        assert "not writable" in errors(caplog) and str(folder) in errors(caplog)
    assert not any(r.levelno >= logging.CRITICAL for r in caplog.records)


def test_an_unreadable_slide_is_reported_as_permission_denied(slides, tmp_path, monkeypatch):
    denied = slides / "b.tif"
    if os.geteuid() == 0:  # root reads any file: the kernel's answer is injected instead

        def guarded_open(path, *args, **kwargs):
            if Path(path) == denied:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return open(path, *args, **kwargs)

        monkeypatch.setattr(reader, "open", guarded_open, raising=False)
    else:
        denied.chmod(0)
    out = tmp_path / "out"
    assert main(["extract", "--slides", str(slides), "--out", str(out), *FAST]) == 0
    failed = {
        s["slide"]: s["reason"] for s in json.loads((out / "summary.json").read_text())["slides"] if s["status"] == "failed"
    }
    assert list(failed) == ["b.tif"] and "permission denied" in failed["b.tif"] and "not a slide format" not in failed["b.tif"]


def test_dangling_and_looping_links_are_listed_as_ignored(slides, tmp_path):
    (slides / "gone.svs").symlink_to(tmp_path / "nowhere.svs")
    (slides / "loop.svs").symlink_to(slides / "loop.svs")
    out = tmp_path / "out"
    assert main(["extract", "--slides", str(slides), "--out", str(out), *FAST]) == 0
    ignored = {
        s["slide"]: s["reason"] for s in json.loads((out / "summary.json").read_text())["slides"] if s["status"] == "ignored"
    }
    assert set(ignored) == {"gone.svs", "loop.svs"}
    assert "broken symbolic link" in ignored["gone.svs"] and "nowhere.svs" in ignored["gone.svs"]
    assert "symbolic link loop" in ignored["loop.svs"]


def test_a_240_character_slide_name_is_extracted(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    long_name = "s" * 236 + ".tif"
    write_tissue_slide(slides / long_name, mpp=0.5)
    out = tmp_path / "out"
    assert main(["extract", "--slides", str(slides), "--out", str(out), *FAST]) == 0
    assert is_complete(out / "features" / f"{'s' * 236}.h5", require_plain=True, verify=True)
    assert (out / "qc" / f"{'s' * 236}.png").is_file()
