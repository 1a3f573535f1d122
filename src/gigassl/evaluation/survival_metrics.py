"""Survival metrics: Harrell's and Uno's C-index, the Kaplan–Meier estimator and the log-rank test.

Conventions (those of scikit-survival, which the tests compare against):

- ``time`` (n,) follow-up times ≥ 0, ``event`` (n,) bool (True: the event was observed, False:
  censored), ``risk`` (n,) predicted risk scores (higher = earlier event).
- A pair (i, j) is *comparable* when i had an event and ``time[i] < time[j]``, or the times tie
  and j was censored. It is concordant when ``risk[i] > risk[j]``; risks within ``1e-8`` count ½.
- Harrell's C (Harrell et al. 1982): concordant / comparable pairs.
- Uno's C (Uno et al., Stat. Med. 2011): the same sum with each pair weighted by ``G(T_i)^-2``,
  G the Kaplan–Meier estimate of the *censoring* distribution on the training part, and only
  events before the truncation time ``tau`` as first members of a pair. It is consistent for a
  censoring-free concordance up to ``tau`` where Harrell's C depends on the censoring.
  ``tau`` must lie where G > 0; :func:`uno_tau` takes a quantile of the training times.
- Log-rank (Mantel 1966): Σ (observed − expected) events of group 1 over the distinct event
  times, hypergeometric variance, χ² with one degree of freedom.
"""

from __future__ import annotations

import numpy as np

from extract.errors import UserError

TIED_RISK_TOLERANCE = 1e-8
# Uno's truncation time: this quantile of the training part's follow-up times (events and
# censorings together), so that the censoring distribution is still estimable there.
UNO_TAU_QUANTILE = 0.8


def _comparable(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """(n, n) bool: pair (i, j) comparable (i the earlier event)."""
    time, event = np.asarray(time, float), np.asarray(event, bool)
    earlier = time[:, None] < time[None, :]
    tied_with_censored = (time[:, None] == time[None, :]) & ~event[None, :]
    return event[:, None] & (earlier | tied_with_censored)


def _weighted_concordance(time: np.ndarray, event: np.ndarray, risk: np.ndarray, weight: np.ndarray) -> float:
    pairs = _comparable(time, event) & (weight[:, None] > 0)
    if not pairs.any():
        return float("nan")
    risk = np.asarray(risk, float)
    difference = risk[:, None] - risk[None, :]
    score = np.where(np.abs(difference) <= TIED_RISK_TOLERANCE, 0.5, (difference > 0).astype(float))
    w = np.broadcast_to(weight[:, None], pairs.shape)
    return float((w * score)[pairs].sum() / w[pairs].sum())


def harrell_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C-index of ``risk`` (n,); nan when no pair is comparable."""
    return _weighted_concordance(time, event, risk, np.ones(len(np.asarray(time))))


def kaplan_meier(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The product-limit estimate: distinct times (k,) and S(t) (k,) just after each of them."""
    time, event = np.asarray(time, float), np.asarray(event, bool)
    times = np.unique(time)
    at_risk = (time[None, :] >= times[:, None]).sum(axis=1)
    deaths = (event[None, :] & (time[None, :] == times[:, None])).sum(axis=1)
    return times, np.cumprod(1.0 - deaths / at_risk)


def step_value(times: np.ndarray, values: np.ndarray, at: np.ndarray) -> np.ndarray:
    """A right-continuous step function (1 before ``times[0]``) evaluated at ``at``."""
    index = np.searchsorted(times, np.asarray(at, float), side="right") - 1
    return np.where(index >= 0, values[np.maximum(index, 0)], 1.0)


def uno_tau(train_time: np.ndarray, quantile: float = UNO_TAU_QUANTILE) -> float:
    """The truncation time of Uno's C: a quantile of the training times."""
    return float(np.quantile(np.asarray(train_time, float), quantile))


def uno_c(
    train_time: np.ndarray,
    train_event: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    tau: float,
) -> float:
    """Uno's C-index of ``risk`` on the test part (``time``, ``event``), truncated at ``tau``,
    with the censoring distribution estimated on the training part; nan without a usable pair."""
    censoring_times, censoring_survival = kaplan_meier(train_time, ~np.asarray(train_event, bool))
    time, event = np.asarray(time, float), np.asarray(event, bool)
    g = step_value(censoring_times, censoring_survival, time)
    usable = event & (time < tau)
    if (g[usable] <= 0).any():
        raise UserError(f"Uno's C: the censoring survival is 0 before tau = {tau:g}; choose an earlier truncation time")
    weight = np.zeros(len(time))
    weight[usable] = 1.0 / g[usable] ** 2
    return _weighted_concordance(time, event, risk, weight)


def logrank_test(time: np.ndarray, event: np.ndarray, group: np.ndarray) -> tuple[float, float]:
    """The log-rank χ² statistic and its p-value for two groups (``group`` (n,) bool)."""
    from scipy.stats import chi2

    time, event, group = np.asarray(time, float), np.asarray(event, bool), np.asarray(group, bool)
    event_times = np.unique(time[event])
    at_risk = time[None, :] >= event_times[:, None]  # (k, n)
    dies = event[None, :] & (time[None, :] == event_times[:, None])
    n, n1 = at_risk.sum(1).astype(float), (at_risk & group).sum(1).astype(float)
    d, d1 = dies.sum(1).astype(float), (dies & group).sum(1).astype(float)
    expected = d * n1 / n
    variance = np.where(n > 1, d * (n1 / n) * (1 - n1 / n) * (n - d) / np.maximum(n - 1, 1), 0.0)
    if variance.sum() <= 0:
        return float("nan"), float("nan")
    statistic = float((d1.sum() - expected.sum()) ** 2 / variance.sum())
    return statistic, float(chi2.sf(statistic, 1))


def median_split_logrank(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Log-rank p of the test part split at the median predicted risk (high: above the median)."""
    risk = np.asarray(risk, float)
    high = risk > np.median(risk)
    if high.all() or not high.any():
        return float("nan")
    return logrank_test(time, event, high)[1]
