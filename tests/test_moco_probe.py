"""The MoCo monitors that do not move with the queue: fresh InfoNCE and the labelled probe."""

import math

import numpy as np
import pytest
import torch

from extract.config import MocoConfig
from extract.moco.pretrain import run_pretraining
from extract.moco.probe import probe_auc, read_probe_labels
from extract.monitors import fresh_info_nce

SLIDE = "CMU-1-Small-Region.svs"


def test_fresh_info_nce_hand_computed():
    n, temperature = 4, 0.5
    z = torch.eye(n, 8)  # orthonormal: positives cos 1, negatives cos 0
    expected = -math.log(math.exp(1 / temperature) / (math.exp(1 / temperature) + n - 1))
    assert fresh_info_nce(z, z, temperature) == pytest.approx(expected, rel=1e-9)
    swapped = torch.roll(z, 1, dims=0)  # every positive is orthogonal, one negative matches
    assert fresh_info_nce(z, swapped, temperature) > expected + 1.0


def test_probe_auc_separable_and_shuffled():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.array(["a", "b", "c"]), 20)
    separable = rng.normal(size=(60, 5)) + np.repeat(np.eye(3, 5) * 10, 20, axis=0)
    assert probe_auc(separable, labels) == pytest.approx(1.0)
    noise = rng.normal(size=(60, 5))
    assert 0.2 < probe_auc(noise, labels) < 0.8
    binary = labels[:40]
    assert probe_auc(separable[:40], binary) == pytest.approx(1.0)


def test_probe_labels_need_slide_and_label_columns(tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("name,class\na,1\n")
    with pytest.raises(Exception, match="slide,label"):
        read_probe_labels(bad)
    good = tmp_path / "good.csv"
    good.write_text("slide,label\na,x\nb,\n")
    assert read_probe_labels(good) == {"a": "x"}


def _config(folder, out, labels):
    return MocoConfig(
        slides=folder,
        out=out,
        target_mpp=1.0,
        tile_size_px=32,
        batch_size=8,
        queue_size=12,
        tiles_per_epoch=16,
        tiles_per_visit=4,
        epochs=1,
        monitor_tiles=8,
        num_workers=0,
        checkpoint_every=1,
        device="cpu",
        lr=0.1,
        probe_labels=labels,
        probe_tiles_per_slide=2,
    )


def test_run_logs_probe_and_queue_free_monitors(slides_dir, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    names = [f"s{i:02d}" for i in range(10)]
    for name in names:
        (folder / f"{name}.svs").symlink_to(slides_dir / SLIDE)
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\n" + "".join(f"{n},{'ab'[i % 2]}\n" for i, n in enumerate(names)))
    result = run_pretraining(_config(folder, tmp_path / "out", labels))
    row = result.monitors[-1]
    assert 0.0 <= row["probe_auc"] <= 1.0
    assert -1.0 <= row["negative_cosine"] <= 1.0 and -1.0 <= row["positive_cosine"] <= 1.0
    assert math.isfinite(row["fresh_infonce"]) and row["fresh_infonce"] > 0
    header = (tmp_path / "out" / "monitors.csv").read_text().splitlines()[0]
    assert "probe_auc" in header and "fresh_infonce" in header


def test_probe_is_off_with_too_few_labelled_slides(slides_dir, tmp_path, caplog):
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "only.svs").symlink_to(slides_dir / SLIDE)
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\nonly,a\n")
    result = run_pretraining(_config(folder, tmp_path / "out", labels))
    assert "probe_auc" not in result.monitors[-1]
    assert "probe off" in caplog.text
