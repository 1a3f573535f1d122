"""Ridge-penalised Cox regression on slide vectors, the penalty chosen by inner cross-validation.

Model: hazard ``h(t | x) = h0(t) exp(β · s(x))`` with ``s`` the standard scaling learnt on the
training slides. Fitted by Newton's method (step halving) on

    −ℓ(β) + α/2 ‖β‖²,   ℓ the Breslow partial log-likelihood (ties share one risk set),

which is scikit-survival's ``CoxPHSurvivalAnalysis(alpha=α, ties="breslow")`` objective (the
tests compare the two). ``α = alpha_per_sample · n`` so that one grid serves cohorts of any size.
When the vectors are wider than there are slides (D > n, the usual case) the fit runs on the n
coordinates of the slides' span (thin SVD): a ridge solution lies in that span, so the result is
the same and each Newton step costs O(n³) instead of O(D³).

The penalty: :data:`ALPHA_GRID` (per sample) searched by the cross-validated partial likelihood of
Verweij & van Houwelingen (1993) — for each inner fold k, ``ℓ_all(β₋ₖ) − ℓ₋ₖ(β₋ₖ)`` summed over
the folds (the criterion glmnet's Cox cross-validation uses) — on the training part only; folds
stratified on the event and grouped by patient when patients are given. The risk score is the
linear predictor ``β · s(x)``. Ridge only: no L1 (elastic-net) term.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from extract.errors import UserError

logger = logging.getLogger(__name__)

ALPHA_GRID = tuple(float(a) for a in np.logspace(-3, 2, 6))  # α / n
DEFAULT_ALPHA_PER_SAMPLE = 0.1  # when the training part is too small for an inner split
N_INNER_FOLDS = 3


def _sorted_terms(
    z: np.ndarray, time: np.ndarray, event: np.ndarray, beta: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows sorted by time; the linear predictor (shifted), exp, and each row's risk-set start."""
    order = np.argsort(time, kind="stable")
    z, t, d = z[order], np.asarray(time, float)[order], np.asarray(event, bool)[order]
    eta = z @ beta
    eta = eta - eta.max()  # ℓ is unchanged by a shift; exp stays finite
    first = np.searchsorted(t, t, side="left")  # risk set of row i: rows first[i] … n−1 (ties share it)
    return z, d, eta, np.exp(eta), first


def partial_log_likelihood(z: np.ndarray, time: np.ndarray, event: np.ndarray, beta: np.ndarray) -> float:
    """Breslow partial log-likelihood ℓ(β) of (n, r) inputs ``z``."""
    _, d, eta, w, first = _sorted_terms(np.asarray(z, float), time, event, np.asarray(beta, float))
    s0 = np.cumsum(w[::-1])[::-1][first]
    return float(np.sum(d * (eta - np.log(s0))))


def _objective(
    z: np.ndarray, time: np.ndarray, event: np.ndarray, beta: np.ndarray, alpha: float
) -> tuple[float, np.ndarray, np.ndarray]:
    """−ℓ(β) + α/2 ‖β‖², its gradient (r,) and Hessian (r, r)."""
    zs, d, eta, w, first = _sorted_terms(z, time, event, beta)
    s0 = np.cumsum(w[::-1])[::-1][first]
    s1 = np.cumsum((w[:, None] * zs)[::-1], axis=0)[::-1][first]
    mean = s1 / s0[:, None]  # (n, r) risk-weighted mean of each row's risk set
    value = -np.sum(d * (eta - np.log(s0))) + 0.5 * alpha * beta @ beta
    gradient = -((zs - mean) * d[:, None]).sum(axis=0) + alpha * beta
    inverse = np.zeros(len(w))
    np.add.at(inverse, first[d], 1.0 / s0[d])
    weight = w * np.cumsum(inverse)  # Σ over the events whose risk set holds the row
    events = mean[d]
    hessian = (zs * weight[:, None]).T @ zs - events.T @ events + alpha * np.eye(len(beta))
    return float(value), gradient, hessian


def newton_cox(
    z: np.ndarray, time: np.ndarray, event: np.ndarray, alpha: float, max_iter: int = 100, tol: float = 1e-9
) -> np.ndarray:
    """β (r,) minimising −ℓ(β) + α/2 ‖β‖² on (n, r) inputs, by Newton with step halving."""
    z = np.asarray(z, float)
    beta = np.zeros(z.shape[1])
    value, gradient, hessian = _objective(z, time, event, beta, alpha)
    for _ in range(max_iter):
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while True:
            candidate = beta - scale * step
            with np.errstate(all="ignore"):  # an overshooting step may overflow: halved below
                new_value, new_gradient, new_hessian = _objective(z, time, event, candidate, alpha)
            if np.isfinite(new_value) and new_value <= value:
                break
            scale /= 2
            if scale < 1e-10:
                return beta  # no step lowers the objective: at the optimum to rounding
        converged = abs(value - new_value) <= tol * (abs(value) + 1.0)
        beta, value, gradient, hessian = candidate, new_value, new_gradient, new_hessian
        if converged:
            break
    return beta


def fit_ridge_cox(x: np.ndarray, time: np.ndarray, event: np.ndarray, alpha: float) -> np.ndarray:
    """β (D,) on (n, D) already-scaled inputs; through the slides' span when D > n."""
    x = np.asarray(x, float)
    if x.shape[1] <= x.shape[0]:
        return newton_cox(x, time, event, alpha)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    return vt.T @ newton_cox(u * s, time, event, alpha)


def inner_survival_folds(
    event: np.ndarray, groups: np.ndarray | None, seed: int, n_folds: int = N_INNER_FOLDS
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, validation) index pairs stratified on the event (grouped by patient if given);
    empty when the events are too few for two folds."""
    event = np.asarray(event, bool)
    n_events = int(event.sum())
    units = len(np.unique(groups)) if groups is not None else len(event)
    n_folds = min(n_folds, n_events, int((~event).sum()) or n_events, units)
    if n_folds < 2:
        return []
    with warnings.catch_warnings():  # "least populated class" warnings: fewer events than folds is allowed
        warnings.simplefilter("ignore", UserWarning)
        if groups is None:
            return list(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(event, event))
        return list(StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed).split(event, event, groups))


class CoxRidge:
    """Standard scaling, then ridge Cox; ``alpha_per_sample`` None: chosen from :data:`ALPHA_GRID`.

    After ``fit``: ``mean_``, ``scale_`` (D,), ``coef_`` (D,) on the scaled inputs,
    ``alpha_per_sample_`` (the penalty used). ``predict`` gives (S,) risk scores (linear predictor).
    """

    def __init__(self, alpha_per_sample: float | None = None, seed: int = 0) -> None:
        self.alpha_per_sample = alpha_per_sample
        self.seed = seed

    def fit(self, x: np.ndarray, time: np.ndarray, event: np.ndarray, groups: np.ndarray | None = None) -> "CoxRidge":
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, user_api="blas"):  # n × n problems: parallel BLAS only burns CPU (100× slower on a busy host)
            return self._fit(np.asarray(x, float), time, event, groups)

    def _fit(self, x: np.ndarray, time: np.ndarray, event: np.ndarray, groups: np.ndarray | None) -> "CoxRidge":
        time, event = np.asarray(time, float), np.asarray(event, bool)
        if not event.any():
            raise UserError(f"Cox regression: no event among the {len(event)} training slides; it needs some")
        self.mean_ = x.mean(axis=0)
        scale = x.std(axis=0)
        self.scale_ = np.where(scale > 0, scale, 1.0)
        scaled = (x - self.mean_) / self.scale_
        alpha = self.alpha_per_sample
        if alpha is None:
            alpha = self._choose_alpha(scaled, time, event, groups)
        self.alpha_per_sample_ = float(alpha)
        self.coef_ = fit_ridge_cox(scaled, time, event, alpha * len(x))
        return self

    def _choose_alpha(self, x: np.ndarray, time: np.ndarray, event: np.ndarray, groups: np.ndarray | None) -> float:
        folds = inner_survival_folds(event, groups, self.seed)
        if not folds:
            logger.info("Cox: %d events, too few for an inner split; penalty %g per slide", event.sum(), DEFAULT_ALPHA_PER_SAMPLE)
            return DEFAULT_ALPHA_PER_SAMPLE
        scores = []
        for alpha in ALPHA_GRID:
            score = 0.0
            for train, _ in folds:
                beta = fit_ridge_cox(x[train], time[train], event[train], alpha * len(train))
                score += partial_log_likelihood(x, time, event, beta) - partial_log_likelihood(
                    x[train], time[train], event[train], beta
                )
            scores.append(score)
        return ALPHA_GRID[int(np.argmax(scores))]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(S,) risk scores of (S, D) inputs."""
        return ((np.asarray(x, float) - self.mean_) / self.scale_) @ self.coef_
