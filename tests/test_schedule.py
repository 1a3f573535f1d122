"""The one learning-rate schedule of both training jobs (extract.training.schedule) against the
formulas each job had before it was shared: MoCo's ``cosine_lr`` (extract.moco.pretrain) and stage 2's
``WarmupCosine`` (gigassl.training.schedule), copied here as they were, at each job's settings.
"""

from __future__ import annotations

import math

import pytest
import torch

from extract.training.schedule import WarmupCosine


def old_moco_lr(base_lr: float, step: int, total_steps: int) -> float:
    """MoCo's ``cosine_lr`` before the schedule was shared."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def old_stage2_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Stage 2's ``WarmupCosine.__call__`` before the schedule was shared."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))


# MoCo: (peak lr = --lr × batch / 256, total steps = tiles_per_epoch // batch × epochs) for the
# default and small-cpu profiles, with lrs the old code gave (float.hex, computed before the change).
MOCO_SETTINGS = {
    "default": (0.03, 51200, {0: "0x1.eb851eb851eb8p-6", 25600: "0x1.eb851eb851eb8p-7", 51200: "0x0.0p+0", 51205: "0x0.0p+0"}),
    "small-cpu": (0.0075, 2560, {0: "0x1.eb851eb851eb8p-8", 1280: "0x1.eb851eb851eb8p-9", 2560: "0x0.0p+0", 2565: "0x0.0p+0"}),
}


@pytest.mark.parametrize("profile", sorted(MOCO_SETTINGS))
def test_moco_learning_rates_are_the_old_ones(profile):
    base_lr, total, recorded = MOCO_SETTINGS[profile]
    schedule = WarmupCosine(0, total)
    for step, value in recorded.items():
        assert schedule.lr(base_lr, step) == float.fromhex(value), step
    # every step: the old value to 2e-12 relative. The cosine's argument is rounded as stage 2
    # rounds it, π·(s/T) rather than MoCo's (π·s)/T, so some steps differ in the last bits (most
    # near the end, where 1 + cos cancels); one formula cannot give both jobs' old bits.
    differ = 0
    for step in range(total + 3):
        new, old = schedule.lr(base_lr, step), old_moco_lr(base_lr, step, total)
        assert new == pytest.approx(old, rel=2e-12, abs=0.0), (step, new, old)
        differ += new != old
    assert 0 < differ < total // 2


# Stage 2: (peak lr, warm-up steps, total steps) at the defaults (--lr 0.03, 10 warm-up epochs of
# 1000, here 3 steps per epoch) and a small run, with the lrs LambdaLR gave (float.hex, old code).
STAGE2_SETTINGS = [
    (
        0.03,
        30,
        3000,
        {
            0: "0x1.0624dd2f1a9fcp-10",
            29: "0x1.eb851eb851eb8p-6",
            31: "0x1.eb8515b5a315fp-6",
            1500: "0x1.f35185303ca15p-7",
            2999: "0x1.2055dab28f5c2p-27",
            3000: "0x0.0p+0",
        },
    ),
    (
        0.03 * 6 / 256,
        10,
        100,
        {0: "0x1.26e978d4fdf3bp-14", 11: "0x1.7087187a0ed77p-11", 50: "0x1.b0a75689ba948p-12", 99: "0x1.cbe902e9933d7p-23"},
    ),
]


@pytest.mark.parametrize(("peak", "warmup", "total", "recorded"), STAGE2_SETTINGS)
def test_stage2_learning_rates_are_the_old_ones_bit_for_bit(peak, warmup, total, recorded):
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total))
    schedule = WarmupCosine(warmup, total)
    for step in range(total + 3):
        lr = scheduler.get_last_lr()[0]
        assert lr == peak * old_stage2_factor(step, warmup, total) == schedule.lr(peak, step), step
        if step in recorded:
            assert lr == float.fromhex(recorded[step]), step
        optimizer.step()
        scheduler.step()


def test_the_schedule_warms_up_then_decays_to_zero():
    schedule = WarmupCosine(4, 14)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(9) == pytest.approx(0.5) and schedule(14) == schedule(20) == 0.0
    assert WarmupCosine(0, 10).lr(0.1, 5) == pytest.approx(0.05)  # MoCo's: no warm-up
