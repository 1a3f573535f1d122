"""Paired differences of methods on the same splits, checked against hand computations."""

import json
import math

import numpy as np
import pytest

from gigassl.config import EvaluateConfig
from gigassl.evaluate import run_evaluation
from gigassl.evaluation.paired import cluster_bootstrap, paired_differences, pooled_paired_differences, t_interval
from test_evaluate import clustered, write_embeddings, write_labels


def _rows(scores: dict[str, list[float]], budget: str = "100%") -> list[dict]:
    return [
        dict(method=m, budget=budget, split=s, auc=v, balanced_accuracy=v / 2)
        for m, values in scores.items()
        for s, v in enumerate(values)
    ]


def test_t_interval_hand_computed():
    d = np.array([0.02, 0.05, -0.01, 0.04])
    mean, sd = d.mean(), d.std(ddof=1)  # 0.025, 0.026458
    t_975_3 = 3.182446305284263  # Student t quantile, 3 degrees of freedom
    low, high = t_interval(d)
    assert low == pytest.approx(mean - t_975_3 * sd / 2) and high == pytest.approx(mean + t_975_3 * sd / 2)
    assert math.isnan(t_interval(np.array([0.1]))[0])


def test_paired_differences_by_hand():
    rows = _rows({"gigassl": [0.80, 0.90, 0.70, 0.85], "average": [0.78, 0.85, 0.71, 0.81]})
    (entry,) = paired_differences(rows, "average")
    d = np.array([0.02, 0.05, -0.01, 0.04])
    assert entry["method"] == "gigassl" and entry["reference"] == "average" and entry["budget"] == "100%"
    assert entry["auc"]["mean"] == pytest.approx(d.mean())
    assert (entry["auc"]["ci_low"], entry["auc"]["ci_high"]) == pytest.approx(t_interval(d))
    assert entry["auc"]["wins"] == 3 and entry["auc"]["n"] == 4
    assert entry["balanced_accuracy"]["mean"] == pytest.approx(d.mean() / 2)
    assert paired_differences(rows, "abmil") == []  # the reference was not run


def test_a_shared_split_effect_cancels_in_the_pairing():
    """A method 1 point ahead on every split is ahead with a tight interval, although its
    split-to-split spread dwarfs the gap — what mean ± s.d. per method cannot show."""
    base = np.random.default_rng(0).uniform(0.6, 0.95, size=10)
    rows = _rows({"gigassl": list(base + 0.01), "average": list(base)})
    (entry,) = paired_differences(rows, "average")
    assert entry["auc"]["wins"] == 10
    assert entry["auc"]["ci_low"] == pytest.approx(0.01) and entry["auc"]["ci_high"] == pytest.approx(0.01)


def test_cluster_bootstrap_and_pooling():
    runs = [_rows({"gigassl": [0.9, 0.8], "average": [0.85, 0.8]}), _rows({"gigassl": [0.7, 0.75], "average": [0.72, 0.7]})]
    (entry,) = pooled_paired_differences(runs, "average", draws=2000)
    pooled = np.array([0.05, 0.0, -0.02, 0.05])
    assert entry["auc"]["mean"] == pytest.approx(pooled.mean()) and entry["auc"]["n"] == 4
    assert entry["auc"]["wins"] == 2 and entry["n_runs"] == 2
    assert entry["auc"]["per_run"] == pytest.approx([0.025, 0.015])
    low, high = entry["auc"]["ci_low"], entry["auc"]["ci_high"]
    assert pooled.min() - 1e-12 <= low <= pooled.mean() <= high <= pooled.max() + 1e-12
    # one run, constant differences: the interval collapses onto them
    assert cluster_bootstrap([np.array([0.03, 0.03, 0.03])], draws=200) == pytest.approx((0.03, 0.03))


def test_evaluate_prints_and_writes_paired_differences(tmp_path):
    ids, labels, vectors = clustered(10, ["a", "b"], seed=3)
    embeddings = write_embeddings(tmp_path / "e.h5", ids, vectors)
    csv_path = write_labels(tmp_path / "l.csv", list(zip(ids, labels)), header=("slide", "label"))
    result = run_evaluation(
        EvaluateConfig(
            embeddings=embeddings,
            labels=csv_path,
            out=tmp_path / "out",
            n_splits=4,
            budgets=("100%", "3/class"),
            reference="gigassl",
        )
    )
    assert result.paired == []  # only gigassl ran: nothing to compare
    # compare gigassl with itself run as the reference: rows duplicated under another name
    rows = result.rows + [dict(r, method="copy", auc=r["auc"] - 0.01) for r in result.rows]
    (first, _second) = paired_differences(rows, "copy")
    assert first["auc"]["mean"] == pytest.approx(0.01) and first["auc"]["wins"] == 4
    saved = json.loads(result.json_path.read_text())
    assert saved["paired"] == [] and saved["settings"]["reference"] == "gigassl"
    with pytest.raises(Exception, match="--reference"):
        run_evaluation(EvaluateConfig(embeddings=embeddings, labels=csv_path, out=tmp_path / "o", reference="nope"))
