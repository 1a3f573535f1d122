"""The evaluation protocol: labels, splits, budgets, metrics, outputs, baselines end to end, bad input."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest

from extract.encoders.tile_encoder import load_resnet18
from extract.errors import UserError
from extract.features.slide_file import FeatureFileError, SlideFileWriter
from extract.slides.formats import open_slide
from gigassl.cli import main as cli_main
from gigassl.config import EmbedConfig, EvaluateConfig
from gigassl.embed import EmbeddingWriter, run_embedding
from gigassl.evaluate import run_evaluation
from gigassl.evaluation.classification import LinearMethod, roc_auc
from gigassl.evaluation.mil import make_logistic_regression
from gigassl.evaluation.protocol import (
    Budget,
    Labels,
    budget_subset,
    check_classes,
    keep_available,
    make_splits,
    parse_budgets,
    read_labels,
)
from gigassl.synthetic.cohort import write_synthetic_cohort
from test_embed import write_checkpoint
from test_plain_features import write_trident_file


def write_labels(path: Path, rows: list[tuple], header=("slide", "label", "patient")) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_embeddings(path: Path, ids: list[str], vectors: np.ndarray) -> Path:
    with EmbeddingWriter(path, dict(checkpoint="test", n_views=1, n_tiles_per_view=1)) as writer:
        writer.append(ids, vectors.astype(np.float32))
    return path


def clustered(n_per_class: int, names: list[str], seed: int = 0, separation: float = 0.6):
    """Unit vectors around one random direction per class; string labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(names), 512))
    ids, labels, vectors = [], [], []
    for c, name in enumerate(names):
        for i in range(n_per_class):
            ids.append(f"{name}_{i:02d}")
            labels.append(name)
            vectors.append(separation * centres[c] + rng.standard_normal(512))
    vectors = np.array(vectors)
    return ids, labels, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


# ---- inputs -----------------------------------------------------------------------------------


def test_parse_budgets():
    assert parse_budgets("100%, 25%,50,4/class") == [
        Budget("100%", "fraction", 1.0),
        Budget("25%", "fraction", 0.25),
        Budget("50", "count", 50.0),
        Budget("4/class", "per_class", 4.0),
    ]
    for bad in ("150%", "ten", "", "0"):
        with pytest.raises(ValueError, match="budget"):
            parse_budgets(bad)


def test_read_labels_keeps_strings_and_patients(tmp_path):
    path = write_labels(tmp_path / "l.csv", [("a", "tumour", "p1"), ("b", "normal", "p1"), ("c", "01", "")])
    labels = read_labels(path)
    assert labels.slide_ids == ["a", "b", "c"] and labels.labels.tolist() == ["tumour", "normal", "01"]
    assert labels.patients.tolist() == ["p1", "p1", "c"]  # an empty patient is the slide itself
    no_patient = read_labels(write_labels(tmp_path / "n.csv", [("a", "x")], header=("slide", "label")))
    assert no_patient.patients is None
    with pytest.raises(ValueError, match="no column 'diagnosis'.*--label-column"):
        read_labels(path, label_column="diagnosis")
    with pytest.raises(ValueError, match=r"more than once: \['a'\]"):
        read_labels(write_labels(tmp_path / "d.csv", [("a", "x", ""), ("a", "y", "")]))


def test_missing_ids_are_listed_then_ignored_or_refused(caplog):
    labels = Labels(["a", "b", "c"], np.array(["x", "y", "x"]), None)
    with caplog.at_level(logging.WARNING):
        kept, missing = keep_available(labels, {"a", "c"}, "the embeddings e.h5", strict=False)
    assert kept.slide_ids == ["a", "c"] and missing == ["b"]
    assert "1 of 3 labelled slides are missing from the embeddings e.h5: b" in caplog.text
    with pytest.raises(ValueError, match="missing from the embeddings e.h5: b.*--strict"):
        keep_available(labels, {"a", "c"}, "the embeddings e.h5", strict=True)


def test_single_class_and_tiny_class_are_refused():
    with pytest.raises(ValueError, match="single class.*at least two classes"):
        check_classes(Labels(["a", "b"], np.array(["x", "x"]), None), 2, "labels.csv")
    with pytest.raises(ValueError, match="class 'y' has 1 slides; each split needs at least 2"):
        check_classes(Labels(["a", "b", "c"], np.array(["x", "x", "y"]), None), 2, "labels.csv")
    grouped = Labels(["a", "b", "c", "d"], np.array(["x", "x", "y", "y"]), np.array(["p", "q", "r", "r"]))
    with pytest.raises(ValueError, match="class 'y' has 1 patients"):
        check_classes(grouped, 2, "labels.csv")


# ---- splits and budgets -----------------------------------------------------------------------


def test_splits_are_stratified_seeded_and_grouped_by_patient():
    y = np.array([0] * 30 + [1] * 20)
    splits = make_splits(y, None, 10, 0.3, seed=0)
    assert len(splits) == 10
    for train, test in splits:
        assert set(train).isdisjoint(test) and len(test) == 15
        assert np.bincount(y[test]).tolist() == [9, 6]
    again = make_splits(y, None, 10, 0.3, seed=0)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, again))
    assert not np.array_equal(make_splits(y, None, 1, 0.3, seed=1)[0][1], splits[0][1])
    patients = np.repeat(np.arange(25), 2)  # two slides per patient, same label
    for train, test in make_splits(y, patients, 5, 0.3, seed=0):
        assert set(patients[train]).isdisjoint(patients[test])
        assert 0.2 < len(test) / len(y) < 0.45


def test_budget_subsets():
    y = np.array([0] * 60 + [1] * 40)
    train = np.arange(100)
    rng = np.random.default_rng(0)
    quarter = budget_subset(train, y, Budget("25%", "fraction", 0.25), rng)
    assert len(quarter) == 25 and np.bincount(y[quarter]).tolist() == [15, 10]
    fifty = budget_subset(train, y, Budget("50", "count", 50), rng)
    assert len(fifty) == 50 and len(set(fifty)) == 50
    few = budget_subset(train, y, Budget("4/class", "per_class", 4), rng)
    assert np.bincount(y[few]).tolist() == [4, 4]
    with pytest.raises(ValueError, match="asks for 250 training slides, but the training part of split 3 holds 100"):
        budget_subset(train, y, Budget("250", "count", 250), rng, split_index=3)
    with pytest.raises(ValueError, match="50 training slides per class.*class 'b'.*only 40"):
        budget_subset(train, y, Budget("50/class", "per_class", 50), rng, class_names=["a", "b"])


# ---- metrics, speed-related semantics ----------------------------------------------------------


def test_roc_auc_binary_and_macro_one_vs_rest():
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])) == 1.0
    y3 = np.array([0, 1, 2, 2])
    proba = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.5, 0.4, 0.1]])
    from sklearn.metrics import roc_auc_score

    assert roc_auc(y3, proba) == pytest.approx(roc_auc_score(y3, proba, multi_class="ovr", average="macro"))


def test_linear_method_equals_a_plain_scikit_learn_loop():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _ids, labels, vectors = clustered(60, ["a", "b"], separation=0.3)
    y = np.searchsorted(["a", "b"], labels)
    method = LinearMethod("gigassl", vectors, standardize=True)
    for train, test in make_splits(y, None, 4, 0.3, seed=0):
        plain = make_pipeline(StandardScaler(), LogisticRegression(C=10, class_weight="balanced", max_iter=1000))
        expected = plain.fit(vectors[train], y[train]).predict_proba(vectors[test])
        np.testing.assert_allclose(method.fit_predict(train, test, y), expected, atol=1e-12)


def test_c_chosen_by_inner_cross_validation():
    from sklearn.linear_model import LogisticRegressionCV

    for names in (["a", "b"], ["a", "b", "c"]):
        _ids, labels, vectors = clustered(15, names, separation=0.5)
        y = np.searchsorted(names, labels)
        method = LinearMethod("gigassl", vectors, tune_c=True)
        train, test = make_splits(y, None, 1, 0.3, seed=0)[0]
        proba = method.fit_predict(train, test, y)
        assert isinstance(make_logistic_regression(tune_c=True), LogisticRegressionCV)
        assert proba.shape == (len(test), len(names)) and roc_auc(y[test], proba) > 0.8


# ---- end to end -------------------------------------------------------------------------------


def test_multiclass_string_labels_end_to_end(tmp_path):
    ids, labels, vectors = clustered(12, ["benign", "in situ", "invasive"], seed=1)
    embeddings = write_embeddings(tmp_path / "e.h5", ids, vectors)
    csv_path = write_labels(
        tmp_path / "l.csv", [(i, label) for i, label in zip(ids, labels)] + [("ghost", "benign")], header=("slide", "label")
    )
    result = run_evaluation(
        EvaluateConfig(
            embeddings=embeddings, labels=csv_path, out=tmp_path / "out", n_splits=3, budgets=("100%", "2/class"), seed=0
        )
    )
    assert result.classes == ["benign", "in situ", "invasive"] and result.missing == ["ghost"]
    assert [r["budget"] for r in result.summary] == ["100%", "2/class"]
    assert result.summary[0]["auc_mean"] > 0.9 and result.summary[1]["n_train"] == 6
    assert result.csv_path.read_text().startswith("method,budget,n_train,n_splits,auc_mean")
    saved = json.loads(result.json_path.read_text())
    assert len(saved["splits"]) == 6 and saved["classes"] == result.classes
    assert result.plot_path.stat().st_size > 1000 and result.plot_path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="ghost"):
        run_evaluation(EvaluateConfig(embeddings=embeddings, labels=csv_path, out=tmp_path / "o2", strict=True))


def test_bad_budget_is_a_clear_cli_error(tmp_path, caplog):
    ids, labels, vectors = clustered(10, ["a", "b"])
    embeddings = write_embeddings(tmp_path / "e.h5", ids, vectors)
    csv_path = write_labels(tmp_path / "l.csv", list(zip(ids, labels)), header=("slide", "label"))
    code = cli_main(
        ["evaluate", "--embeddings", str(embeddings), "--labels", str(csv_path), "--budgets", "100", "--out", str(tmp_path / "o")]
    )
    assert code == 2 and "asks for 100 training slides" in caplog.text


def test_non_finite_vectors_and_repeated_ids_are_named(tmp_path, caplog):
    ids, labels, vectors = clustered(10, ["a", "b"])
    csv_path = write_labels(tmp_path / "l.csv", list(zip(ids, labels)), header=("slide", "label"))
    embeddings = write_embeddings(tmp_path / "e.h5", ids, vectors)
    with h5py.File(embeddings, "r+") as handle:  # the writer refuses NaN: a file edited by another tool
        handle["embeddings"][3] = np.nan
    config = EvaluateConfig(embeddings=embeddings, labels=csv_path, out=tmp_path / "o", n_splits=2)
    with pytest.raises(
        UserError,
        match=r"e\.h5: the vectors of 1 labelled slide\(s\) hold NaN or inf: a_03; "
        r"re-embed them",
    ):
        run_evaluation(config)
    vectors[3] = vectors[4]
    repeated = write_embeddings(tmp_path / "r.h5", ids + ["a_01"], np.concatenate([vectors, vectors[1:2]]))
    with pytest.raises(UserError, match=r"r\.h5: 1 slide id\(s\) appear more than once: a_01 \(rows 1, 20\)"):
        run_evaluation(dataclasses.replace(config, embeddings=repeated))
    caplog.clear()
    assert cli_main(["evaluate", "--embeddings", str(repeated), "--labels", str(csv_path)]) == 2
    assert "appear more than once" in caplog.text and "Traceback" not in caplog.text


def test_baselines_read_trident_files_and_refuse_nan_features(tmp_path):
    folder = tmp_path / "trident"
    folder.mkdir()
    ids, labels = [f"TCGA-{i:02d}" for i in range(12)], ["x", "y"] * 6
    rng = np.random.default_rng(0)
    for slide_id, label in zip(ids, labels):
        path = write_trident_file(folder / f"{slide_id}.h5", n_tiles=8, width=1024, seed=int(slide_id[-2:]))
        with h5py.File(path, "a") as handle:  # a class signal the mean of the tiles carries
            handle["features"][...] += 2.0 * (label == "y") + 0.1 * rng.standard_normal((8, 1024))
    csv_path = write_labels(tmp_path / "l.csv", list(zip(ids, labels)), header=("slide", "label"))
    embeddings = write_embeddings(tmp_path / "e.h5", ids, clustered(6, ["x", "y"])[2])
    config = EvaluateConfig(
        embeddings=embeddings,
        labels=csv_path,
        features=folder,
        baselines=("average", "abmil"),
        out=tmp_path / "o",
        n_splits=2,
        budgets=("100%",),
        mil_epochs=3,
        device="cpu",
    )
    result = run_evaluation(config)
    average = next(r for r in result.summary if r["method"] == "average")
    assert {r["method"] for r in result.summary} == {"gigassl", "average", "abmil"} and average["auc_mean"] > 0.9
    with h5py.File(folder / "TCGA-05.h5", "a") as handle:
        handle["features"][0, 0] = np.nan
    with pytest.raises(FeatureFileError, match=r"TCGA-05\.h5: NaN or inf in the plain features of 1 of 8 tiles"):
        run_evaluation(config)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """A planted synthetic cohort (patients of two slides), its embeddings by a random encoder."""
    folder = tmp_path_factory.mktemp("synthetic")
    paths = write_synthetic_cohort(folder / "features", n_slides=24, n_tiles=24, n_augmentations=1, bank_size=4)
    checkpoint = write_checkpoint(folder / "model.pt", n_tiles_per_view=5)
    run_embedding(EmbedConfig(model=checkpoint, features=folder / "features", out=folder / "e.h5", n_views=4, device="cpu"))
    return folder, paths


@pytest.mark.slow
def test_gigassl_average_and_abmil_beat_chance_on_a_planted_cohort(synthetic_run):
    folder, _ = synthetic_run
    result = run_evaluation(
        EvaluateConfig(
            embeddings=folder / "e.h5",
            labels=folder / "features" / "labels.csv",
            features=folder / "features",
            baselines=("average", "abmil"),
            out=folder / "eval",
            n_splits=3,
            test_fraction=0.34,
            budgets=("100%", "4/class"),
            mil_epochs=15,
            device="cpu",
        )
    )
    by_method = {(r["method"], r["budget"]): r for r in result.summary}
    assert set(m for m, _ in by_method) == {"gigassl", "average", "abmil"}
    for (method, budget), row in by_method.items():
        assert row["auc_mean"] > 0.7, (method, budget, row)
    assert by_method[("gigassl", "4/class")]["n_train"] == 8


def _write_real_tile_cohort(folder: Path, slide_path: Path) -> tuple[Path, Path]:
    """Eight 'slides' cut from one real slide: label 'tissue' slides hold tissue tiles, label
    'background' slides only glass; features by the random trunk, files pointing at the slide."""
    size_level0, out_px = 256, 32
    resnet, encoder = load_resnet18("random", seed=0)
    import torch

    from extract.encoders.tile_encoder import TileTrunk
    from gigassl.evaluation.mil import tiles_to_tensor

    trunk = TileTrunk(resnet).eval()
    tissue = [(x, y) for x in (768, 1024, 1280) for y in (1280, 1536, 1792, 2048)]
    glass = [(x, y) for x in (0, 256) for y in (0, 256, 512, 768, 1024, 1280)]
    grid = dict(patch_size=out_px, patch_size_level0=size_level0, mpp=0.499, target_mpp=0.499 * size_level0 / out_px)
    rows = []
    with open_slide(slide_path) as reader:
        for index in range(8):
            label = "tissue" if index % 2 else "background"
            pool = tissue if label == "tissue" else glass
            coords = np.array([pool[(index * 3 + j) % len(pool)] for j in range(3)] + glass[index % 4 : index % 4 + 2])
            images = np.stack([reader.read_tile(int(x), int(y), size_level0, out_px) for x, y in coords])
            with torch.no_grad():
                features = trunk(tiles_to_tensor(images, torch.device("cpu"))).numpy()
            slide_id = f"real_{index}"
            with SlideFileWriter(
                folder / f"{slide_id}.h5", slide_id=slide_id, source=str(slide_path), settings={"seed": 0}, encoder=encoder
            ) as writer:
                writer.create_plain(coords, grid)
                writer.write_plain_rows(0, features)
            rows.append((slide_id, label))
    return folder, write_labels(folder.parent / "labels.csv", rows, header=("slide", "label"))


@pytest.mark.slow
def test_every_baseline_including_topk_runs_on_real_slide_tiles(tmp_path, slides_dir):
    features, labels = _write_real_tile_cohort(tmp_path / "features", slides_dir / "CMU-1-Small-Region.svs")
    checkpoint = write_checkpoint(tmp_path / "model.pt", n_tiles_per_view=3)
    run_embedding(EmbedConfig(model=checkpoint, features=features, out=tmp_path / "e.h5", n_views=2, device="cpu"))
    result = run_evaluation(
        EvaluateConfig(
            embeddings=tmp_path / "e.h5",
            labels=labels,
            features=features,
            baselines=("average", "abmil", "topk"),
            out=tmp_path / "eval",
            n_splits=2,
            test_fraction=0.5,
            budgets=("100%",),
            mil_epochs=10,
            topk=2,
            topk_epochs=1,
            slides=slides_dir,
            device="cpu",
        )
    )
    by_method = {r["method"]: r for r in result.summary}
    assert set(by_method) == {"gigassl", "average", "abmil", "topk"}
    assert by_method["topk"]["n_splits"] == 2
    for method in ("average", "abmil", "topk"):
        assert by_method[method]["auc_mean"] > 0.5, (method, by_method[method])


def test_cli_help_renders_percent_signs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["evaluate", "--help"])
    assert exit_info.value.code == 0
    assert "(default: 100%,25%)" in capsys.readouterr().out


def test_baselines_on_trident_files_of_the_checkpoints_width_and_another_width_is_one_line(tmp_path, caplog):
    from gigassl.model import HeadSpec

    folder = tmp_path / "trident"
    folder.mkdir()
    ids, labels = [f"TCGA-{i:02d}" for i in range(12)], ["x", "y"] * 6
    for slide_id, label in zip(ids, labels):
        path = write_trident_file(folder / f"{slide_id}.h5", n_tiles=8, width=24, seed=int(slide_id[-2:]))
        with h5py.File(path, "a") as handle:  # a class signal the mean of the tiles carries
            handle["features"][...] += 2.0 * (label == "y")
    checkpoint = write_checkpoint(tmp_path / "fm.pt", n_tiles_per_view=4, head=HeadSpec.generic(24))
    run_embedding(EmbedConfig(model=checkpoint, features=folder, out=tmp_path / "e.h5", n_views=3, device="cpu"))
    csv_path = write_labels(tmp_path / "l.csv", list(zip(ids, labels)), header=("slide", "label"))
    config = EvaluateConfig(
        embeddings=tmp_path / "e.h5",
        labels=csv_path,
        features=folder,
        baselines=("average", "abmil"),
        out=tmp_path / "o",
        n_splits=2,
        budgets=("100%",),
        mil_epochs=2,
        device="cpu",
    )
    result = run_evaluation(config)
    assert {r["method"] for r in result.summary} == {"gigassl", "average", "abmil"}
    other = tmp_path / "wider"
    other.mkdir()
    for slide_id in ids:
        write_trident_file(other / f"{slide_id}.h5", n_tiles=8, width=32, seed=int(slide_id[-2:]))
    with pytest.raises(UserError) as error:
        run_evaluation(dataclasses.replace(config, features=other))
    message = str(error.value)
    assert "\n" not in message and "features are 32-d" in message and "takes 24-d features" in message
    caplog.clear()
    assert (
        cli_main(
            [
                "evaluate",
                "--embeddings",
                str(tmp_path / "e.h5"),
                "--labels",
                str(csv_path),
                "--features",
                str(other),
                "--baselines",
                "average",
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    assert "takes 24-d features" in caplog.text and "Traceback" not in caplog.text
