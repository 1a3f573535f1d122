"""The MIL baselines: average, gated attention-MIL, top-k fine-tuning on real slide tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from extract.encoders.tile_encoder import TileTrunk, load_resnet18
from extract.slides.formats import open_slide
from gigassl.evaluation.mil import (
    AttentionMIL,
    AverageMIL,
    GatedAttentionMIL,
    SlideTiles,
    TopKFineTuner,
    inner_validation_split,
    make_logistic_regression,
    mean_features,
    pad_bags,
    tiles_to_tensor,
)


def planted_bags(n_slides: int, seed: int, witness_fraction: float = 0.2, dim: int = 32):
    """Bags where label-1 slides hold a few 'witness' tiles shifted along a fixed direction."""
    rng = np.random.default_rng(seed)
    direction = np.zeros(dim, dtype=np.float32)
    direction[0] = 3.0
    bags, labels = [], []
    for i in range(n_slides):
        label = i % 2
        n = int(rng.integers(20, 40))
        bag = rng.standard_normal((n, dim)).astype(np.float32)
        if label:
            witnesses = rng.choice(n, size=max(1, int(witness_fraction * n)), replace=False)
            bag[witnesses] += direction
        bags.append(bag)
        labels.append(label)
    return bags, np.array(labels)


def test_gated_attention_masks_padding_and_sums_to_one():
    torch.manual_seed(0)
    model = GatedAttentionMIL(n_classes=3, in_dim=8).eval()
    bags = [np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32) for n in (5, 2)]
    features, mask = pad_bags(bags, torch.device("cpu"))
    logits, attention = model(features, mask)
    assert logits.shape == (2, 3) and attention.shape == (2, 5)
    assert torch.allclose(attention.sum(dim=1), torch.ones(2))
    assert torch.all(attention[1, 2:] == 0)
    # padding must not change a bag's output
    alone, _ = model(*pad_bags(bags[1:], torch.device("cpu")))
    assert torch.allclose(alone[0], logits[1], atol=1e-6)


def test_inner_validation_split_is_stratified_and_disjoint():
    y = np.array([0] * 10 + [1] * 10)
    train, val = inner_validation_split(y, 0.2, seed=0)
    assert len(val) == 4 and set(train).isdisjoint(val)
    assert sorted(np.bincount(y[val])) == [2, 2]
    train, val = inner_validation_split(np.array([0, 0, 0, 1]), 0.2, seed=0)
    assert len(val) == 0 and len(train) == 4  # a class of one cannot be split


def test_average_mil_beats_chance_on_mean_shift():
    rng = np.random.default_rng(1)
    y = np.arange(60) % 2
    bags = [rng.standard_normal((30, 16)).astype(np.float32) + 0.5 * label for label in y]
    np.testing.assert_allclose(mean_features(bags[:2]), np.stack([bags[0].mean(0), bags[1].mean(0)]), rtol=1e-5)
    model = AverageMIL().fit(bags[:40], y[:40])
    assert roc_auc_score(y[40:], model.predict_proba(bags[40:])[:, 1]) > 0.9


@pytest.mark.slow
def test_attention_mil_learns_witness_tiles_and_attends_to_them():
    bags, y = planted_bags(64, seed=0, witness_fraction=0.3)
    model = AttentionMIL(hidden_dim=32, attention_dim=32, max_epochs=30, patience=8, lr=3e-3, seed=0).fit(bags[:48], y[:48])
    proba = model.predict_proba(bags[48:])
    assert proba.shape == (16, 2) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert roc_auc_score(y[48:], proba[:, 1]) > 0.8
    positive = next(i for i in range(48, 64) if y[i] == 1)
    attention = model.attention(bags[positive])
    witnesses = bags[positive][:, 0] > 1.5
    assert attention[witnesses].mean() > attention[~witnesses].mean()


def test_attention_mil_is_reproducible_with_a_seed():
    bags, y = planted_bags(16, seed=2)
    a = AttentionMIL(max_epochs=3, seed=5).fit(bags, y).predict_proba(bags)
    b = AttentionMIL(max_epochs=3, seed=5).fit(bags, y).predict_proba(bags)
    np.testing.assert_array_equal(a, b)


def test_logistic_regression_settings_match_the_original():
    model = make_logistic_regression()
    assert model.C == 10 and model.class_weight == "balanced" and model.max_iter == 1000
    scaled = make_logistic_regression(standardize=True)
    assert type(scaled.steps[0][1]).__name__ == "StandardScaler"


@pytest.fixture(scope="module")
def real_slide_cohort(slides_dir: Path):
    """Four 'slides' cut from CMU-1-Small-Region.svs (different tile rows), with real trunk features."""
    slide_path = slides_dir / "CMU-1-Small-Region.svs"
    size_level0, out_px = 256, 64
    xs, ys = np.meshgrid(np.arange(0, 1792, size_level0), np.arange(512, 2560, size_level0))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)  # 7 × 8 tiles in the tissue
    resnet, _ = load_resnet18("random")
    trunk = TileTrunk(resnet).eval()
    with open_slide(slide_path) as reader:
        images = np.stack([reader.read_tile(int(x), int(y), size_level0, out_px) for x, y in coords])
    with torch.no_grad():
        features = trunk(tiles_to_tensor(images, torch.device("cpu"))).numpy()
    groups = np.array_split(np.arange(len(coords)), 4)
    bags = [features[g] for g in groups]
    tiles = [SlideTiles(slide_path, coords[g], float(size_level0), out_px) for g in groups]
    return bags, tiles, np.array([0, 1, 0, 1]), images, groups


def test_slide_tiles_reread_the_tiles_the_features_came_from(real_slide_cohort):
    _bags, tiles, _, images, groups = real_slide_cohort
    reread = tiles[1].read(np.array([0, 3]))
    assert reread.dtype == np.uint8 and reread.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(reread, images[groups[1][[0, 3]]])
    assert reread.std() > 5  # real tissue, not blank background


@pytest.mark.slow
def test_topk_fine_tuning_reads_real_tiles_and_updates_the_trunk(real_slide_cohort):
    bags, tiles, y, _, _ = real_slide_cohort
    factory = lambda: TileTrunk(load_resnet18("random")[0])  # noqa: E731
    before = {k: v.clone() for k, v in factory().state_dict().items()}
    read_calls = []

    class CountingTiles(SlideTiles):
        def read(self, rows):
            read_calls.append(len(rows))
            return super().read(rows)

    counted = [CountingTiles(t.slide_path, t.coords, t.size_level0, t.out_px) for t in tiles]
    tuner = TopKFineTuner(factory, k=3, epochs=1, max_steps=1, mil=AttentionMIL(max_epochs=2), encoder_lr=1e-3)
    tuner.fit(bags, y, counted)
    assert tuner.n_steps_ == 1 and read_calls == [3]
    after = tuner.trunk_.state_dict()
    changed = [k for k in before if before[k].dtype.is_floating_point and not torch.equal(before[k], after[k])]
    assert any(k.startswith("conv1") for k in changed) and any(k.startswith("layer3") for k in changed)
    # batch-norm statistics stay frozen
    assert torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])
    proba = tuner.predict_proba(bags, counted)
    assert proba.shape == (4, 2) and np.allclose(proba.sum(1), 1, atol=1e-5)
    top = tuner.top_rows(bags[0])
    assert len(top) == 3 and len(set(top)) == 3
