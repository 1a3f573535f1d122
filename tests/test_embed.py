"""Slide embeddings: unit norm, seeded reproducibility, the HDF5 file, exports, the sklearn transformer,
the settings' checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline

from extract.checkpoints.sealed import save_atomic
from extract.encoders.tile_encoder import file_sha256
from extract.errors import UserError
from extract.features.slide_file import FeatureFileError
from extract.settings import settings_dict
from gigassl.cli import main as cli_main
from gigassl.config import EmbedConfig, TrainConfig
from gigassl.embed import SlideEmbedder, embed_slides, run_embedding, sample_views, slide_generator
from gigassl.embeddings_file import EmbeddingFileError, read_embeddings
from gigassl.model import GigaSSLModel, HeadSpec
from gigassl.synthetic.cohort import random_encoder_info, write_synthetic_cohort
from gigassl.training.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from test_plain_features import write_trident_file


def write_checkpoint(
    path: Path, n_tiles_per_view: int = 5, seed: int = 0, encoder: dict | None = None, head: HeadSpec | None = None
) -> Path:
    """A checkpoint of a randomly initialised model, in `gigassl train`'s layout (``encoder``:
    the tile encoder of its training features, as training records it; ``head``: its
    architecture, ResNet18's layer4 when not given)."""
    torch.manual_seed(seed)
    model = GigaSSLModel(None, 256, "cpu", head=head)
    config = settings_dict(TrainConfig(features=path.parent, out=path.parent, n_tiles_per_view=n_tiles_per_view))
    payload = dict(
        format=CHECKPOINT_FORMAT,
        format_version=CHECKPOINT_VERSION,
        epoch=0,
        config=config,
        model={k: v.detach().cpu() for k, v in model.state_dict().items()},
    )
    if encoder is not None:
        payload["encoder"] = encoder
    payload["architecture"] = (head or HeadSpec()).to_dict()
    save_atomic(payload, path)
    return path


def _copy(paths, folder: Path) -> Path:
    folder.mkdir()
    for path in paths:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    paths = write_synthetic_cohort(folder / "features", n_slides=12, n_tiles=24, n_augmentations=1, bank_size=4)
    checkpoint = write_checkpoint(folder / "model.pt", n_tiles_per_view=4)
    return paths, checkpoint


@pytest.fixture(scope="module")
def model(cohort):
    from gigassl.training.checkpoint import load_model

    return load_model(cohort[1])[0]


def test_views_use_plain_tiles_on_their_grid_cells():
    features = np.arange(40, dtype=np.float32).reshape(10, 4)
    coords = np.stack([np.arange(10) * 448 + 896, np.full(10, 448 * 3)], axis=1)
    views = sample_views(features, coords, 448.0, n_views=3, n_tiles_per_view=4, generator=np.random.default_rng(0))
    assert len(views) == 3
    for view_features, cells in views:
        rows = (view_features[:, 0] / 4).astype(int)
        assert len(set(rows)) == 4  # without replacement
        np.testing.assert_array_equal(view_features, features[rows])  # plain, unaugmented
        np.testing.assert_array_equal(cells[:, 0], rows - rows.min())  # neighbours one cell apart
        assert np.all(cells[:, 1] == 0)
    few = sample_views(features[:2], coords[:2], 448.0, n_views=2, n_tiles_per_view=5, generator=np.random.default_rng(0))
    assert all(len(f) == 2 for f, _ in few)


def test_slide_generator_depends_on_seed_and_id_only():
    a = slide_generator(3, "slide_001").integers(0, 1 << 30, 4)
    np.testing.assert_array_equal(a, slide_generator(3, "slide_001").integers(0, 1 << 30, 4))
    assert not np.array_equal(a, slide_generator(4, "slide_001").integers(0, 1 << 30, 4))
    assert not np.array_equal(a, slide_generator(3, "slide_002").integers(0, 1 << 30, 4))


def test_embeddings_are_unit_norm_reproducible_and_seed_dependent(cohort, model):
    paths, _ = cohort
    ids, first = embed_slides(model, paths, n_views=6, n_tiles_per_view=4, seed=0, batch_size=5)
    assert ids == [f"slide_{i:03d}" for i in range(12)]
    assert first.shape == (12, 512) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    # same seed → same embeddings, whatever the batching and the order of the files
    _, again = embed_slides(model, paths[::-1], n_views=6, n_tiles_per_view=4, seed=0, batch_size=12)
    np.testing.assert_allclose(again[::-1], first, atol=1e-5)
    _, other = embed_slides(model, paths, n_views=6, n_tiles_per_view=4, seed=1, batch_size=5)
    assert np.abs(other - first).max() > 1e-3
    # more views → closer to the expectation, so two seeds agree better
    _, many_a = embed_slides(model, paths[:4], n_views=30, n_tiles_per_view=4, seed=0, batch_size=4)
    _, many_b = embed_slides(model, paths[:4], n_views=30, n_tiles_per_view=4, seed=1, batch_size=4)
    assert np.abs(many_a - many_b).mean() < np.abs(other[:4] - first[:4]).mean()


def test_run_embedding_writes_provenance_and_exports(cohort, tmp_path):
    paths, checkpoint = cohort
    out = tmp_path / "emb.h5"
    result = run_embedding(
        EmbedConfig(
            model=checkpoint, features=paths[0].parent, out=out, n_views=3, batch_size=4, device="cpu", export=("npz", "csv")
        )
    )
    assert result.exit_code == 0 and result.n_slides == 12 and not result.failed
    loaded = read_embeddings(out)
    assert loaded.slide_ids[0] == "slide_000" and loaded.embeddings.shape == (12, 512)
    p = loaded.provenance
    assert p["checkpoint_sha256"] == file_sha256(checkpoint)
    assert p["n_views"] == 3 and p["n_tiles_per_view"] == 4  # T from the checkpoint
    assert p["package_version"] and json.loads(p["settings"])["seed"] == 0
    npz = np.load(tmp_path / "emb.npz")
    np.testing.assert_array_equal(npz["embeddings"], loaded.embeddings)
    assert list(npz["slide_ids"]) == loaded.slide_ids
    rows = (tmp_path / "emb.csv").read_text().splitlines()
    assert rows[0].startswith("slide_id,e000,") and len(rows) == 13
    assert not list(tmp_path.glob("*.partial"))


def test_run_embedding_skips_a_bad_file_and_lists_it(cohort, tmp_path):
    paths, checkpoint = cohort
    folder = tmp_path / "features"
    folder.mkdir()
    for path in paths[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.h5").write_bytes(b"not hdf5")
    config = EmbedConfig(model=checkpoint, features=folder, out=tmp_path / "e.h5", n_views=2, device="cpu", strict=True)
    result = run_embedding(config)
    assert result.n_slides == 3 and len(result.failed) == 1 and "broken.h5" in result.failed[0][0]
    assert result.exit_code == 1
    assert "broken.h5" in read_embeddings(tmp_path / "e.h5").provenance["failed"]


def test_read_embeddings_refuses_other_files(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as handle:
        handle["embeddings"] = np.zeros((2, 512), np.float32)
    with pytest.raises(EmbeddingFileError, match="not a slide embeddings file"):
        read_embeddings(tmp_path / "x.h5")
    with pytest.raises(FileNotFoundError, match="gigassl embed"):
        read_embeddings(tmp_path / "missing.h5")


def test_embed_settings_are_checked_when_made_and_exports_are_a_tuple(tmp_path):
    base = dict(model=tmp_path / "m.pt", features=tmp_path, out=tmp_path / "e.h5")
    assert EmbedConfig(**base).export == ()
    assert EmbedConfig(**base, export=["csv"]).export == ("csv",)
    assert EmbedConfig(**base, export=("NPZ", "csv")).export == ("npz", "csv")  # kinds in lower case
    with pytest.raises(
        UserError,
        match=r"invalid embedding settings: --n-views must be ≥ 1 \(got 0\); "
        r"--export xlsx: unknown \['xlsx'\]; choose among npz, csv",
    ):
        EmbedConfig(**base, n_views=0, export=("xlsx",))
    with pytest.raises(UserError, match="--n-tiles-per-view must be ≥ 1.*--sparse-backend must be one of auto, torch, spconv"):
        EmbedConfig(**base, n_tiles_per_view=0, sparse_backend="minkowski")


def test_cli_embed(cohort, tmp_path):
    paths, checkpoint = cohort
    out = tmp_path / "cli.h5"
    code = cli_main(
        [
            "embed",
            "--model",
            str(checkpoint),
            "--features",
            str(paths[0].parent),
            "--out",
            str(out),
            "--n-views",
            "2",
            "--device",
            "cpu",
            "--export",
            "npz,csv",
        ]
    )
    assert code == 0 and len(read_embeddings(out).slide_ids) == 12
    assert (tmp_path / "cli.npz").is_file() and (tmp_path / "cli.csv").is_file()
    assert json.loads(read_embeddings(out).provenance["settings"])["export"] == ["npz", "csv"]


def test_slide_embedder_in_a_pipeline_and_cross_val_score(cohort):
    paths, checkpoint = cohort
    y = np.array([int(p.stem.split("_")[1]) // 2 % 2 for p in paths])  # synthetic_label
    embedder = SlideEmbedder(checkpoint, n_views=2, device="cpu")
    assert embedder.fit(paths) is embedder
    direct = embedder.transform(paths)
    assert direct.shape == (12, 512)
    pipeline = make_pipeline(SlideEmbedder(checkpoint, n_views=2, device="cpu"), LogisticRegression(C=10))
    pipeline.fit([str(p) for p in paths], y)
    assert pipeline.predict_proba([str(p) for p in paths[:2]]).shape == (2, 2)
    scores = cross_val_score(
        make_pipeline(SlideEmbedder(checkpoint, n_views=2), LogisticRegression(C=10)),
        [str(p) for p in paths],
        y,
        cv=3,
        scoring="roc_auc",
    )
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 1))
    # the planted class signal survives a random slide encoder
    assert scores.mean() > 0.6


def test_nan_plain_features_fail_their_slide_and_slide_embedder_names_it(cohort, tmp_path):
    paths, checkpoint = cohort
    folder = _copy(paths[:3], tmp_path / "features")
    with h5py.File(folder / "slide_001.h5", "a") as handle:
        handle["features"][2, 5] = np.nan
    result = run_embedding(EmbedConfig(model=checkpoint, features=folder, out=tmp_path / "e.h5", n_views=2, device="cpu"))
    assert result.n_slides == 2 and [Path(p).name for p, _ in result.failed] == ["slide_001.h5"]
    assert "NaN or inf in the plain features of 1 of 24 tiles" in result.failed[0][1]
    written = read_embeddings(tmp_path / "e.h5")
    assert written.slide_ids == ["slide_000", "slide_002"] and np.isfinite(written.embeddings).all()
    with pytest.raises(FeatureFileError, match=r"slide_001\.h5: NaN .*\(slide slide_001\)"):
        SlideEmbedder(checkpoint, n_views=2).transform([folder / "slide_000.h5", folder / "slide_001.h5"])


def test_trident_files_are_embedded_and_another_width_is_one_line(cohort, tmp_path, caplog):
    _, checkpoint = cohort
    folder = tmp_path / "trident"
    folder.mkdir()
    write_trident_file(folder / "TCGA-A.h5", width=256, seed=1)
    write_trident_file(folder / "TCGA-B.h5", width=1024, seed=2)
    result = run_embedding(EmbedConfig(model=checkpoint, features=folder, out=tmp_path / "e.h5", n_views=2, device="cpu"))
    assert result.n_slides == 1 and read_embeddings(tmp_path / "e.h5").slide_ids == ["TCGA-A"]
    assert result.failed == [
        (
            str(folder / "TCGA-B.h5"),
            f"{folder / 'TCGA-B.h5'}: features are 1024-d, this model "
            "expects 256-d; embed features extracted with the tile encoder the model was trained on",
        )
    ]
    (folder / "TCGA-A.h5").unlink()
    with pytest.raises(
        UserError,
        match=r"no slide .* could be embedded: 1 file\(s\) failed.*features are 1024-d, "
        r"this model expects 256-d",
    ):
        run_embedding(EmbedConfig(model=checkpoint, features=folder, out=tmp_path / "f.h5", device="cpu"))
    caplog.clear()
    code = cli_main(
        ["embed", "--model", str(checkpoint), "--features", str(folder), "--out", str(tmp_path / "g.h5"), "--device", "cpu"]
    )
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert code == 2 and len(errors) == 1 and errors[0].exc_info is None
    assert "\n" not in errors[0].getMessage() and "1024-d, this model expects 256-d" in errors[0].getMessage()


def test_features_of_another_tile_encoder_are_refused_unless_allowed(cohort, tmp_path):
    paths, _ = cohort
    other = dict(name="moco.pt", sha256="ab" * 32, source="file")
    checkpoint = write_checkpoint(tmp_path / "moco_model.pt", n_tiles_per_view=4, encoder=other)
    folder = _copy(paths[:2], tmp_path / "features")
    config = EmbedConfig(model=checkpoint, features=folder, out=tmp_path / "e.h5", n_views=2, device="cpu")
    with pytest.raises(
        UserError,
        match=r"slide_000\.h5: features made by the tile encoder 'random' .* trained on "
        r"features of 'moco\.pt' \(sha256 abababababab…\).*--allow-other-encoder",
    ):
        run_embedding(config)
    result = run_embedding(dataclasses.replace(config, allow_other_encoder=True))
    assert result.n_slides == 2 and not result.failed
    provenance = read_embeddings(tmp_path / "e.h5").provenance
    # the features' own encoder is recorded, not the checkpoint's
    assert provenance["encoder_sha256"] == random_encoder_info().sha256
    assert provenance["checkpoint_encoder_sha256"] == "ab" * 32
    assert json.loads(provenance["features_encoders"]) == [["random", random_encoder_info().sha256, 2]]


def test_a_copied_feature_file_is_listed_not_embedded_twice(cohort, tmp_path):
    paths, checkpoint = cohort
    folder = _copy(paths[:2], tmp_path / "features")
    (folder / "slide_000 (copy).h5").write_bytes(paths[0].read_bytes())
    result = run_embedding(
        EmbedConfig(model=checkpoint, features=folder, out=tmp_path / "e.h5", n_views=2, device="cpu", strict=True)
    )
    assert read_embeddings(tmp_path / "e.h5").slide_ids == ["slide_000", "slide_001"]
    assert result.exit_code == 1 and len(result.failed) == 1
    path, reason = result.failed[0]
    assert Path(path).name == "slide_000 (copy).h5" and "also the id of slide_000.h5" in reason
    assert "slide_000 (copy).h5" in result.format()


def test_trident_files_of_the_checkpoints_width_are_embedded_as_unverified(tmp_path, caplog):
    fm = dict(name="uni.pt2", sha256="cd" * 32, source="export", arch="uni", width=24)
    checkpoint = write_checkpoint(tmp_path / "fm_model.pt", n_tiles_per_view=4, encoder=fm, head=HeadSpec.generic(24))
    folder = tmp_path / "trident"
    folder.mkdir()
    write_trident_file(folder / "TCGA-A.h5", width=24, seed=1, encoder="uni_v1")
    write_trident_file(folder / "TCGA-B.h5", width=24, seed=2)
    write_trident_file(folder / "TCGA-C.h5", width=32, seed=3)
    with caplog.at_level("WARNING", logger="gigassl"):
        result = run_embedding(EmbedConfig(model=checkpoint, features=folder, out=tmp_path / "e.h5", n_views=3, device="cpu"))
    written = read_embeddings(tmp_path / "e.h5")
    assert written.slide_ids == ["TCGA-A", "TCGA-B"] and written.embeddings.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(written.embeddings, axis=1), 1.0, rtol=1e-5)
    assert json.loads(written.provenance["unverified"]) == ["TCGA-A", "TCGA-B"]
    assert written.provenance["feature_dim"] == 24 and json.loads(written.provenance["architecture"])["width"] == 512
    assert result.failed == [
        (
            str(folder / "TCGA-C.h5"),
            f"{folder / 'TCGA-C.h5'}: features are 32-d, this model "
            "expects 24-d; embed features extracted with the tile encoder the model was trained on",
        )
    ]
    warnings = [r.getMessage() for r in caplog.records if "cannot be verified" in r.getMessage()]
    assert len(warnings) == 1 and "2 slide file(s)" in warnings[0] and "uni.pt2" in warnings[0]
    # files with this package's provenance are verified: nothing listed
    paths = write_synthetic_cohort(tmp_path / "own", n_slides=2, n_tiles=12, n_augmentations=1, bank_size=4)
    own = write_checkpoint(tmp_path / "own.pt", n_tiles_per_view=4, encoder=random_encoder_info().to_dict())
    run_embedding(EmbedConfig(model=own, features=paths[0].parent, out=tmp_path / "o.h5", n_views=2, device="cpu"))
    assert json.loads(read_embeddings(tmp_path / "o.h5").provenance["unverified"]) == []


def test_a_resnet50_head_writes_2048_d_embeddings(cohort, tmp_path):
    head = HeadSpec.for_resnet("resnet50")
    checkpoint = write_checkpoint(tmp_path / "r50.pt", n_tiles_per_view=3, head=head)
    folder = tmp_path / "wide"
    folder.mkdir()
    for name in ("A", "B"):
        write_trident_file(folder / f"{name}.h5", width=1024, seed=ord(name))
    result = run_embedding(
        EmbedConfig(model=checkpoint, features=folder, out=tmp_path / "e.h5", n_views=2, device="cpu", export=("csv",))
    )
    assert read_embeddings(tmp_path / "e.h5").embeddings.shape == (2, 2048)
    assert result.exports[0].read_text().splitlines()[0].endswith(",e2047")
    embedded = SlideEmbedder(checkpoint, n_views=2).transform([folder / "A.h5"])
    assert embedded.shape == (1, 2048) and np.isfinite(embedded).all()


def test_mixed_precision_embeddings_are_the_fp32_ones_to_a_cosine_of_0_999(cohort, model, monkeypatch):
    from extract import device as device_module

    paths, _ = cohort
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)  # bf16 autocast on any CPU
    _, exact = embed_slides(model, paths, n_views=8, n_tiles_per_view=4, mixed_precision=False)
    _, mixed = embed_slides(model, paths, n_views=8, n_tiles_per_view=4, mixed_precision=True)
    assert not np.array_equal(exact, mixed)  # autocast did run
    cosines = np.sum(exact * mixed, axis=1)
    assert cosines.min() > 0.999, cosines
