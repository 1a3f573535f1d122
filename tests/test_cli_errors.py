"""Errors told by type: one bad input per command is one line and exit 2; a forced internal error
(a plain ``ValueError``/``KeyError`` where none is expected) is a bug, with its traceback, exit 1."""

from __future__ import annotations

import ast
import importlib
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.make_slides import write_blank_slide
from gigassl import cli

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small bad inputs shared by the module: a blank slide, files that are not what they claim."""
    folder = tmp_path_factory.mktemp("bad_inputs")
    (folder / "blank").mkdir()
    write_blank_slide(folder / "blank" / "blank.tif")
    (folder / "features").mkdir()
    (folder / "features" / "a.h5").write_text("not HDF5\n")
    (folder / "garbage.pt").write_bytes(b"not a checkpoint")
    (folder / "garbage.h5").write_text("not HDF5\n")
    (folder / "labels.csv").write_text("name,class\na,x\n")
    (folder / "mpp.csv").write_text("name,value\na,1\n")
    (folder / "a_file").write_text("a file where a folder is expected\n")
    return folder


# command → (flags with {IN} for the inputs folder, a phrase the one line must hold)
BAD_INPUTS = {
    "extract": (
        "--slides {IN}/blank --out {IN}/out_extract --encoder random --mpp-csv {IN}/mpp.csv",
        "mpp.csv: needs columns 'slide,mpp'",
    ),
    "pretrain-tiles": ("--slides {IN}/blank --out {IN}/out_moco", "none of the 1 files gave tissue tiles"),
    "train": ("--features {IN}/features --out {IN}/out_train", "a.h5: not a readable HDF5 file"),
    "embed": ("--model {IN}/garbage.pt --features {IN}/features --out {IN}/e.h5", "garbage.pt: not a loadable"),
    "evaluate": ("--embeddings {IN}/garbage.h5 --labels {IN}/labels.csv", "garbage.h5: not a readable HDF5 file"),
    "fit": ("--labels {IN}/labels.csv --embeddings {IN}/garbage.h5 --out {IN}/m.pt", "labels.csv: no column 'slide'"),
    "predict": ("--model {IN}/garbage.pt --embeddings {IN}/garbage.h5", "garbage.pt: not a readable model file"),
    "explain": ("--model {IN}/garbage.pt --features {IN}/features", "garbage.pt: not a readable model file"),
    "demo": ("--out {IN}/a_file", "a_file/slides"),
}


def _argv(command: str, inputs: Path) -> list[str]:
    return [command, *BAD_INPUTS[command][0].replace("{IN}", str(inputs)).split()]


def _errors(caplog: pytest.LogCaptureFixture, argv: list[str]) -> tuple[int, list[logging.LogRecord]]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = cli.main(argv)
    return code, [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_every_command_is_covered() -> None:
    assert set(BAD_INPUTS) == set(cli.COMMANDS)


@pytest.mark.parametrize("command", sorted(BAD_INPUTS))
def test_a_bad_input_is_one_line_and_exit_2(command: str, inputs: Path, caplog: pytest.LogCaptureFixture) -> None:
    code, errors = _errors(caplog, _argv(command, inputs))
    assert code == cli.EXIT_USER_ERROR, [r.getMessage() for r in errors]
    assert len(errors) == 1 and errors[0].exc_info is None, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert "\n" not in message and BAD_INPUTS[command][1] in message


@pytest.mark.parametrize("error", [ValueError("an internal check failed"), KeyError("patch_size_level0")], ids=repr)
@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_a_forced_internal_error_shows_its_traceback_and_exit_1(
    command: str, error: Exception, inputs: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A plain ValueError (not a UserError) is a bug now, wherever it is raised: no source reading."""
    module_name, function_name = cli.COMMANDS[command][1].split(":")

    def broken(config):
        raise error

    monkeypatch.setattr(importlib.import_module(module_name), function_name, broken)
    code, errors = _errors(caplog, _argv(command, inputs))  # valid settings; the function is replaced
    assert code == cli.EXIT_BUG and len(errors) == 1 and errors[0].exc_info is not None
    assert "internal error" in errors[0].getMessage() and type(error).__name__ in errors[0].getMessage()


def test_a_plain_value_error_deep_in_a_real_run_is_a_bug(inputs: Path, monkeypatch, caplog) -> None:
    """The innermost frame is a `raise` line of the package: once a user error by source
    reading, now a bug (traceback, exit 1) because its type is not UserError."""
    from gigassl import fit

    def broken(*args, **kwargs):
        raise ValueError("labels and slides out of step")

    monkeypatch.setattr(fit, "read_labels", broken)
    code, errors = _errors(caplog, _argv("fit", inputs))
    assert code == cli.EXIT_BUG and errors[0].exc_info is not None and "labels and slides out of step" in errors[0].getMessage()


def _gigassl(*argv: str, patch: str = "pass") -> subprocess.CompletedProcess:
    """A real ``gigassl`` process; ``patch`` is Python run before ``main`` (to force a bug)."""
    code = f"import sys; {patch}; from gigassl.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)


def test_stderr_of_a_real_process_user_error_then_bug(inputs: Path) -> None:
    result = _gigassl(*_argv("evaluate", inputs))
    error_lines = [line for line in result.stderr.splitlines() if re.search(r" (ERROR|CRITICAL) ", line)]
    assert result.returncode == 2 and len(error_lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "garbage.h5: not a readable HDF5 file" in error_lines[0]
    patch = "import gigassl.evaluate as e; e.run_evaluation = lambda config: {}['slide_id']"
    result = _gigassl(*_argv("evaluate", inputs), patch=patch)
    assert (
        result.returncode == 1
        and "Traceback (most recent call last)" in result.stderr
        and "KeyError: 'slide_id'" in result.stderr
    )


def _flag_messages_raised_as(names: set[str]) -> list[str]:
    """``file:line`` of each ``raise X(...)`` with X in ``names`` whose message names a ``--flag``."""
    found = []
    for path in sorted((REPO_ROOT / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name)):
                continue
            if node.exc.func.id not in names:
                continue
            texts = [n.value for n in ast.walk(node.exc) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            if any(re.search(r"--[a-z]", text) for text in texts):
                found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    return found


def test_no_message_about_a_flag_is_raised_as_a_plain_error() -> None:
    """A message naming a flag is about the settings: it must be a UserError (or a path error)."""
    assert _flag_messages_raised_as({"ValueError", "RuntimeError", "TypeError", "KeyError", "AssertionError"}) == []
