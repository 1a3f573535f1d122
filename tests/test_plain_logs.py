"""Off a terminal, every long loop writes plain timestamped lines (extract.progress): no carriage
return, no escape code — run as a cluster job would, with the output going to a file."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from extract.progress import PlainProgress

TIMESTAMPED = re.compile(r"^\d\d:\d\d:\d\d [A-Z]+ \S+: ")


def run_to_file(args: list[str], log: Path, cwd: Path) -> str:
    """``gigassl ARGS`` with stdout and stderr redirected to ``log`` (not a terminal); its text."""
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, "-m", "gigassl.cli", *args], stdout=handle, stderr=handle, cwd=cwd, timeout=900)
    text = log.read_text(encoding="utf-8")
    assert done.returncode == 0, text[-3000:]
    return text


def assert_plain(text: str, *expected: str) -> None:
    assert "\r" not in text and "\x1b" not in text, "a carriage return or an escape code in a log file"
    progress_lines = [line for line in text.splitlines() if ": started" in line or ": finished in" in line]
    for desc in expected:
        assert any(desc in line for line in progress_lines), f"no start/end line for {desc!r}"
    assert all(TIMESTAMPED.match(line) for line in progress_lines), progress_lines[:3]


@pytest.mark.slow
def test_the_demo_writes_plain_lines_to_a_file(tmp_path):
    args = ["demo", "--out", str(tmp_path / "demo"), "--n-slides", "10", "--epochs", "2", "--batch-size", "10"]
    args += ["--n-augmentations", "2", "--n-tiles-per-augmentation", "8", "--n-views", "5", "--n-splits", "2", "--device", "cpu"]
    text = run_to_file(args, tmp_path / "demo.log", tmp_path)
    assert_plain(text, "demo slides", "gigassl train", "embed")


@pytest.mark.slow
def test_pretrain_tiles_writes_plain_lines_to_a_file(tmp_path, slides_dir):
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "CMU-1-Small-Region.svs").symlink_to(slides_dir / "CMU-1-Small-Region.svs")
    args = ["pretrain-tiles", "--slides", str(slides), "--out", str(tmp_path / "moco"), "--target-mpp", "1.0"]
    args += [
        "--tile-size-px",
        "32",
        "--batch-size",
        "8",
        "--queue-size",
        "12",
        "--tiles-per-epoch",
        "16",
        "--tiles-per-visit",
        "4",
    ]
    args += ["--epochs", "1", "--monitor-tiles", "8", "--num-workers", "0", "--device", "cpu"]
    text = run_to_file(args, tmp_path / "moco.log", tmp_path)
    assert_plain(text, "tissue grids", "epoch 1/1")


def test_plain_progress_logs_start_rate_limited_updates_postfix_and_end(caplog):
    caplog.set_level(logging.INFO)
    bar = PlainProgress(total=10, desc="work", unit="step", interval_s=3600.0, log=logging.getLogger("t"), initial=2)
    for _ in range(8):
        bar.update(1)
    bar.set_postfix(loss="0.25")
    bar.close()
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "work: started, 10 steps"
    assert len(lines) == 2 and lines[1].startswith("work: 10/10 steps (100 %)") and "(loss 0.25): finished in" in lines[1]
    quiet = PlainProgress(range(3), desc="rank 1", disable=True, log=logging.getLogger("t"))
    assert list(quiet) == [0, 1, 2] and len(caplog.records) == 2
