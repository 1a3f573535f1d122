"""Survival metrics and the ridge Cox model: hand computations, scikit-survival as the reference,
the synthetic cohort's true-risk ceiling, the paired intervals on survival rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sksurv.compare import compare_survival
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.metrics import concordance_index_censored, concordance_index_ipcw
from sksurv.nonparametric import kaplan_meier_estimator
from sksurv.util import Surv

from gigassl.evaluation.attention_targets import AttentionTargetMIL, cox_loss
from gigassl.evaluation.cox import CoxRidge, fit_ridge_cox, partial_log_likelihood
from gigassl.evaluation.paired import paired_differences
from gigassl.evaluation.survival_metrics import harrell_c, kaplan_meier, logrank_test, median_split_logrank, uno_c, uno_tau
from gigassl.synthetic.survival import draw_survival_cohort, slide_tile_features

# times 1, 2, 3, 4; the slide at 2 is censored
TIME = np.array([1.0, 2.0, 3.0, 4.0])
EVENT = np.array([True, False, True, True])
RISK = np.array([0.9, 0.95, 0.5, 0.5])


def random_survival(n: int, seed: int, rounded: bool = False):
    rng = np.random.default_rng(seed)
    risk = rng.standard_normal(n)
    time = rng.exponential(np.exp(-risk))
    if rounded:
        time = np.round(time, 1) + 0.1  # ties in time
    return time, rng.random(n) < 0.65, risk + 0.7 * rng.standard_normal(n)


def test_harrell_c_by_hand():
    # comparable pairs: (1, 2) discordant, (1, 3) and (1, 4) concordant, (3, 4) tied risk: (0 + 1 + 1 + ½) / 4
    assert harrell_c(TIME, EVENT, RISK) == pytest.approx(0.625)
    assert harrell_c(TIME, EVENT, -TIME) == pytest.approx(1.0)


def test_uno_c_by_hand():
    # censoring KM on the same data: G = 1 before t = 2, 2/3 from it; tau = 3.5 leaves out the event at 4.
    # pairs of the event at 1: weight 1, scores 0, 1, 1; pair (3, 4): weight (3/2)² = 9/4, score ½
    expected = (2 + 9 / 4 * 0.5) / (3 + 9 / 4)
    assert uno_c(TIME, EVENT, TIME, EVENT, RISK, tau=3.5) == pytest.approx(expected)
    assert uno_tau(np.arange(1.0, 11.0)) == pytest.approx(8.2)  # the 80th percentile of the training times


@pytest.mark.parametrize("rounded", [False, True])
def test_harrell_c_matches_scikit_survival(rounded):
    time, event, risk = random_survival(80, 1, rounded)
    risk[:5] = risk[5]  # tied risks
    assert harrell_c(time, event, risk) == pytest.approx(concordance_index_censored(event, time, risk)[0], abs=1e-12)


def test_uno_c_matches_scikit_survival():
    train_time, train_event, _ = random_survival(120, 2)
    time, event, risk = random_survival(60, 3)
    tau = uno_tau(train_time)
    reference = concordance_index_ipcw(Surv.from_arrays(train_event, train_time), Surv.from_arrays(event, time), risk, tau)[0]
    assert uno_c(train_time, train_event, time, event, risk, tau) == pytest.approx(reference, abs=1e-12)


def test_kaplan_meier_and_logrank_match_scikit_survival():
    time, event, risk = random_survival(90, 4, rounded=True)
    times, survival = kaplan_meier(time, event)
    ref_times, ref_survival = kaplan_meier_estimator(event, time)
    np.testing.assert_allclose(times, ref_times)
    np.testing.assert_allclose(survival, ref_survival, atol=1e-12)
    group = risk > np.median(risk)
    statistic, p = logrank_test(time, event, group)
    ref_statistic, ref_p = compare_survival(Surv.from_arrays(event, time), group)
    assert statistic == pytest.approx(ref_statistic, rel=1e-9)
    assert p == pytest.approx(ref_p, rel=1e-9)
    assert median_split_logrank(time, event, risk) == pytest.approx(ref_p, rel=1e-9)


@pytest.mark.parametrize("n, width", [(60, 5), (30, 50)])  # the direct fit, and the fit through the slides' span (D > n)
def test_ridge_cox_matches_scikit_survival(n, width):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((n, width))
    time = np.round(rng.exponential(np.exp(-x[:, 0])), 1) + 0.1  # Breslow ties
    event = rng.random(n) < 0.7
    reference = CoxPHSurvivalAnalysis(alpha=3.0, ties="breslow").fit(x, Surv.from_arrays(event, time))
    np.testing.assert_allclose(fit_ridge_cox(x, time, event, 3.0), reference.coef_, atol=1e-6)


def test_cox_loss_is_the_partial_likelihood_per_event():
    time, event, risk = random_survival(40, 6, rounded=True)
    expected = -partial_log_likelihood(risk[:, None], time, event, np.ones(1)) / event.sum()
    loss = cox_loss(torch.tensor(risk), torch.tensor(time), torch.tensor(event))
    assert float(loss) == pytest.approx(expected, rel=1e-10)


def test_paired_intervals_on_survival_rows_by_hand():
    harrell = {"gigassl": [0.70, 0.74, 0.69], "average": [0.66, 0.70, 0.68]}
    rows = [
        dict(method=m, budget="100%", split=s, harrell_c=v, uno_c=v - 0.01)
        for m, values in harrell.items()
        for s, v in enumerate(values)
    ]
    entry = paired_differences(rows, "average", ("harrell_c", "uno_c"))[0]
    differences = np.array([0.04, 0.04, 0.01])
    half = 4.302652729911275 * differences.std(ddof=1) / np.sqrt(3)  # t(0.975, 2)
    assert entry["method"] == "gigassl" and entry["reference"] == "average"
    assert entry["harrell_c"]["mean"] == pytest.approx(0.03)
    assert entry["harrell_c"]["ci_low"] == pytest.approx(0.03 - half)
    assert entry["harrell_c"]["ci_high"] == pytest.approx(0.03 + half)
    assert entry["harrell_c"]["wins"] == 3 and entry["uno_c"]["mean"] == pytest.approx(0.03)


def test_fitted_cox_approaches_the_true_risk_ceiling():
    """On the synthetic cohort the true risk's C-index is the ceiling; the Cox fit on the slides'
    mean tile features comes close to it on held-out patients (and not above it, beyond noise)."""
    cohort = draw_survival_cohort(n_patients=150, seed=1)
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(64).astype(np.float32)
    vectors = np.stack([slide_tile_features(f, 64, direction, rng).mean(axis=0) for f in cohort.tumour_fraction])
    patient = np.array([int(p.split("_")[1]) for p in cohort.patients])
    train, test = patient < 100, patient >= 100
    model = CoxRidge(seed=0).fit(vectors[train], cohort.time[train], cohort.event[train], np.array(cohort.patients)[train])
    fitted = harrell_c(cohort.time[test], cohort.event[test], model.predict(vectors[test]))
    ceiling = harrell_c(cohort.time[test], cohort.event[test], cohort.true_risk[test])
    assert ceiling > 0.7
    assert ceiling - 0.06 < fitted < ceiling + 0.02, (fitted, ceiling)


@pytest.mark.slow  # a minute on a loaded 2-core host, most of it torch's first optimiser import
def test_attention_mil_with_a_cox_loss_ranks_better_than_chance():
    cohort = draw_survival_cohort(n_patients=40, seed=1)
    rng = np.random.default_rng(1)
    direction = 2.0 * rng.standard_normal(16).astype(np.float32)
    bags = [slide_tile_features(f, 12, direction, rng) for f in cohort.tumour_fraction]
    model = AttentionTargetMIL("cox", max_epochs=15, seed=0).fit(bags[:60], cohort.time[:60], cohort.event[:60])
    risk = model.predict(bags[60:])
    assert risk.shape == (20,) and np.isfinite(risk).all()
    assert harrell_c(cohort.time[60:], cohort.event[60:], risk) > 0.6
