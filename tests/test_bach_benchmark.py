"""benchmarks/bach_benchmark.py: labels from file names, subsets, the budget plan, the stage cache,
the tables, and the whole command on a tiny BACH-like folder written here (never the real images)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.encoders.tile_encoder import file_sha256

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "bach_benchmark.py"
CLASSES = ("n", "b", "is", "iv")


def _load_script():
    spec = importlib.util.spec_from_file_location("bach_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bench = _load_script()


def write_fake_bach(folder: Path, n_per_class: int = 5, size: tuple[int, int] = (200, 150), seed: int = 0) -> Path:
    """Small H&E-coloured jpgs named like BACH (n001.jpg, b001.jpg, is001.jpg, iv001.jpg …);
    each class has its own mean stain, so a classifier has something to find."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        for i in range(1, n_per_class + 1):
            base = np.array([200 - 25 * c, 110 + 15 * c, 180 - 10 * c], dtype=float)
            noise = rng.normal(0, 25, size=(size[1], size[0], 3))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}{i:03d}.jpg", quality=90)
    return folder


def test_label_is_the_letters_before_the_digits():
    assert bench.label_of(Path("n001.jpg")) == "n"
    assert bench.label_of(Path("/x/is012.jpg")) == "is"
    assert bench.label_of(Path("IV7.png")) == "iv"
    with pytest.raises(ValueError, match="letters then digits"):
        bench.label_of(Path("slide_1.jpg"))
    with pytest.raises(ValueError, match="letters then digits"):
        bench.label_of(Path("001.jpg"))


def test_list_images_refuses_an_unlabelled_image(tmp_path):
    folder = write_fake_bach(tmp_path / "images", n_per_class=1)
    (folder / "notes.txt").write_text("not an image")
    assert [p.name for p in bench.list_images(folder)] == ["b001.jpg", "is001.jpg", "iv001.jpg", "n001.jpg"]
    Image.new("RGB", (8, 8)).save(folder / "thumbnail.jpg")
    with pytest.raises(ValueError, match="thumbnail.jpg"):
        bench.list_images(folder)


def test_limit_per_class_links_the_first_images_and_drops_stale_links(tmp_path):
    images = bench.list_images(write_fake_bach(tmp_path / "images", n_per_class=4))
    subset = bench.limit_per_class(images, 3, tmp_path / "subset")
    names = sorted(p.name for p in subset.iterdir())
    assert names == sorted(f"{c}{i:03d}.jpg" for c in CLASSES for i in (1, 2, 3))
    assert all((subset / n).is_symlink() for n in names)
    bench.limit_per_class(images, 1, subset)
    assert sorted(p.name for p in subset.iterdir()) == sorted(f"{c}001.jpg" for c in CLASSES)


def test_labels_csv_and_fingerprint(tmp_path):
    images = bench.list_images(write_fake_bach(tmp_path / "images", n_per_class=2))
    csv_path = bench.write_labels(images, tmp_path / "labels.csv")
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "slide,label" and "is002,is" in lines and len(lines) == 9
    before = bench.folder_fingerprint(images)
    assert bench.folder_fingerprint(list(reversed(images))) == before
    Image.new("RGB", (50, 50), (200, 100, 150)).save(images[0])  # same name, other content and size
    assert bench.folder_fingerprint(images) != before


def test_plan_fits_the_budget_and_keeps_explicit_values():
    plan = bench.plan_budget([35] * 200, 60)
    assert plan.n_tiles_per_augmentation == 32
    assert 4 <= plan.n_augmentations <= 50 and 20 <= plan.epochs <= 1000
    assert sum(plan.estimated_s.values()) <= 60 * 60 * 1.05  # the clamps may add a little
    longer = bench.plan_budget([35] * 200, 120)
    assert longer.n_augmentations > plan.n_augmentations and longer.epochs >= plan.epochs
    assert bench.plan_budget([100] * 50, 60).n_tiles_per_augmentation == 64
    fixed = bench.plan_budget([35] * 200, 60, n_augmentations=3, n_tiles_per_augmentation=8, epochs=7)
    assert (fixed.n_augmentations, fixed.n_tiles_per_augmentation, fixed.epochs) == (3, 8, 7)
    with pytest.raises(ValueError, match="budget-minutes"):
        bench.plan_budget([35] * 200, 1)


def test_stage_runs_once_per_settings(tmp_path):
    calls = []

    def work(folder: Path) -> dict:
        calls.append(folder)
        (folder / "out.txt").write_text("x")
        return {"n": len(calls)}

    times: dict = {}
    first, record = bench.run_stage("stage", tmp_path, {"a": 1, "p": Path("/x")}, work, times)
    assert record["facts"] == {"n": 1} and times["stage"]["cached"] is False
    again, record = bench.run_stage("stage", tmp_path, {"p": Path("/x"), "a": 1}, work, times)
    assert again == first and len(calls) == 1 and times["stage"]["cached"] is True and record["facts"] == {"n": 1}
    other, _ = bench.run_stage("stage", tmp_path, {"a": 2, "p": Path("/x")}, work, times)
    assert other != first and len(calls) == 2


def test_a_finished_stage_whose_outputs_are_unreadable_is_redone(tmp_path):
    calls = []

    def work(folder: Path) -> dict:
        calls.append(1)
        (folder / "out.txt").write_text("v2" if len(calls) > 1 else "v1")
        return {}

    readable = lambda folder: (folder / "out.txt").read_text() == "v2"  # noqa: E731 - a reader that changed
    bench.run_stage("stage", tmp_path, {"a": 1}, work, {})
    times: dict = {}
    folder, _ = bench.run_stage("stage", tmp_path, {"a": 1}, work, times, valid=readable)
    assert len(calls) == 2 and times["stage"]["cached"] is False and readable(folder)
    bench.run_stage("stage", tmp_path, {"a": 1}, work, times, valid=readable)
    assert len(calls) == 2 and times["stage"]["cached"] is True


def test_an_interrupted_stage_is_redone(tmp_path):
    def fails(folder: Path) -> dict:
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        bench.run_stage("stage", tmp_path, {"a": 1}, fails, {})
    _, record = bench.run_stage("stage", tmp_path, {"a": 1}, lambda folder: {"ok": True}, {})
    assert record["facts"] == {"ok": True}


def test_markdown_tables_have_every_method_budget_and_the_delta():
    summary = [
        dict(
            method=m,
            budget=b,
            n_train=n,
            auc_mean=auc,
            auc_std=0.01,
            balanced_accuracy_mean=auc - 0.2,
            balanced_accuracy_std=0.02,
        )
        for m, base in (("gigassl", 0.80), ("average", 0.75), ("abmil", 0.70))
        for b, n, auc in (("100%", 140, base), ("4/class", 16, base - 0.1))
    ]
    text = bench.markdown_tables(summary)
    assert "| method | 100% (n=140) | 4/class (n=16) |" in text
    assert "| Giga-SSL + LR | 0.800 ± 0.010 | 0.700 ± 0.010 |" in text
    assert "| attention-MIL | 0.500 ± 0.020 | 0.400 ± 0.020 |" in text  # balanced accuracy block
    assert "| Δ AUC Giga-SSL − AverageMIL | +5.0 pt | +5.0 pt |" in text


def _run(argv):
    args = bench.parse_args(argv)
    return bench.run(args, args.seed, args.seed, Path(args.out))


@pytest.mark.slow
def test_whole_command_on_a_tiny_fake_folder_then_reuses_every_stage(tmp_path, capsys):
    images = write_fake_bach(tmp_path / "images", n_per_class=5, size=(220, 160))
    out = tmp_path / "out"
    argv = [
        "--images",
        str(images),
        "--out",
        str(out),
        "--tile-size-px",
        "32",
        "--n-augmentations",
        "2",
        "--n-tiles-per-augmentation",
        "4",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--n-views",
        "2",
        "--n-splits",
        "2",
        "--budgets",
        "100%,2/class",
        "--mil-epochs",
        "2",
        "--num-workers",
        "0",
        "--limit-per-class",
        "3",
    ]
    results = _run(argv)
    printed = capsys.readouterr().out
    assert results["n_images"] == 12 and results["classes"] == sorted(CLASSES)
    methods = {(r["method"], r["budget"]) for r in results["summary"]}
    assert methods == {(m, b) for m in ("gigassl", "average", "abmil") for b in ("100%", "2/class")}
    assert all(0.0 <= r["auc_mean"] <= 1.0 for r in results["summary"])
    assert "Giga-SSL + LR" in printed and "seconds per stage" in printed
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]
    assert "| attention-MIL |" in (out / "results.md").read_text()
    assert not any(t["cached"] for t in results["stage_seconds"].values())

    again = _run(argv)
    assert all(t["cached"] for t in again["stage_seconds"].values())
    assert again["summary"] == results["summary"]
    changed = _run(argv + ["--n-views", "3"])  # the last flag wins
    cached = {name: t["cached"] for name, t in changed["stage_seconds"].items()}
    assert cached == dict(grids=True, extract=True, train=True, embed=False, evaluate=False)

    # a checkpoint PATH: its layer4 initialises Giga-SSL, and every stage from extraction on is redone
    from extract.encoders.tile_encoder import load_resnet18, save_encoder_checkpoint

    checkpoint = tmp_path / "encoder.pt"
    save_encoder_checkpoint(load_resnet18("random", seed=1)[0], checkpoint)
    other = _run(argv + ["--encoder", str(checkpoint)])
    cached = {name: t["cached"] for name, t in other["stage_seconds"].items()}
    assert cached == dict(grids=True, extract=False, train=False, embed=False, evaluate=False)
    assert other["encoder_sha256"] == file_sha256(checkpoint)

    # --seeds: seed 0's stages are reused, seed 1 runs its own; the paired differences are pooled
    pooled = bench.run_seeds(bench.parse_args(argv + ["--seeds", "0,1"]))
    assert pooled["seeds"] == [0, 1] and [r["seed"] for r in pooled["per_seed"]] == [0, 1]
    assert all(t["cached"] for t in pooled["per_seed"][0]["stage_seconds"].values())
    assert not pooled["per_seed"][1]["stage_seconds"]["extract"]["cached"]
    entry = next(e for e in pooled["pooled"] if e["method"] == "gigassl" and e["budget"] == "100%")
    assert entry["auc"]["n"] == 4 and len(entry["auc"]["per_run"]) == 2
    assert entry["auc"]["mean"] == pytest.approx(np.mean(entry["auc"]["per_run"]))
    text = (out / "results.md").read_text()
    assert "Giga-SSL + LR − AverageMIL" in text and "cluster-bootstrap" in text


@pytest.mark.slow
def test_sweep_pairs_each_variant_with_the_default_on_the_same_splits(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bach_sweep", SCRIPT.parent / "bach_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    assert sweep.parse_variant("s:--scale-min=0.7,--scale-max=1.3") == ("s", ["--scale-min", "0.7", "--scale-max", "1.3"])
    images = write_fake_bach(tmp_path / "images", n_per_class=3, size=(220, 160))
    out = tmp_path / "out"
    argv = [
        "--images",
        str(images),
        "--out",
        str(out),
        "--tile-size-px",
        "32",
        "--n-augmentations",
        "2",
        "--n-tiles-per-augmentation",
        "4",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--n-views",
        "2",
        "--n-splits",
        "2",
        "--budgets",
        "100%,2/class",
        "--mil-epochs",
        "2",
        "--num-workers",
        "0",
        "--variant",
        "same:--n-views=2",
        "--variant",
        "R3:--n-views=3",
    ]
    assert sweep.main(argv) == 0
    saved = json.loads((out / "sweep.json").read_text())
    same = saved["table"]["same"]["vs_default"]
    assert all(e["auc"]["mean"] == 0.0 and e["auc"]["wins"] == 0 and e["auc"]["n"] == 2 for e in same)
    text = (out / "sweep.md").read_text()
    assert "| R3 − default |" in text and "| R3 − AverageMIL |" in text and "| default − AverageMIL |" in text
