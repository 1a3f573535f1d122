"""Label-free monitors against analytic values; RankMe and the monitors files shared by both stages."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

import extract.moco.monitors
import extract.monitors
from extract.monitors import write_monitors
from gigassl.training.monitors import collapse_level, odcorr, rankme


def test_identical_rows_are_complete_collapse_of_rank_one() -> None:
    z = torch.tensor([[0.3, -1.2, 2.0, 0.5]]).repeat(32, 1)
    assert collapse_level(z) == pytest.approx(1.0, abs=1e-9)
    assert rankme(z) == pytest.approx(1.0, abs=1e-4)
    assert odcorr(z) == 0.0  # constant dimensions correlate with nothing


def test_orthonormal_rows_have_analytic_values() -> None:
    # rows e_1 … e_D: every dim holds one 1 among D, unbiased std √(1/D), so the collapse level is
    # exactly 0; D equal singular values give RankMe D; two dims correlate at −1/(D − 1)
    d = 8
    z = torch.eye(d)
    assert collapse_level(z) == pytest.approx(0.0, abs=1e-9)
    assert rankme(z) == pytest.approx(d, rel=1e-5)
    assert odcorr(z) == pytest.approx(1 / (d - 1), rel=1e-9)


def test_gaussian_outputs_are_spread_full_rank_and_decorrelated() -> None:
    rng = np.random.default_rng(0)
    z = rng.standard_normal((4000, 16))
    assert abs(collapse_level(z)) < 0.05
    assert rankme(z) > 15.5
    assert odcorr(z) < 0.03


def test_a_low_rank_embedding_is_seen_by_rankme_and_odcorr() -> None:
    rng = np.random.default_rng(1)
    basis = rng.standard_normal((2, 32))
    z = rng.standard_normal((500, 2)) @ basis  # rank 2 in 32 dims
    assert 1.0 < rankme(z) <= 2.0 + 1e-6
    assert odcorr(z) > 0.3
    one_factor = rng.standard_normal((500, 1)) * rng.uniform(0.5, 2.0, (1, 6)) + rng.standard_normal((1, 6))
    assert odcorr(one_factor) == pytest.approx(1.0, abs=1e-9)  # affine copies of one factor


def test_numpy_and_torch_inputs_agree() -> None:
    rng = np.random.default_rng(2)
    z = rng.standard_normal((40, 8)).astype(np.float32)
    for monitor in (collapse_level, rankme, odcorr):
        value = monitor(z)
        assert isinstance(value, float) and math.isfinite(value)
        assert monitor(torch.from_numpy(z)) == value


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\(B, D\) batch with B ≥ 2"):
        collapse_level(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\(B, D\) batch with B ≥ 1"):
        rankme(torch.zeros(0, 4))
    assert rankme(torch.ones(1, 4)) == pytest.approx(1.0, abs=1e-4)  # one row (MoCo with --monitor-tiles 1): rank 1
    with pytest.raises(ValueError, match="NaN"):
        collapse_level(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="two dimensions"):
        odcorr(torch.zeros(4, 1))


def test_rankme_is_one_function_for_both_stages_with_the_papers_epsilon() -> None:
    assert extract.moco.monitors.rankme is extract.monitors.rankme is rankme
    # Garrido et al.: p = σ / ‖σ‖₁ + ε (and ε beside ‖σ‖₁, for an all-zero batch); σ = (3, 1)
    z = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    eps = extract.monitors.RANKME_EPS
    p = np.array([3.0, 1.0]) / (4.0 + eps) + eps
    assert rankme(z) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert rankme(torch.zeros(3, 4)) == pytest.approx(1.0, abs=1e-4)  # finite on an all-zero batch


def test_monitors_files_keep_the_columns_asked_for(tmp_path) -> None:
    rows = [dict(epoch=0, loss=2.0), dict(epoch=1, train_loss=3.0, loss=1.5)]
    csv_path, json_path = write_monitors(tmp_path, rows, ("epoch", "train_loss", "loss"))
    assert json.loads(json_path.read_text()) == rows
    assert csv_path.read_text().splitlines() == ["epoch,train_loss,loss", "0,,2.0", "1,3.0,1.5"]
    # default: the last row's keys (MoCo's rows all have the same)
    write_monitors(tmp_path, rows[1:])
    with open(csv_path, newline="") as handle:
        assert list(csv.DictReader(handle)) == [{"epoch": "1", "train_loss": "3.0", "loss": "1.5"}]
