"""``gigassl demo``: the whole pipeline on the synthetic cohort, with a tiny profile."""

from __future__ import annotations

import dataclasses
import json

import h5py
import numpy as np
import pytest

from extract.features.slide_file import SlideFeatures
from gigassl.cli import build_parser, config_from_args
from gigassl.config import DemoConfig
from gigassl.demo import run_demo

# Fewer and smaller everything than the default profile: the stages are the same.
TINY = dict(
    n_slides=20, n_augmentations=4, n_tiles_per_augmentation=16, epochs=4, batch_size=20, n_views=20, n_splits=5, device="cpu"
)


@pytest.mark.slow
def test_demo_runs_every_stage_and_gigassl_beats_chance(tmp_path):
    result = run_demo(DemoConfig(out=tmp_path / "demo", **TINY))
    out = tmp_path / "demo"

    assert result.exit_code == 0
    assert len(result.slides) == 20 and all(p.parent == out / "slides" for p in result.slides)
    assert [p.stem for p in result.features] == [p.stem for p in result.slides]
    assert [p.stem for p in result.qc] == [p.stem for p in result.slides]
    with SlideFeatures(result.features[0], require_plain=True, require_bank=True) as features:
        assert (features.n_augmentations, features.bank_size) == (4, 16)
        assert features.n_plain_tiles > 5
    assert result.checkpoint.is_file() and result.monitors.is_file()
    assert result.curves is not None and result.curves.is_file()
    with h5py.File(result.embeddings, "r") as handle:
        embeddings = handle["embeddings"][...]
    assert embeddings.shape == (20, 512)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-4)
    names = {p.name for p in result.evaluation}
    assert {"results.csv", "results.json", "auc_vs_training_slides.png"} <= names

    assert set(result.auc) == {"gigassl", "average", "abmil"}
    assert result.auc["gigassl"] > 0.5
    summary = json.loads((out / "evaluation" / "results.json").read_text())["summary"]
    assert {row["method"] for row in summary} == {"gigassl", "average", "abmil"}

    printed = result.format()
    assert "ROC-AUC" in printed and "gigassl" in printed
    # the reading: paired differences, and with the random encoder the cause and the fix
    assert "paired Δ ROC-AUC vs average" in printed and "ahead in" in printed
    assert "the tile encoder is random" in printed and "gigassl pretrain-tiles --slides" in printed
    for path in (result.checkpoint, result.curves, result.embeddings, result.labels):
        assert str(path) in printed
    assert set(result.seconds) == {"cohort", "extract", "train", "embed", "evaluate"}


def test_demo_refuses_a_cohort_too_small_to_evaluate(tmp_path):
    with pytest.raises(ValueError, match=r"--n-slides must be ≥ 10 \(got 4\)"):
        DemoConfig(out=tmp_path, n_slides=4)
    assert not (tmp_path / "slides").exists()


def test_demo_refuses_unknown_baselines(tmp_path):
    with pytest.raises(ValueError, match="transformer"):
        DemoConfig(out=tmp_path, baselines=("average", "transformer"))
    assert DemoConfig(baselines=("average", "abmil")).baselines == ("average", "abmil")


def test_demo_flags_map_onto_the_settings():
    parser = build_parser()
    args = parser.parse_args(["demo", "--out", "x", "--n-slides", "20", "--epochs", "3", "--encoder", "enc.pt"])
    config = config_from_args(DemoConfig, args)
    assert (str(config.out), config.n_slides, config.epochs, config.encoder) == ("x", 20, 3, "enc.pt")
    defaults = DemoConfig()
    assert dataclasses.replace(config, out=defaults.out, n_slides=40, epochs=defaults.epochs, encoder="random") == defaults


def test_the_reading_names_the_tile_encoder_only_when_it_is_random():
    from gigassl.demo import how_to_read

    paired = [
        dict(
            method="gigassl",
            budget="100%",
            reference="average",
            auc=dict(mean=-0.05, ci_low=-0.1, ci_high=0.0, wins=1, n=5, interval="t over splits"),
        )
    ]
    random_text = how_to_read(paired, "random", 3.6, 20)
    assert "-5.0 pt [-10.0, +0.0]  ahead in 1/5" in random_text
    assert "3.60, against 3.66 for a constant output" in random_text  # log(2·20 − 1) = 3.66
    trained_text = how_to_read(paired, "runs/moco/encoder.pt", 2.0, 20)
    assert "ahead in 1/5" in trained_text and "random" not in trained_text
