"""The ``gigassl`` command's error policy: user errors in one line, bugs with a traceback, Ctrl-C, quiet imports."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from extract.config import ExtractConfig, MocoConfig
from extract.errors import UserError
from gigassl import cli, embed
from gigassl.evaluation import protocol

EMBED_FLAGS = ["--model", "m.pt", "--features", "features", "--out", "e.h5"]


def _run(monkeypatch, caplog, failure, *flags: str) -> tuple[int, list[logging.LogRecord]]:
    """Run ``gigassl embed`` with its function replaced by ``failure``; the records logged."""

    def fake(config):
        failure()

    monkeypatch.setattr(embed, "run_embedding", fake)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gigassl"):
        code = cli.main([*flags, "embed", *EMBED_FLAGS])
    return code, [r for r in caplog.records if r.levelno >= logging.ERROR]


def _raise(error: BaseException):
    def failure():
        raise error

    return failure


def test_a_user_error_is_one_line_and_its_traceback_shows_with_verbose(monkeypatch, caplog):
    code, records = _run(monkeypatch, caplog, _raise(UserError("features/x.h5: bad; re-extract it")))
    assert code == 2 and len(records) == 1 and records[0].exc_info is None
    assert records[0].getMessage() == "features/x.h5: bad; re-extract it"
    code, records = _run(monkeypatch, caplog, _raise(UserError("bad")), "-v")
    assert code == 2 and records[0].exc_info is not None  # -v: always the traceback
    code, records = _run(monkeypatch, caplog, _raise(FileNotFoundError("no such folder features")))
    assert code == 2 and records[0].exc_info is None


def test_validation_raised_by_the_package_is_a_user_error(monkeypatch, caplog):
    # protocol's checks of the settings raise UserError: a message for the user, told by its type
    code, records = _run(monkeypatch, caplog, lambda: protocol.n_folds_for(5.0))
    assert code == 2 and records[0].exc_info is None and "--test-fraction 5.0" in records[0].getMessage()


def test_an_internal_bug_shows_its_traceback(monkeypatch, caplog):
    code, records = _run(monkeypatch, caplog, lambda: np.zeros(3) + np.zeros(4))  # a ValueError from numpy
    assert code == 1 and len(records) == 1 and records[0].exc_info is not None
    assert "internal error" in records[0].getMessage() and "operands could not be broadcast" in records[0].getMessage()
    code, records = _run(monkeypatch, caplog, lambda: {}["patch_size_level0"])
    assert code == 1 and records[0].exc_info is not None and "KeyError" in records[0].getMessage()


def test_ctrl_c_ends_with_one_line(monkeypatch, caplog):
    code, records = _run(monkeypatch, caplog, _raise(KeyboardInterrupt()))
    assert code == 130 and len(records) == 1 and records[0].exc_info is None
    assert records[0].getMessage().startswith("gigassl embed: interrupted (Ctrl-C)")


def test_flags_map_onto_the_dataclass_and_tuples_come_from_commas():
    parser = cli.build_parser()
    args = parser.parse_args(["embed", *EMBED_FLAGS, "--export", "npz, csv"])
    assert cli.config_from_args(cli.COMMANDS["embed"][0], args).export == ("npz", "csv")
    evaluate = ["evaluate", "--embeddings", "e.h5", "--labels", "labels.csv", "--logistic-c", "3"]
    assert cli.config_from_args(cli.COMMANDS["evaluate"][0], parser.parse_args(evaluate)).logistic_c == 3.0
    assert "(default: none)" in parser._subparsers._group_actions[0].choices["embed"].format_help()
    args = parser.parse_args(
        [
            "extract",
            "--slides",
            "s",
            "--out",
            "o",
            "--target-mpp",
            "1.0",
            "--tile-size-px",
            "64",
            "--encoder-mean",
            "0.5, 0.5,0.5",
        ]
    )
    config = cli.config_from_args(ExtractConfig, args)
    assert (config.target_mpp, config.tile_size_px, config.encoder_mean) == (1.0, 64, (0.5, 0.5, 0.5))
    args = parser.parse_args(["pretrain-tiles", "--slides", "s", "--out", "o", "--target-mpp", "2.0", "--tile-size-px", "32"])
    config = cli.config_from_args(MocoConfig, args)
    assert (config.target_mpp, config.tile_size_px) == (2.0, 32)


@pytest.mark.parametrize(
    "flags",
    [
        ["extract", "--slides", "s", "--out", "o", "--mpp", "1.0"],
        ["extract", "--slides", "s", "--out", "o", "--tile-size", "64"],
        ["pretrain-tiles", "--slides", "s", "--out", "o", "--mpp", "1.0"],
        ["demo", "--tile-size", "64"],
        ["evaluate", "--embeddings", "e.h5", "--labels", "l.csv", "--c", "3"],
    ],
)
def test_the_flags_of_former_names_are_refused_not_read_as_abbreviations(flags, capsys):
    with pytest.raises(SystemExit) as error:
        cli.build_parser().parse_args(flags)
    assert error.value.code == 2
    assert f"unrecognized arguments: {flags[-2]} {flags[-1]}" in capsys.readouterr().err


def test_the_settings_check_themselves_with_the_flags_messages():
    with pytest.raises(ValueError, match="--target-mpp 0"):
        ExtractConfig(slides="s", out="o", target_mpp=0)
    with pytest.raises(ValueError, match="--encoder-std"):
        ExtractConfig(slides="s", out="o", encoder_std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="nothing to do"):
        ExtractConfig(slides="s", out="o", plain=False, bank=False)
    with pytest.raises(ValueError, match="--tissue-threshold 2"):
        MocoConfig(slides="s", out="o", tissue_threshold=2.0)


@pytest.mark.slow
def test_importing_and_running_the_slide_encoder_prints_no_third_party_warning(tmp_path):
    script = textwrap.dedent(f"""
        from gigassl.embed import SlideEmbedder, embed_slides
        import gigassl.train
        from gigassl.model import GigaSSLModel
        from gigassl.synthetic.cohort import write_synthetic_cohort
        paths = write_synthetic_cohort({str(tmp_path)!r}, n_slides=2, n_tiles=6, n_augmentations=1, bank_size=4)
        ids, vectors = embed_slides(GigaSSLModel(None, 256, "cpu").eval(), paths, n_views=2, n_tiles_per_view=3)
        print(len(ids))
    """)
    src = Path(cli.__file__).resolve().parents[1]
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip() == "2"
    assert "Warning" not in completed.stderr and "is_fx_tracing" not in completed.stderr, completed.stderr
