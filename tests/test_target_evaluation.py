"""``gigassl evaluate --task survival|regression`` end to end, ``fit``/``predict`` of Cox models, and
the one-line errors of a survival labels CSV."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from extract.errors import UserError
from gigassl.classifier.config import FitConfig, PredictConfig
from gigassl.classifier.model_file import load_classifier
from gigassl.cli import main as cli_main
from gigassl.config import EvaluateConfig
from gigassl.evaluate import run_evaluation
from gigassl.evaluation.cox import CoxRidge
from gigassl.evaluation.target_protocol import target_splits
from gigassl.evaluation.targets import read_regression_targets, read_survival_targets
from gigassl.explain import SlideExplainer
from gigassl.fit import run_fit
from gigassl.predict import run_predict
from gigassl.synthetic.survival import write_mean_embeddings, write_survival_cohort


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory) -> Path:
    """30 patients × 2 slides of 16 tiles, their labels and stand-in embeddings."""
    folder = tmp_path_factory.mktemp("survival")
    write_survival_cohort(folder / "features", n_patients=30, n_tiles=16, seed=1)
    write_mean_embeddings(folder / "features", folder / "embeddings.h5")
    return folder


def write_rows(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as handle:
        table = csv.writer(handle)
        table.writerow(header)
        table.writerows(rows)
    return path


def cohort_config(cohort_dir: Path, tmp_path: Path, **settings: Any) -> EvaluateConfig:
    """The evaluation settings of the synthetic cohort (embeddings, labels, features), writing to ``tmp_path / "out"``."""
    return EvaluateConfig(
        embeddings=cohort_dir / "embeddings.h5",
        labels=cohort_dir / "features" / "labels.csv",
        features=cohort_dir / "features",
        out=tmp_path / "out",
        **settings,
    )


def test_survival_evaluation_end_to_end(cohort_dir, tmp_path):
    config = cohort_config(
        cohort_dir,
        tmp_path,
        task="survival",
        n_splits=3,
        budgets=("100%",),
    )
    result = run_evaluation(config)
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["task"] == "survival" and report["n_slides"] == 60 and report["n_events"] > 10
    assert [r["method"] for r in result.summary] == ["gigassl", "average"]
    for entry in result.summary:
        assert 0.6 < entry["harrell_c_mean"] <= 1 and 0.6 < entry["uno_c_mean"] <= 1
    rows = report["splits"]
    assert len(rows) == 6 and all(r["uno_tau"] > 0 and 0 <= r["logrank_p"] <= 1 for r in rows)
    assert all(r["seconds"] > 0 and r["cpu_seconds"] >= 0 for r in rows)  # the protocol loop of classification
    assert set(report["seconds_per_method"]) == set(report["cpu_seconds_per_method"]) == {"gigassl", "average"}
    assert report["paired"][0]["method"] == "gigassl" and report["paired"][0]["harrell_c"]["n"] == 3
    assert set(report["risk_groups"]) == {"gigassl", "average"}
    assert (tmp_path / "out" / "kaplan_meier.png").stat().st_size > 10_000
    text = result.format()
    assert "Harrell's C" in text and "Uno's C truncated at the 80th percentile" in text and "paired Δ Uno's C" in text


def test_regression_evaluation_end_to_end(cohort_dir, tmp_path):
    config = cohort_config(
        cohort_dir,
        tmp_path,
        task="regression",
        label_column="score",
        n_splits=3,
        budgets=("100%", "30"),
    )
    result = run_evaluation(config)
    assert {(r["method"], r["budget"]) for r in result.summary} == {
        (m, b) for m in ("gigassl", "average") for b in ("100%", "30")
    }
    for entry in result.summary:
        assert entry["pearson_r_mean"] > 0.6 and entry["r2_mean"] > 0.3  # the score is 10 f + N(0, 1), f the tumour share
    assert {e["budget"] for e in result.paired} == {"100%", "30"}
    assert (tmp_path / "out" / "predicted_vs_observed.png").is_file()
    assert "Pearson r" in result.format() and "evaluate time per method" in result.format()


@pytest.mark.slow
def test_survival_evaluation_with_attention_mil(cohort_dir, tmp_path):
    config = cohort_config(
        cohort_dir,
        tmp_path,
        task="survival",
        baselines=("abmil",),
        reference="abmil",
        mil_epochs=5,
        n_splits=2,
        budgets=("100%",),
    )
    result = run_evaluation(config)
    assert [r["method"] for r in result.summary] == ["gigassl", "abmil"]
    assert np.isfinite(result.summary[1]["harrell_c_mean"]) and result.paired[0]["reference"] == "abmil"


def test_fit_and_predict_a_cox_model(cohort_dir, tmp_path):
    labels = cohort_dir / "features" / "labels.csv"
    fit = run_fit(FitConfig(labels=labels, out=tmp_path / "cox.h5", embeddings=cohort_dir / "embeddings.h5", task="survival"))
    assert fit.n_slides == 60 and fit.classes == ["risk"]
    model = load_classifier(tmp_path / "cox.h5")  # checksum and finite arrays checked on load
    assert model.provenance["task"] == "survival" and model.provenance["time_column"] == "time"
    run_predict(PredictConfig(model=tmp_path / "cox.h5", embeddings=cohort_dir / "embeddings.h5", out=tmp_path / "risk.csv"))
    with open(tmp_path / "risk.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["slide", "risk"] and len(rows) == 60
    targets = read_survival_targets(labels, "slide", "time", "event")
    from gigassl.embeddings_file import read_embeddings

    embeddings = read_embeddings(cohort_dir / "embeddings.h5")
    vectors = embeddings.embeddings[[embeddings.index()[s] for s in targets.slide_ids]]
    expected = CoxRidge(seed=0).fit(vectors, targets.time, targets.event).predict(vectors)
    np.testing.assert_allclose([float(r["risk"]) for r in rows], expected, atol=2e-6)
    with pytest.raises(UserError, match="survival model: explain"):
        SlideExplainer(tmp_path / "cox.h5")


def test_fit_of_an_average_cox_model_predicts_from_features(cohort_dir, tmp_path):
    labels = cohort_dir / "features" / "labels.csv"
    run_fit(FitConfig(labels=labels, out=tmp_path / "m.h5", method="average", features=cohort_dir / "features", task="survival"))
    run_predict(PredictConfig(model=tmp_path / "m.h5", features=cohort_dir / "features", out=tmp_path / "risk.csv"))
    with open(tmp_path / "risk.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 60 and all(np.isfinite(float(r["risk"])) for r in rows)


@pytest.mark.parametrize(
    "header, row, message",
    [
        (["slide", "event"], ["a", "1"], r"no column 'time'.*--time-column"),
        (["slide", "time"], ["a", "3"], r"no column 'event'.*--event-column"),
        (
            ["slide", "time", "event"],
            ["a", "three", "1"],
            r"line 2 \(slide 'a'\): time column 'time' is 'three', not a finite number",
        ),
        (["slide", "time", "event"], ["a", "", "1"], r"time column 'time' is empty"),
        (["slide", "time", "event"], ["a", "-2", "1"], r"time column 'time' is negative"),
        (["slide", "time", "event"], ["a", "2", "2"], r"event column 'event' is '2'; write 1 \(or true\)"),
        (["slide", "time", "event"], ["a", "2", "0"], r"no event among 1 slides"),
    ],
)
def test_bad_survival_labels_give_one_line(tmp_path, header, row, message):
    path = write_rows(tmp_path / "labels.csv", header, [row])
    with pytest.raises(UserError, match=message) as error:
        read_survival_targets(path, "slide", "time", "event")
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_true_and_false_events_are_accepted(tmp_path):
    path = write_rows(tmp_path / "labels.csv", ["slide", "time", "event"], [["a", "1", "True"], ["b", "2", "false"]])
    assert read_survival_targets(path, "slide", "time", "event").event.tolist() == [True, False]


def test_bad_regression_target_gives_one_line(tmp_path):
    path = write_rows(tmp_path / "labels.csv", ["slide", "score"], [["a", "1.5"], ["b", "n/a"]])
    with pytest.raises(UserError, match=r"line 3 \(slide 'b'\): target column 'score' is 'n/a'"):
        read_regression_targets(path, "slide", "score")


def test_a_split_without_events_says_what_to_do(tmp_path):
    rows = [[f"s{i}", str(i + 1), "1" if i == 0 else "0"] for i in range(12)]
    path = write_rows(tmp_path / "labels.csv", ["slide", "time", "event"], rows)
    targets = read_survival_targets(path, "slide", "time", "event")
    config = EvaluateConfig(embeddings=tmp_path / "e.h5", labels=path, task="survival", n_splits=3)
    with pytest.raises(
        UserError, match=r"1 events among 12 slides: each split needs events in its training and its test part"
    ) as error:
        target_splits(targets, config)
    assert "\n" not in str(error.value)


def test_the_cli_reports_a_bad_time_column_in_one_line(cohort_dir, tmp_path, caplog):
    path = write_rows(tmp_path / "labels.csv", ["slide", "months", "event"], [["slide_000", "-1", "1"]])
    with caplog.at_level(logging.ERROR):
        status = cli_main(
            [
                "evaluate",
                "--embeddings",
                str(cohort_dir / "embeddings.h5"),
                "--labels",
                str(path),
                "--task",
                "survival",
                "--time-column",
                "months",
            ]
        )
    assert status == 2
    assert any("time column 'months' is negative" in r.getMessage() and "\n" not in r.getMessage() for r in caplog.records)


def test_settings_refuse_an_unknown_task_and_topk_for_survival(tmp_path):
    with pytest.raises(ValueError, match="--task 'cox'"):
        EvaluateConfig(embeddings=tmp_path / "e.h5", labels=tmp_path / "l.csv", task="cox")
    with pytest.raises(ValueError, match="top-k fine-tuning is a classifier"):
        EvaluateConfig(embeddings=tmp_path / "e.h5", labels=tmp_path / "l.csv", task="survival", baselines=("topk",))
    with pytest.raises(ValueError, match="fits a Cox model on slide vectors"):
        FitConfig(labels=tmp_path / "l.csv", out=tmp_path / "m.h5", method="abmil", features=tmp_path, task="survival")
