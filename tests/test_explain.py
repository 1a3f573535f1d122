"""gigassl fit / predict / explain: the model file (pickle-free, checksummed, provenance checked),
predictions with a broken slide in the folder, and exact tile contributions (their sum plus the
intercept is the class score, computed independently), coverage, GeoJSON, images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import geojson
import h5py
import numpy as np
import pytest
import shapely.geometry
import torch

from extract.errors import UserError
from extract.features.plain import read_plain_features
from gigassl.classifier.attribution import covering_views, explaining_views, gigassl_contributions, linear_direction
from gigassl.classifier.config import ExplainConfig, FitConfig, PredictConfig
from gigassl.classifier.explain_outputs import geojson_collection, write_tile_grid
from gigassl.classifier.model_file import ClassifierFileError, load_classifier, save_classifier
from gigassl.cli import main as cli_main
from gigassl.config import EmbedConfig
from gigassl.embed import run_embedding
from gigassl.evaluation.mil import make_logistic_regression
from gigassl.explain import SlideExplainer, run_explain
from gigassl.fit import run_fit
from gigassl.predict import run_predict
from gigassl.sparse.maps import collate_views, tile_cells
from gigassl.synthetic.cohort import synthetic_label, write_synthetic_cohort
from test_embed import write_checkpoint


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A synthetic cohort (12 slides × 40 tiles), a checkpoint, its embeddings and three fitted models."""
    folder = tmp_path_factory.mktemp("explain")
    paths = write_synthetic_cohort(folder / "features", n_slides=12, n_tiles=40, n_augmentations=1, bank_size=4)
    checkpoint = write_checkpoint(folder / "model.pt", n_tiles_per_view=5)
    embeddings = folder / "embeddings.h5"
    run_embedding(EmbedConfig(model=checkpoint, features=folder / "features", out=embeddings, n_views=10, mixed_precision=False))
    labels = folder / "labels.csv"
    labels.write_text("slide,label\n" + "".join(f"{p.stem},{'ab'[synthetic_label(i)]}\n" for i, p in enumerate(paths)))
    models = {}
    for method in ("gigassl", "average", "abmil"):
        config = FitConfig(
            labels=labels,
            out=folder / f"{method}.h5",
            method=method,
            embeddings=embeddings,
            features=folder / "features",
            mil_epochs=3,
            device="cpu",
        )
        models[method] = run_fit(config).out
    return dict(folder=folder, paths=paths, checkpoint=checkpoint, embeddings=embeddings, labels=labels, models=models)


def test_fit_matches_the_evaluation_classifier(fitted):
    from gigassl.embeddings_file import read_embeddings

    data = read_embeddings(fitted["embeddings"])
    y = np.array([synthetic_label(int(s.split("_")[1])) for s in data.slide_ids])
    reference = make_logistic_regression(10.0, standardize=True).fit(data.embeddings.astype(np.float64), y)
    classifier = load_classifier(fitted["models"]["gigassl"])
    assert classifier.classes == ["a", "b"]
    np.testing.assert_allclose(
        classifier.linear.logits(data.embeddings)[:, 0], reference.decision_function(data.embeddings), atol=1e-9
    )


def test_model_file_round_trip_without_pickle(fitted, tmp_path):
    for method, path in fitted["models"].items():
        classifier = load_classifier(path)
        with h5py.File(path, "r") as handle:
            kinds: list[str] = []
            handle.visititems(
                lambda name, item, found=kinds: found.append(item.dtype.kind) if isinstance(item, h5py.Dataset) else None
            )
            assert kinds and set(kinds) <= {"f", "i", "u"}, f"{method}: only numeric arrays, no object (pickle) data"
            assert all(isinstance(v, (str, bytes, np.number, int, float, np.bool_)) for v in handle.attrs.values())
        copy = save_classifier(classifier, tmp_path / f"{method}.h5")
        again = load_classifier(copy)
        assert again.classes == classifier.classes and again.provenance == classifier.provenance
        for name, value in classifier.abmil_state.items():
            np.testing.assert_array_equal(again.abmil_state[name], value)
    provenance = load_classifier(fitted["models"]["gigassl"]).provenance
    assert provenance["checkpoint_sha256"] and provenance["n_views"] == 10 and provenance["n_tiles_per_view"] == 5


def test_a_damaged_model_file_is_refused(fitted, tmp_path):
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(fitted["models"]["average"].read_bytes())
    with h5py.File(damaged, "r+") as handle:
        handle["linear/coef"][0, 0] += 1e-3
    with pytest.raises(ClassifierFileError, match="damaged"):
        load_classifier(damaged)
    classifier = load_classifier(fitted["models"]["average"])
    classifier.linear.coef[0, 3] = np.nan
    with pytest.raises(ClassifierFileError, match=r"NaN or inf in linear/coef"):
        save_classifier(classifier, tmp_path / "nan.h5")
    assert not (tmp_path / "nan.h5").exists()


def test_predict_refuses_embeddings_of_another_checkpoint(fitted, tmp_path):
    other = write_checkpoint(tmp_path / "other.pt", n_tiles_per_view=5, seed=1)
    embeddings = tmp_path / "other.h5"
    run_embedding(EmbedConfig(model=other, features=fitted["folder"] / "features", out=embeddings, n_views=4))
    with pytest.raises(ClassifierFileError, match=r"fitted on embeddings of the checkpoint .*model\.pt.* comes from .*other\.pt"):
        run_predict(PredictConfig(model=fitted["models"]["gigassl"], embeddings=embeddings, out=tmp_path / "p.csv"))
    with pytest.raises(ClassifierFileError, match="other.pt"):
        SlideExplainer(fitted["models"]["gigassl"], other)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_from_embeddings_and_on_the_fly_agree(fitted, tmp_path):
    model = fitted["models"]["gigassl"]
    run_predict(PredictConfig(model=model, embeddings=fitted["embeddings"], out=tmp_path / "a.csv"))
    run_predict(
        PredictConfig(
            model=model,
            features=fitted["folder"] / "features",
            checkpoint=fitted["checkpoint"],
            out=tmp_path / "b.csv",
            mixed_precision=False,
        )
    )
    a, b = _rows(tmp_path / "a.csv"), _rows(tmp_path / "b.csv")
    assert list(a[0]) == ["slide", "predicted", "p_a", "p_b"] and len(a) == 12
    assert [r["predicted"] for r in a] == [r["predicted"] for r in b]
    np.testing.assert_allclose([float(r["p_b"]) for r in a], [float(r["p_b"]) for r in b], atol=1e-5)


@pytest.mark.parametrize("method", ["gigassl", "average", "abmil"])
def test_predict_lists_a_broken_slide_and_scores_the_rest(fitted, tmp_path, method):
    folder = tmp_path / "features"
    folder.mkdir()
    for path in fitted["paths"][:4]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.h5").write_bytes(b"not an HDF5 file")
    out = tmp_path / "predictions.csv"
    status = cli_main(
        ["predict", "--model", str(fitted["models"][method]), "--features", str(folder), "--out", str(out)]
        + (["--checkpoint", str(fitted["checkpoint"])] if method == "gigassl" else [])
    )
    assert status == 0
    assert sorted(r["slide"] for r in _rows(out)) == sorted(p.stem for p in fitted["paths"][:4])
    failed = _rows(out.with_suffix(".failed.csv"))
    assert [Path(r["file"]).name for r in failed] == ["broken.h5"] and "HDF5" in failed[0]["reason"]


def test_gigassl_contributions_sum_to_the_score_of_the_views(fitted):
    """Σ contributions + intercept = the classifier (scaler + LR, as fitted) on the embeddings made by
    model.pool from the same views — an independent computation of the score."""
    explainer = SlideExplainer(fitted["models"]["gigassl"], fitted["checkpoint"])
    classifier, model = explainer.classifier, explainer.network
    slide = read_plain_features(fitted["paths"][3])
    u, c = linear_direction(classifier, 1)
    rows = explaining_views(len(slide.features), 5, 10, 3, np.random.default_rng(0))
    contributions, n_views, _, _ = gigassl_contributions(model, slide, u, rows, 10, batch_views=7)
    with torch.no_grad():
        pooled = model.pool(
            collate_views([(slide.features[r], tile_cells(slide.coords[r], slide.tile_step_level0)) for r in rows])
        )
    embeddings = torch.nn.functional.normalize(pooled.double().view(-1, 10, pooled.shape[1]).mean(dim=1), dim=1).numpy()
    expected = classifier.linear.logits(embeddings)[:, 0].mean()  # log-odds of class "b" (index 1)
    assert abs(contributions.sum() + c - expected) < 1e-4
    assert n_views.min() >= 3 and n_views.sum() == rows.size


def test_baseline_contributions_are_exact(fitted):
    slide = read_plain_features(fitted["paths"][5])
    average = SlideExplainer(fitted["models"]["average"]).explain(slide.path, class_name="a")
    classifier = load_classifier(fitted["models"]["average"])
    expected = -classifier.linear.logits(slide.features.astype(np.float64).mean(axis=0)[None])[0, 0]  # log-odds of "a"
    assert abs(average.reproduced_score - expected) < 1e-9 and average.class_name == "a"
    attention = SlideExplainer(fitted["models"]["abmil"]).explain(slide.path)
    network = load_classifier(fitted["models"]["abmil"]).attention_model()
    with torch.no_grad():
        logits, weights = network(torch.from_numpy(slide.features)[None])
    k = ["a", "b"].index(attention.class_name)
    assert abs(attention.reproduced_score - float(logits[0, k] - logits[0, 1 - k])) < 1e-4
    np.testing.assert_allclose(attention.attention, weights[0].numpy(), atol=1e-6)


def test_covering_views_cover_every_tile():
    for n, t, per_tile in [(10_000, 5, 8), (41, 5, 3), (3, 5, 2), (7, 7, 1)]:
        rows = covering_views(n, t, per_tile, np.random.default_rng(n))
        counts = np.bincount(rows.ravel(), minlength=n)
        assert rows.shape[1] == min(t, n) and counts.min() >= per_tile
        assert all(len(set(r)) == len(r) for r in rows[:200]), "tiles are distinct within a view"
    assert len(covering_views(10_000, 5, 8, np.random.default_rng(0))) == 8 * 2000


def test_explain_writes_every_file_and_a_valid_geojson(fitted, tmp_path):
    out = tmp_path / "explain"
    status = cli_main(
        ["explain", "--model", str(fitted["models"]["gigassl"]), "--checkpoint", str(fitted["checkpoint"])]
        + ["--features", str(fitted["folder"] / "features"), "--out", str(out), "--slide-ids", "slide_000,slide_001"]
    )
    assert status == 0
    stem = out / "slide_000.gigassl"
    assert {p.name for p in out.iterdir()} >= {
        f"slide_00{i}.gigassl{s}" for i in (0, 1) for s in (".h5", ".geojson", ".heatmap.png")
    }
    with h5py.File(stem.with_name(stem.name + ".h5"), "r") as handle:
        coords, contributions = handle["coords"][...], handle["contributions"][...]
        assert handle["n_views"][...].min() >= 8 and abs(handle.attrs["reproduced_score"] - handle.attrs["score"]) < 1e-4
        side = handle["coords"].attrs["patch_size_level0"]
    collection = geojson.loads(stem.with_name(stem.name + ".geojson").read_text())
    assert collection.is_valid and len(collection["features"]) == len(coords)
    for feature, (x, y), value in zip(collection["features"], coords, contributions):
        polygon = shapely.geometry.shape(feature["geometry"])
        assert polygon.is_valid and polygon.area == pytest.approx(side * side) and polygon.bounds[:2] == (x, y)
        assert feature["properties"]["objectType"] == "tile"
        assert feature["properties"]["measurements"]["contribution"] == pytest.approx(value)


def test_explain_refuses_unknown_inputs_in_one_line(fitted, tmp_path):
    with pytest.raises(UserError, match="pass --checkpoint"):
        run_explain(ExplainConfig(model=fitted["models"]["gigassl"], features=fitted["folder"] / "features", out=tmp_path))
    with pytest.raises(UserError, match="nope: no such slide"):
        run_explain(ExplainConfig(model=fitted["models"]["average"], features=fitted["folder"] / "features", slide_ids=("nope",)))
    with pytest.raises(UserError, match="not one of the model's classes"):
        SlideExplainer(fitted["models"]["average"]).explain(fitted["paths"][0], class_name="c")


def test_tile_grid_shows_top_and_bottom_tiles(fitted, tmp_path):
    from PIL import Image

    attribution = SlideExplainer(fitted["models"]["average"]).explain(fitted["paths"][0])
    asked: list[np.ndarray] = []

    def read(rows: np.ndarray) -> np.ndarray:
        asked.append(rows)
        return np.full((len(rows), 32, 32, 3), 128, np.uint8)

    path = write_tile_grid(attribution, read, 4, tmp_path / "tiles.png")
    order = np.argsort(attribution.contributions)
    np.testing.assert_array_equal(asked[0], np.concatenate([order[::-1][:4], order[:4]]))
    assert Image.open(path).size[0] == 4 * 36


def test_geojson_has_no_nan_and_closed_rings(fitted):
    attribution = SlideExplainer(fitted["models"]["average"]).explain(fitted["paths"][1])
    collection = geojson_collection(attribution)
    text = json.dumps(collection, allow_nan=False)
    assert "NaN" not in text
    for feature in collection["features"]:
        ring = feature["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) == 5


def test_mil_models_refuse_features_of_another_encoder(fitted, tmp_path):
    import dataclasses

    from gigassl.synthetic.cohort import random_encoder_info

    other = dataclasses.replace(random_encoder_info(), name="other.pt", sha256="0" * 64)
    paths = write_synthetic_cohort(tmp_path / "features", n_slides=2, n_tiles=20, n_augmentations=1, bank_size=4, encoder=other)
    with pytest.raises(
        ClassifierFileError, match=r"features of the tile encoder sha256 000000000000…, but .*average\.h5 was fitted"
    ):
        SlideExplainer(fitted["models"]["average"]).explain(paths[0])
    status = cli_main(
        [
            "predict",
            "--model",
            str(fitted["models"]["abmil"]),
            "--features",
            str(tmp_path / "features"),
            "--out",
            str(tmp_path / "p.csv"),
        ]
    )
    assert status == 2, "no slide could be scored: one line, user error"


def test_demo_cohort_writes_its_ground_truth(tmp_path):
    from gigassl.synthetic.demo_cohort import (
        CLASS_MAP_STEP_PX,
        CLASS_MAPS_FOLDER,
        CohortSettings,
        read_class_map,
        write_demo_cohort,
    )

    settings = CohortSettings(width_px=256, height_px=192, n_levels=1, tile_px=128)
    write_demo_cohort(tmp_path, n_slides=2, seed=3, settings=settings)
    manifest = json.loads((tmp_path / "cohort.json").read_text())
    for record in manifest["slides"]:
        classes = read_class_map(tmp_path / CLASS_MAPS_FOLDER / f"{record['slide']}.png")
        assert classes.shape == (192 // CLASS_MAP_STEP_PX, 256 // CLASS_MAP_STEP_PX)
        tissue = classes >= 0
        assert tissue.mean() == pytest.approx(record["tissue_fraction"], abs=0.01)
        assert (classes == 0).sum() / tissue.sum() == pytest.approx(record["tumour_fraction"], abs=0.02)
        assert ((classes == 0).any()) == bool(record["label"])


def test_multiclass_models_explain_each_class_logit(fitted, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\n" + "".join(f"{p.stem},{'xyz'[i % 3]}\n" for i, p in enumerate(fitted["paths"])))
    model = run_fit(FitConfig(labels=labels, out=tmp_path / "m.h5", method="average", features=fitted["folder"] / "features")).out
    classifier = load_classifier(model)
    slide = read_plain_features(fitted["paths"][2])
    logits = classifier.linear.logits(slide.features.astype(np.float64).mean(axis=0)[None])[0]
    assert classifier.classes == ["x", "y", "z"] and len(logits) == 3
    for k, name in enumerate(classifier.classes):
        attribution = SlideExplainer(model).explain(slide.path, class_name=name)
        assert attribution.reproduced_score == pytest.approx(logits[k], abs=1e-9)
    rows = run_predict(PredictConfig(model=model, features=fitted["folder"] / "features", out=tmp_path / "p.csv"))
    assert rows.n_slides == 12 and list(_rows(tmp_path / "p.csv")[0]) == ["slide", "predicted", "p_x", "p_y", "p_z"]
