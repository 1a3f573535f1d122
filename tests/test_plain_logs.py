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


# Every command but the demo (above), run once in one process whose stdout and stderr are one
# file, on small inputs: extract and pretrain-tiles on slides, the slide-level commands on a
# synthetic cohort of feature files. "{T}" is the module's folder. Each command's section of the
# log is checked by its own test.
CHAIN = {
    "extract": "--slides {T}/slides --out {T}/extract --encoder random --tile-size-px 64 --target-mpp 2.0 --n-augmentations 2 "
    "--n-tiles-per-augmentation 8 --num-workers 0 --device cpu",
    "pretrain-tiles": "--slides {T}/cmu --out {T}/moco --target-mpp 1.0 --tile-size-px 32 --batch-size 8 --queue-size 12 "
    "--tiles-per-epoch 16 --tiles-per-visit 4 --epochs 1 --monitor-tiles 8 --num-workers 0 --device cpu",
    "train": "--features {T}/features --out {T}/train --epochs 1 --n-tiles-per-view 3 --warmup-epochs 1 --monitor-slides 4 "
    "--batch-size 4 --checkpoint-every 1 --num-workers 0 --device cpu",
    "embed": "--model {T}/train/checkpoint.pt --features {T}/features --out {T}/embeddings.h5 --n-views 4 --device cpu",
    "evaluate": "--embeddings {T}/embeddings.h5 --labels {T}/labels.csv --out {T}/evaluation --n-splits 2 --test-fraction 0.5 --budgets 100% --device cpu",
    "fit": "--labels {T}/labels.csv --embeddings {T}/embeddings.h5 --out {T}/model.h5 --device cpu",
    "predict": "--model {T}/model.h5 --embeddings {T}/embeddings.h5 --out {T}/predictions.csv --device cpu",
    "explain": "--model {T}/model.h5 --features {T}/features --checkpoint {T}/train/checkpoint.pt --out {T}/explain "
    "--slide-ids slide_000 --views-per-tile 2 --device cpu",
}
# what each command's section must show as a start/end line (the loops of extract.progress)
CHAIN_PROGRESS = {"extract": ("slides",), "pretrain-tiles": ("tissue grids", "epoch 1/1"), "train": ("gigassl train",)}
CHAIN_PROGRESS |= {"embed": ("embed",), "explain": ("explain",)}
DRIVER = """import sys
from gigassl.cli import main
for line in sys.stdin.read().splitlines():
    command, *flags = line.split()
    print("=== gigassl", command, flush=True)
    print("=== exit", command, main([command, *flags]), flush=True)
"""


@pytest.fixture(scope="module")
def chain_logs(tmp_path_factory, slides_dir) -> dict[str, str]:
    """Each command's section of one log file (stdout and stderr, not a terminal): command → text."""
    from fixtures.make_slides import write_tissue_slide
    from gigassl.synthetic.cohort import synthetic_label, write_synthetic_cohort

    folder = tmp_path_factory.mktemp("chain")
    (folder / "slides").mkdir()
    write_tissue_slide(folder / "slides" / "a.tif", seed=1)
    write_tissue_slide(folder / "slides" / "b.tif", seed=2)
    (folder / "cmu").mkdir()
    (folder / "cmu" / "CMU-1-Small-Region.svs").symlink_to(slides_dir / "CMU-1-Small-Region.svs")
    paths = write_synthetic_cohort(folder / "features", n_slides=8, n_tiles=24, n_augmentations=3, bank_size=10, seed=2)
    labels = "".join(f"{path.stem},{'ab'[synthetic_label(i)]}\n" for i, path in enumerate(paths))
    (folder / "labels.csv").write_text("slide,label\n" + labels)
    lines = "".join(f"{command} {flags.replace('{T}', str(folder))}\n" for command, flags in CHAIN.items())
    log = folder / "chain.log"
    with open(log, "w") as handle:
        subprocess.run(
            [sys.executable, "-c", DRIVER], input=lines.encode(), stdout=handle, stderr=handle, cwd=folder, timeout=1200
        )
    text = log.read_text(encoding="utf-8")
    sections = {part.split("\n", 1)[0].strip(): part for part in text.split("=== gigassl ")[1:]}
    assert list(sections) == list(CHAIN), text[-3000:]
    return sections


def test_the_chain_runs_every_command_but_the_demo() -> None:
    from gigassl.cli import COMMANDS

    assert set(CHAIN) | {"demo"} == set(COMMANDS)


@pytest.mark.slow
@pytest.mark.parametrize("command", list(CHAIN))
def test_each_command_writes_plain_lines_to_a_file(command: str, chain_logs: dict[str, str]) -> None:
    section = chain_logs[command]
    assert f"=== exit {command} 0" in section, section[-3000:]
    assert section.count("\r") == 0 and section.count("\x1b") == 0, "a carriage return or an escape code in a log file"
    assert len(section.strip().splitlines()) > 2, "the command wrote nothing"  # its name, its output, its exit
    assert_plain(section.replace(f"=== exit {command} 0", ""), *CHAIN_PROGRESS.get(command, ()))


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


def test_only_extract_progress_draws_bars() -> None:
    """One progress mechanism: no module of the package nor benchmark imports tqdm (only
    extract.progress does, for a terminal) or writes a carriage return or an escape code itself."""
    import ast

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in sorted([*(root / "src").rglob("*.py"), *(root / "benchmarks").rglob("*.py")]):
        if path == root / "src" / "extract" / "progress.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            imported = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            imported += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            drawn = (
                isinstance(node, ast.Constant) and isinstance(node.value, str) and ("\r" in node.value or "\x1b" in node.value)
            )
            if drawn or any(name.split(".")[0] == "tqdm" for name in imported):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []
