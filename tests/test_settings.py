"""The settings dataclasses of both stages: one message naming every problem, tuples as tuples."""

from __future__ import annotations

from pathlib import Path

import pytest

from extract.config import ExtractConfig, GridLimits, MocoConfig
from extract.errors import UserError
from extract.settings import flag, settings_dict, too_small
from gigassl.classifier.config import ExplainConfig
from gigassl.config import DemoConfig, EmbedConfig, EvaluateConfig, TrainConfig


def test_every_problem_of_an_extraction_is_named_in_one_message():
    with pytest.raises(UserError) as error:
        ExtractConfig(slides="s", out="o", tile_size_px=8, max_ink_fraction=2.0, encoder_std=(0.2, 0.0, 0.2))
    message = str(error.value)
    assert message.startswith("invalid extraction settings: ") and "\n" not in message
    assert "--tile-size-px 8: must be at least 16 px" in message
    assert "--max-ink-fraction 2.0: must lie in [0, 1]" in message
    assert "--encoder-std (0.2, 0.0, 0.2): give three finite numbers" in message


def test_every_problem_of_a_pretraining_and_of_grid_limits_is_named_in_one_message():
    with pytest.raises(UserError) as error:
        MocoConfig(slides="s", out="o", arch="vgg", target_mpp=0, epochs=0, momentum=1.0)
    message = str(error.value)
    for part in ("--arch 'vgg'", "--target-mpp 0", "--epochs 0: must be at least 1", "--momentum 1.0"):
        assert part in message, part
    with pytest.raises(UserError, match=r"--arch 'vgg'.*--profile 'huge'"):  # the profile's values are needed first
        MocoConfig(slides="s", out="o", arch="vgg", profile="huge")
    with pytest.raises(UserError, match=r"--max-upscale 0.5.*--max-tiles-per-slide 0"):
        GridLimits(max_upscale=0.5, max_tiles_per_slide=0)


def test_a_comma_string_for_a_tuple_setting_is_refused_naming_the_tuple_to_give():
    with pytest.raises(UserError, match=r"--baselines 'average,abmil': give a tuple such as \('average', 'abmil'\)"):
        EvaluateConfig(embeddings="e.h5", labels="l.csv", baselines="average,abmil")
    with pytest.raises(UserError, match=r"--encoder-mean '0.5,0.5,0.5': give a tuple such as \(0.5, 0.5, 0.5\)"):
        ExtractConfig(slides="s", out="o", encoder_mean="0.5,0.5,0.5")
    for make in (
        lambda: EmbedConfig(model="m.pt", features="f", out="e.h5", export="npz"),
        lambda: DemoConfig(baselines="average"),
        lambda: ExplainConfig(model="m.h5", features="f", slide_ids="slide_1"),
        lambda: EvaluateConfig(embeddings="e.h5", labels="l.csv", shots="1,2"),
    ):
        with pytest.raises(UserError, match="give a tuple such as"):
            make()
    # a list is taken, and kept as a tuple (the dataclasses are frozen and hashable)
    assert EvaluateConfig(embeddings="e.h5", labels="l.csv", budgets=["100%", "4/class"]).budgets == ("100%", "4/class")
    assert ExtractConfig(slides="s", out="o", encoder_mean=[1, 2, 3]).encoder_mean == (1.0, 2.0, 3.0)
    with pytest.raises(UserError, match="--export 3: give a tuple of values"):
        EmbedConfig(model="m.pt", features="f", out="e.h5", export=3)


def test_the_former_names_are_gone():
    with pytest.raises(TypeError, match="mpp"):
        ExtractConfig(slides="s", out="o", mpp=1.0)
    assert not hasattr(EvaluateConfig(embeddings="e.h5", labels="l.csv"), "c")


def test_shared_helpers():
    config = TrainConfig(features=Path("f"), out=Path("o"))
    plain = settings_dict(config, drop=("out",))
    assert plain["features"] == "f" and "out" not in plain and plain["n_tiles_per_view"] == 5
    assert flag("n_tiles_per_view") == "--n-tiles-per-view"
    assert too_small(config, 6, ("n_tiles_per_view", "batch_size")) == ["--n-tiles-per-view must be ≥ 6 (got 5)"]
