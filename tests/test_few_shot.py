"""The few-shot protocol: K slides per class (1, 2 …) as budgets or ``--shots``, valid splits, the
seconds per method and what methods needing an inner split do with one slide per class; and the
attention-MIL settings as validated flags."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from extract.errors import UserError
from gigassl.cli import main as cli_main
from gigassl.config import EvaluateConfig
from gigassl.evaluate import attention_mil, run_evaluation
from gigassl.evaluation.classification import AttentionMethod, LinearMethod
from gigassl.evaluation.mil import AttentionMIL
from gigassl.evaluation.protocol import budget_subset, make_splits, parse_budgets
from test_evaluate import clustered, write_embeddings, write_labels
from test_plain_features import write_trident_file


def test_one_and_two_shots_give_valid_subsets_over_fifty_splits():
    y = np.repeat(np.arange(4), 10)
    splits = make_splits(y, None, 50, 0.3, seed=0)
    for budget in parse_budgets("1/class,2/class"):
        for s, (train, test) in enumerate(splits):
            subset = budget_subset(train, y, budget, np.random.default_rng([0, s]), s)
            assert np.bincount(y[subset], minlength=4).tolist() == [int(budget.value)] * 4
            assert set(subset) <= set(train) and not set(subset) & set(test)
            assert len(np.unique(y[test])) == 4
    # the draws differ from split to split (50 runs, not one subset repeated)
    firsts = {
        tuple(budget_subset(t, y, parse_budgets("1/class")[0], np.random.default_rng([0, s]))) for s, (t, _) in enumerate(splits)
    }
    assert len(firsts) > 25


def test_shots_replace_the_budgets_and_are_checked():
    config = EvaluateConfig(embeddings="e.h5", labels="l.csv", shots=("1", "2", "4", "8", "16"))
    assert config.budget_texts == ("1/class", "2/class", "4/class", "8/class", "16/class")
    assert EvaluateConfig(embeddings="e.h5", labels="l.csv").budget_texts == ("100%", "25%")
    with pytest.raises(UserError, match=r"--shots replaces --budgets"):
        EvaluateConfig(embeddings="e.h5", labels="l.csv", shots=("1",), budgets=("50",))
    with pytest.raises(UserError, match=r"--shots 0,x: \['0', 'x'\] are not positive whole numbers"):
        EvaluateConfig(embeddings="e.h5", labels="l.csv", shots=("0", "x"))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(mil_lr=0.0), "--mil-lr must be > 0"),
        (dict(mil_weight_decay=-1e-4), "--mil-weight-decay must be ≥ 0"),
        (dict(mil_dropout=1.0), r"--mil-dropout must lie in \[0, 1\)"),
        (dict(mil_lr_schedule="step"), "--mil-lr-schedule 'step': choose one of constant, cosine, one-cycle"),
        (dict(mil_batch_size=0), "--mil-batch-size must be ≥ 1"),
        (dict(mil_max_tiles=0), "--mil-max-tiles must be ≥ 1"),
        (dict(mil_patience=0), "--mil-patience must be ≥ 1"),
    ],
)
def test_bad_attention_mil_settings_are_one_line_errors(change, message):
    with pytest.raises(UserError, match=message) as error:
        EvaluateConfig(embeddings="e.h5", labels="l.csv", **change)
    assert "\n" not in str(error.value)


def test_the_mil_flags_build_the_estimator(tmp_path):
    config = EvaluateConfig(
        embeddings="e.h5",
        labels="l.csv",
        mil_lr=1e-3,
        mil_weight_decay=0.0,
        mil_dropout=0.1,
        mil_batch_size=4,
        mil_max_tiles=16,
        mil_standardize=True,
        mil_early_stopping=False,
        mil_lr_schedule="cosine",
        mil_epochs=7,
        mil_patience=3,
    )
    params = attention_mil(config).get_params()
    assert {k: params[k] for k in ("lr", "weight_decay", "dropout", "batch_size", "max_tiles", "max_epochs", "patience")} == dict(
        lr=1e-3, weight_decay=0.0, dropout=0.1, batch_size=4, max_tiles=16, max_epochs=7, patience=3
    )
    assert params["standardize"] and params["validation_fraction"] == 0.0 and params["lr_schedule"] == "cosine"
    assert attention_mil(EvaluateConfig(embeddings="e.h5", labels="l.csv", mil_early_stopping=True)).validation_fraction > 0


def test_one_shot_fallbacks_are_said_instead_of_failing():
    y = np.array([0, 1, 2, 3])
    tuned = LinearMethod("average", np.random.default_rng(0).standard_normal((8, 3)), c=10.0, tune_c=True)
    assert (
        tuned.fallback(y) == "C fixed at 10: choosing C by inner cross-validation (--tune-c) needs ≥ 2 training slides per class"
    )
    assert tuned.fallback(np.repeat(np.arange(4), 2)) == ""
    assert LinearMethod("average", np.zeros((8, 3))).fallback(y) == ""  # no inner CV, nothing to fall back from
    stopping = AttentionMethod([], AttentionMIL(validation_fraction=0.2, max_epochs=30))
    assert stopping.fallback(y).startswith("no early stopping") and "fixed 30 epochs" in stopping.fallback(y)
    assert AttentionMethod([], AttentionMIL(validation_fraction=0.0)).fallback(y) == ""


def _cohort(tmp_path, n_per_class: int = 6, names=("a", "b", "c")):
    folder = tmp_path / "features"
    folder.mkdir()
    ids, labels, vectors = clustered(n_per_class, list(names))
    rng = np.random.default_rng(1)
    for i, (slide_id, label) in enumerate(zip(ids, labels)):
        path = write_trident_file(folder / f"{slide_id}.h5", n_tiles=6, width=16, seed=i)
        with h5py.File(path, "a") as handle:
            handle["features"][:, names.index(label)] += 3.0 + 0.1 * rng.standard_normal(6)
    csv_path = write_labels(tmp_path / "labels.csv", list(zip(ids, labels)), header=("slide", "label"))
    return write_embeddings(tmp_path / "e.h5", ids, vectors), csv_path, folder


def test_shots_run_end_to_end_with_seconds_per_method_and_the_one_shot_fallbacks(tmp_path):
    embeddings, labels, features = _cohort(tmp_path)
    config = EvaluateConfig(
        embeddings=embeddings,
        labels=labels,
        features=features,
        baselines=("average", "abmil"),
        out=tmp_path / "out",
        n_splits=3,
        shots=("1", "2"),
        tune_c=True,
        mil_early_stopping=True,  # off by default; on, it needs an inner split one slide per class cannot give
        mil_epochs=2,
        device="cpu",
    )
    result = run_evaluation(config)
    assert [(r["method"], r["budget"]) for r in result.summary] == [
        (m, b) for m in ("gigassl", "average", "abmil") for b in ("1/class", "2/class")
    ]
    assert all(r["n_train"] == 3 * int(r["budget"][0]) for r in result.summary)
    record = json.loads(result.json_path.read_text())
    assert set(record["seconds_per_method"]) == {"gigassl", "average", "abmil"}
    assert all(s > 0 for s in record["seconds_per_method"].values())
    said = {(f["method"], f["budget"]): f["fallback"] for f in record["fallbacks"]}
    assert said[("gigassl", "1/class")].startswith("C fixed at 10") and said[("average", "1/class")].startswith("C fixed")
    assert said[("abmil", "1/class")].startswith("no early stopping")
    assert ("gigassl", "2/class") not in said  # two per class: the inner cross-validation runs
    assert record["settings"]["shots"] == ["1", "2"]
    text = result.format()
    assert "evaluate time per method" in text and "abmil @ 1/class: no early stopping" in text


def test_shots_flag_on_the_command_line(tmp_path, capsys):
    embeddings, labels, _ = _cohort(tmp_path, n_per_class=5)
    code = cli_main(
        [
            "evaluate",
            "--embeddings",
            str(embeddings),
            "--labels",
            str(labels),
            "--out",
            str(tmp_path / "o"),
            "--shots",
            "1,2",
            "--n-splits",
            "2",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "1/class" in out and "2/class" in out and "evaluate time per method" in out
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["evaluate", "--embeddings", str(embeddings), "--labels", str(labels), "--shots", "1", "--budgets", "50"])
    assert exit_info.value.code == 2 and "--shots replaces --budgets" in capsys.readouterr().err


def test_the_evaluate_defaults_are_the_estimators_defaults():
    """One set of attention-MIL defaults: the flags' defaults build AttentionMIL() as it stands,
    and `gigassl fit` trains as many epochs."""
    from gigassl.classifier.config import FitConfig

    built = attention_mil(EvaluateConfig(embeddings="e.h5", labels="l.csv")).get_params()
    assert built == AttentionMIL().get_params()
    assert FitConfig(labels="l.csv", out="m.h5", features="f", method="abmil").mil_epochs == AttentionMIL().max_epochs
