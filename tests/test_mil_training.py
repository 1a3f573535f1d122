"""How attention-MIL is trained: standardisation (fitted on training bags only, folded into the
first layer), the learning-rate schedules, the early-stopping rule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import gigassl.evaluation.mil as mil
from gigassl.evaluation.classification import AttentionMethod
from gigassl.evaluation.mil import AttentionMIL
from gigassl.evaluation.mil_training import EarlyStopping, fit_standardisation, fold_standardisation, make_scheduler
from test_mil import planted_bags


def test_standardisation_is_the_tile_mean_and_deviation_and_a_constant_dimension_keeps_scale_one():
    rng = np.random.default_rng(0)
    bags = [rng.standard_normal((n, 5)).astype(np.float32) * [1, 10, 100, 0.1, 0] + [0, 5, -3, 1, 7] for n in (3, 9, 20)]
    mean, scale = fit_standardisation(bags)
    tiles = np.concatenate(bags).astype(np.float64)
    np.testing.assert_allclose(mean, tiles.mean(axis=0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(scale[:4], tiles.std(axis=0)[:4], rtol=1e-6)
    assert scale[4] == 1.0  # the constant dimension maps to 0, not to a division by 0


def test_folding_the_standardisation_into_the_first_layer_is_exact():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    x = torch.randn(10, 6, dtype=torch.float64) * 50 + 20
    mean, scale = x.mean(0).numpy(), x.std(0).numpy()
    expected = layer.double()((x - torch.from_numpy(mean)) / torch.from_numpy(scale))
    fold_standardisation(layer, mean, scale)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_standardised_training_ignores_the_scale_of_each_feature():
    """Per-dimension affine rescaling of every bag is undone by the standardisation, so the fit
    and its predictions on raw features (through the folded layer) are the same."""
    bags, y = planted_bags(24, seed=3, dim=8)
    a = np.linspace(0.01, 100, 8).astype(np.float32)
    b = np.linspace(-5, 50, 8).astype(np.float32)
    settings = dict(hidden_dim=16, attention_dim=16, max_epochs=4, validation_fraction=0.0, standardize=True, seed=1)
    plain = AttentionMIL(**settings).fit(bags[:16], y[:16])
    scaled = AttentionMIL(**settings).fit([bag * a + b for bag in bags[:16]], y[:16])
    np.testing.assert_allclose(
        plain.predict_proba(bags[16:]), scaled.predict_proba([bag * a + b for bag in bags[16:]]), rtol=1e-3, atol=1e-4
    )
    # without the standardisation the same rescaling changes the fit
    raw = dict(settings, standardize=False)
    assert not np.allclose(
        AttentionMIL(**raw).fit(bags[:16], y[:16]).predict_proba(bags[16:]),
        AttentionMIL(**raw).fit([bag * a + b for bag in bags[:16]], y[:16]).predict_proba([bag * a + b for bag in bags[16:]]),
        atol=1e-3,
    )


def test_the_standardisation_is_fitted_on_the_training_bags_only(monkeypatch):
    bags, y = planted_bags(20, seed=4, dim=8)
    for i in range(12, 20):
        bags[i] = bags[i] * 1000.0 + 500.0  # test bags far off: any leak would show in the statistics
    seen: list[list[np.ndarray]] = []
    original = mil.fit_standardisation

    def recording(given):
        seen.append(list(given))
        return original(given)

    monkeypatch.setattr(mil, "fit_standardisation", recording)
    estimator = AttentionMIL(hidden_dim=8, attention_dim=8, max_epochs=1, validation_fraction=0.0, standardize=True)
    train, test = np.arange(12), np.arange(12, 20)
    AttentionMethod(bags, estimator).fit_predict(train, test, y)
    assert len(seen) == 1 and len(seen[0]) == 12
    assert all(any(given is bags[i] for i in train) for given in seen[0])
    fitted = AttentionMIL(**{**estimator.get_params(), "max_epochs": 1}).fit([bags[i] for i in train], y[train])
    np.testing.assert_allclose(fitted.feature_mean_, np.concatenate(bags[:12]).mean(axis=0), rtol=1e-5, atol=1e-6)
    assert np.abs(fitted.feature_mean_).max() < 10  # the test bags' offset of 500 is not in it


def test_lr_schedules_start_peak_and_refuse_unknown_names():
    def rates(schedule: str, steps: int = 20) -> list[float]:
        optimiser = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1e-3)
        scheduler = make_scheduler(optimiser, schedule, 1e-3, steps)
        out = []
        for _ in range(steps):
            out.append(optimiser.param_groups[0]["lr"])
            optimiser.step()
            if scheduler is not None:
                scheduler.step()
        return out

    assert rates("constant") == [1e-3] * 20
    one_cycle = rates("one-cycle")
    assert one_cycle[0] == pytest.approx(1e-3 / 25) and max(one_cycle) == pytest.approx(1e-3, rel=1e-2)
    assert one_cycle[-1] < 1e-5
    cosine = rates("cosine")
    assert cosine[0] == pytest.approx(1e-3) and cosine[-1] < 1e-4 and all(a >= b for a, b in itertools.pairwise(cosine))
    with pytest.raises(ValueError, match="schedule 'step'"):
        make_scheduler(torch.optim.Adam([nn.Parameter(torch.zeros(1))]), "step", 1e-3, 10)


def test_early_stopping_waits_for_min_epochs_and_keeps_the_best_weights():
    model = nn.Linear(1, 1)
    stopping = EarlyStopping(patience=2, min_epochs=6)
    losses = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    stops = []
    for epoch, loss in enumerate(losses):
        if epoch == 1:
            nn.init.constant_(model.weight, 3.0)
        stops.append(stopping.update(epoch, loss, model))
        nn.init.constant_(model.weight, -1.0)
    assert stops == [False, False, False, False, False, True, True]  # patience met at epoch 3, not before epoch 6
    assert stopping.best_loss == 0.5 and float(stopping.best_state["weight"]) == 3.0
