import itertools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from extract.checkpoints.sealed import save_atomic
from extract.encoders.exported import export_tile_encoder
from extract.encoders.tile_encoder import EncoderInfo, file_sha256, load_resnet, load_resnet18, save_encoder_checkpoint
from extract.errors import UserError
from extract.training.schedule import WarmupCosine, warmup_warning
from fixtures.make_slides import write_tissue_slide
from gigassl import cli
from gigassl.config import EmbedConfig, TrainConfig
from gigassl.embed import read_embeddings, run_embedding
from gigassl.model import HeadSpec
from gigassl.synthetic.cohort import write_synthetic_cohort
from gigassl.train import MONITOR_COLUMNS, TrainingDivergedError, run_training
from gigassl.training import loop as train_loop
from gigassl.training.checkpoint import config_differences, load_checkpoint, load_model
from gigassl.training.distributed import GlobalBatchNorm1d, use_global_batch_norm
from gigassl.training.monitors import batch_statistics, stall_warning
from test_exported import MEAN, STD, tiny_model

# T = 3 and 6 slides keep the sparse layer4's work (and the tests) small
FAST = dict(n_tiles_per_view=3, warmup_epochs=1, monitor_slides=4, check_finite=True)


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("features")
    write_synthetic_cohort(folder, n_slides=6, n_tiles=24, n_augmentations=3, bank_size=10, seed=2)
    return folder


def _config(features, out, **overrides) -> TrainConfig:
    settings = dict(FAST, features=Path(features), out=Path(out), batch_size=3, epochs=2, checkpoint_every=1)
    settings.update(overrides)
    return TrainConfig(**settings)


def _rows(result_or_out) -> list[dict]:
    path = result_or_out.monitors_json if hasattr(result_or_out, "monitors_json") else Path(result_or_out) / "monitors.json"
    return json.loads(Path(path).read_text())


@pytest.mark.slow
def test_short_run_learns_the_planted_structure(tmp_path):
    features = tmp_path / "features"
    write_synthetic_cohort(features, n_slides=12, n_tiles=30, n_augmentations=3, bank_size=12, seed=0)
    # 12 epochs of 2 steps: the 12-slide monitor is noisy, and 6 epochs were not always enough
    result = run_training(
        _config(features, tmp_path / "out", batch_size=6, epochs=12, checkpoint_every=6, n_tiles_per_view=5, monitor_slides=12)
    )
    rows = _rows(result)
    assert [row["epoch"] for row in rows] == list(range(13))  # row 0: before training
    first, last = rows[0], rows[-1]
    assert last["loss"] < first["loss"] - 0.5, (first["loss"], last["loss"])
    assert last["positive_pair_accuracy"] > first["positive_pair_accuracy"] + 0.1
    assert rows[11]["train_loss"] + rows[12]["train_loss"] < rows[1]["train_loss"] + rows[2]["train_loss"]
    for key in ("collapse_level", "rankme", "odcorr", "grad_norm", "data_share"):
        assert all(torch.isfinite(torch.tensor(row[key])) for row in rows if key in row)
    assert result.curves.stat().st_size > 10_000 and result.monitors_csv.read_text().count("\n") == 14
    payload = load_checkpoint(result.checkpoint)
    assert payload["epoch"] == 12 and payload["global_step"] == 24 and payload["config"]["batch_size"] == 6
    assert payload["encoder"]["name"] == "random" and payload["init"]["sha256"] == payload["encoder"]["sha256"]
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["epoch_0006.pt", "epoch_0012.pt"]
    model, _ = load_model(result.checkpoint)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, payload["model"][key], rtol=0, atol=0)


def test_stall_warning_at_the_constant_output_level_only():
    # the demo cohort's collapsed run: mean loss of the last epochs 3.56 for batch 20 (log 39 = 3.66)
    message = stall_warning(3.56, 0.06, 20)
    assert message is not None and "3.664" in message and "constant output" in message
    # labelled as the training batches' accuracy (the epoch line also reports the monitor slides')
    assert "train positive-pair accuracy 0.060, chance 0.026" in message
    assert stall_warning(2.5, 0.4, 20) is None  # a loss well below log(2B − 1): learning
    assert stall_warning(float("nan"), 0.0, 20) is None


def test_lr_schedule_warms_up_then_decays():
    schedule = WarmupCosine(warmup_steps=4, total_steps=12)
    factors = [schedule(step) for step in range(13)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[8] == pytest.approx(0.5) and factors[12] == pytest.approx(0.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(small_cohort, tmp_path):
    # the uninterrupted run reads with a worker through all epochs in one loader pass
    whole = run_training(_config(small_cohort, tmp_path / "whole", epochs=3, num_workers=1))
    resumed = run_training(
        _config(
            small_cohort,
            tmp_path / "resumed",
            epochs=3,
            resume=tmp_path / "whole" / "checkpoints" / "epoch_0002.pt",
            num_workers=0,
        )
    )
    a, b = load_checkpoint(whole.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a["global_step"] == b["global_step"] == 6
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
    for key in ("exp_avg", "exp_avg_sq"):
        for index in a["optimizer"]["state"]:
            torch.testing.assert_close(a["optimizer"]["state"][index][key], b["optimizer"]["state"][index][key], rtol=0, atol=0)
    assert _rows(resumed)[:3] == _rows(whole)[:3]  # the history travels with the checkpoint
    assert _rows(resumed)[3]["train_loss"] == _rows(whole)[3]["train_loss"]


def test_resume_with_other_settings_names_them(small_cohort, tmp_path):
    run_training(_config(small_cohort, tmp_path / "first", epochs=1))
    other = _config(
        small_cohort, tmp_path / "second", epochs=1, lr=0.1, temperature=0.1, resume=tmp_path / "first" / "checkpoint.pt"
    )
    with pytest.raises(ValueError, match=r"settings differ.*lr: 0\.03 → 0\.1.*temperature: 0\.05 → 0\.1"):
        run_training(other)
    assert config_differences({"lr": 1, "out": "a", "num_workers": 0}, {"lr": 1, "out": "b", "num_workers": 2}) == []
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(small_cohort, tmp_path, monkeypatch):
    calls = []
    real = train_loop.losses.nt_xent_distributed

    def failing_on_fifth_step(z1, z2, temperature):
        calls.append(1)
        loss = real(z1, z2, temperature)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(train_loop.losses, "nt_xent_distributed", failing_on_fifth_step)
    with pytest.raises(TrainingDivergedError, match=r"nan at epoch 3, step 1 \(global step 5\).*checkpoint\.pt"):
        run_training(_config(small_cohort, tmp_path / "out", epochs=4))
    assert load_checkpoint(tmp_path / "out" / "checkpoint.pt")["epoch"] == 2
    assert not list((tmp_path / "out").rglob("*.partial"))


def test_features_of_another_encoder_need_init(tmp_path):
    features = tmp_path / "features"
    paths = write_synthetic_cohort(features, n_slides=4, n_tiles=12, n_augmentations=2, bank_size=6)
    for path in paths:
        with h5py.File(path, "a") as handle:
            handle["aug_features"].attrs["encoder"] = "moco.pt"
    with pytest.raises(ValueError, match="'moco.pt'.*--init PATH"):
        run_training(_config(features, tmp_path / "a", epochs=1))
    resnet, _ = load_resnet18("random", seed=5)
    save_encoder_checkpoint(resnet, tmp_path / "moco.pt")
    result = run_training(_config(features, tmp_path / "b", epochs=1, init=str(tmp_path / "moco.pt")))
    payload = load_checkpoint(result.checkpoint)
    assert payload["init"]["name"] == "moco.pt"
    # one Adam step from the checkpoint's layer4 (not from the seed-0 random one)
    trained = payload["model"]["layer4.block1.conv1.weight"]
    dense = resnet.layer4[1].conv1.weight.detach().permute(0, 2, 3, 1)
    seed0 = load_resnet18("random")[0].layer4[1].conv1.weight.detach().permute(0, 2, 3, 1)
    assert not torch.equal(trained, dense)
    torch.testing.assert_close(trained, dense, atol=0.01, rtol=0)
    assert (trained - seed0).abs().max() > 0.05


def test_training_settings_are_checked_when_made_naming_the_flags(tmp_path):
    with pytest.raises(
        UserError,
        match=r"invalid training settings: --batch-size must be ≥ 2 slides \(got 1\); "
        r"need 0 < --scale-min ≤ --scale-max \(got 2\.0, 1\.0\); "
        r"--keep-checkpoints must be ≥ 1 \(got 0\)",
    ):
        TrainConfig(features=tmp_path, out=tmp_path, batch_size=1, scale_min=2.0, scale_max=1.0, keep_checkpoints=0)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--features", str(tmp_path), "--out", str(tmp_path), "--lr", "0"])
    assert exit_.value.code == 2


def test_batch_statistics_leave_the_running_statistics_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(10, 4)
    with batch_statistics(model):
        out = model(x)
    torch.testing.assert_close(out.mean(0), torch.zeros(6), atol=1e-5, rtol=0)  # the batch's own statistics
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_global_batch_norm_without_distributed_is_batch_norm():
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6))
    swapped = use_global_batch_norm(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6)))
    swapped.load_state_dict(plain.state_dict())
    assert isinstance(swapped[1], GlobalBatchNorm1d)
    x = torch.randn(10, 4)
    torch.testing.assert_close(swapped(x), plain(x))
    torch.testing.assert_close(swapped[1].running_var, plain[1].running_var)


def test_cli_train_end_to_end(small_cohort, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="gigassl"):
        status = cli.main(
            [
                "train",
                "--features",
                str(small_cohort),
                "--out",
                str(out),
                "--epochs",
                "1",
                "--batch-size",
                "3",
                "--n-tiles-per-view",
                "3",
                "--warmup-epochs",
                "2",
                "--monitor-slides",
                "4",
            ]
        )
    assert status == 0
    assert (out / "checkpoint.pt").is_file() and (out / "curves.png").is_file()
    assert len(_rows(out)) == 2
    header, before, after = (out / "monitors.csv").read_text().splitlines()
    assert header.split(",") == list(MONITOR_COLUMNS)  # row 0 (before training) leaves the train_* cells empty
    assert before.startswith("0,0,") and ",,,,,," in before and ",," not in after
    printed = capsys.readouterr().out  # the CLI prints the run's report; run_training only returns it
    assert "trained 1 epochs (2 steps)" in printed and str(out / "checkpoint.pt") in printed
    assert "monitor positive-pair accuracy" in printed
    # the warm-up longer than the run is reported; the epoch line labels its two accuracies
    assert "--warmup-epochs 2 ≥ --epochs 1: the run ends during the linear warm-up" in caplog.text
    epoch_line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1/1:"))
    assert "train positive-pair accuracy" in epoch_line and "(chance 0.200, batches of 3 slides)" in epoch_line
    assert "monitor positive-pair accuracy" in epoch_line and "(chance 0.143, 4 fixed slides)" in epoch_line
    assert cli.main(["train", "--features", str(tmp_path / "missing"), "--out", str(tmp_path / "other")]) == 2


def test_warmup_warning_only_when_the_run_ends_in_the_warm_up():
    assert warmup_warning(10, 1000) is None and warmup_warning(0, 1) is None
    assert "reaches only 50% of --lr" in warmup_warning(10, 5)
    assert "reaches only 100% of --lr and the cosine decay never starts" in warmup_warning(3, 3)


def test_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite(small_cohort, tmp_path):
    out = tmp_path / "out"
    run_training(_config(small_cohort, out, epochs=2, keep_checkpoints=5))
    before = (out / "monitors.json").read_text()
    with pytest.raises(
        UserError,
        match=r"out already holds a training run \(epoch 2 of 2\); pass --resume "
        r".*checkpoint\.pt to continue it .*--overwrite to replace it",
    ):
        run_training(_config(small_cohort, out, epochs=1, lr=0.1))
    assert (out / "monitors.json").read_text() == before  # untouched
    run_training(_config(small_cohort, out, epochs=1, lr=0.1, overwrite=True))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0001.pt"]  # the old run's are gone
    assert load_checkpoint(out / "checkpoint.pt")["config"]["lr"] == 0.1 and len(_rows(out)) == 2


@pytest.mark.slow
def test_resume_with_more_epochs_follows_the_longer_runs_schedule(small_cohort, tmp_path, caplog):
    # warm-up = epoch 1, identical whatever the total: a 2-epoch run's epoch-1 checkpoint, resumed
    # with --epochs 3, must end exactly where a 3-epoch run ends (same views, same lr from there on)
    longer = run_training(_config(small_cohort, tmp_path / "longer", epochs=3))
    run_training(_config(small_cohort, tmp_path / "short", epochs=2))
    with caplog.at_level(logging.INFO, logger="gigassl"):
        extended = run_training(
            _config(
                small_cohort,
                tmp_path / "short",
                epochs=3,
                resume=tmp_path / "short" / "checkpoints" / "epoch_0001.pt",
                overwrite=False,
            )
        )
    assert "the run planned 2 epochs, now 3: schedule re-planned over 3 epochs" in caplog.text
    a, b = load_checkpoint(longer.checkpoint), load_checkpoint(extended.checkpoint)
    assert b["epoch"] == 3 and b["global_step"] == a["global_step"] == 6 and b["config"]["epochs"] == 3
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=0, atol=0, msg=key)
    assert b["scheduler"]["lr_lambdas"][0]["total_steps"] == 6
    # a finished run can be trained longer; fewer epochs than already trained is refused
    more = run_training(_config(small_cohort, tmp_path / "longer", epochs=4, resume=longer.checkpoint))
    assert load_checkpoint(more.checkpoint)["epoch"] == 4 and len(_rows(more)) == 5
    with pytest.raises(UserError, match="it has trained 4 epochs, more than --epochs 2; --epochs is the total"):
        run_training(_config(small_cohort, tmp_path / "longer", epochs=2, resume=more.checkpoint))


@pytest.mark.slow
def test_two_rank_torchrun_step_equals_one_process(small_cohort, tmp_path):
    # one step per epoch (global batch = the 6 slides), 3 slides per rank
    flags = [
        "--features",
        str(small_cohort),
        "--batch-size",
        "6",
        "--n-tiles-per-view",
        "3",
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--monitor-slides",
        "6",
        "--device",
        "cpu",
        "--no-mixed-precision",
    ]  # fp32: bf16 rounding differs between a global and a split batch
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "gigassl.cli",
        "train",
        "--out",
        str(tmp_path / "ddp"),
        *flags,
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "2 ranks, global batch 6" in completed.stderr
    assert cli.main(["train", "--out", str(tmp_path / "one"), *flags]) == 0
    ddp, one = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt"), load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    assert ddp["history"][1]["train_loss"] == pytest.approx(one["history"][1]["train_loss"], rel=1e-5)
    assert ddp["history"][1]["grad_norm"] == pytest.approx(one["history"][1]["grad_norm"], rel=1e-4)
    # Adam's first moment after one step is 0.1·gradient: the averaged DDP gradients equal the
    # gradients of the one-process loss on the global batch (batch norm statistics included)
    for index, state in one["optimizer"]["state"].items():
        torch.testing.assert_close(ddp["optimizer"]["state"][index]["exp_avg"], state["exp_avg"], rtol=1e-3, atol=1e-7)
    for key in one["model"]:
        if "running" in key:
            torch.testing.assert_close(ddp["model"][key], one["model"][key], rtol=1e-4, atol=1e-5)


@pytest.mark.spconv
def test_a_checkpoint_trained_with_spconv_embeds_the_same_with_the_torch_backend(small_cohort, tmp_path):
    from gigassl.embed import embed_slides
    from gigassl.training.data import feature_files_in

    # fp32 throughout: the comparison is of the backends, not of bf16 (spconv has no bf16 kernels)
    result = run_training(_config(small_cohort, tmp_path / "run", epochs=2, sparse_backend="spconv", mixed_precision=False))
    assert load_checkpoint(result.checkpoint)["config"]["sparse_backend"] == "spconv"
    files = feature_files_in(small_cohort)
    embeddings = {}
    for backend in ("spconv", "torch"):
        model, _ = load_model(result.checkpoint, "cpu", sparse_backend=backend)
        assert model.sparse_backend == backend
        embeddings[backend] = embed_slides(model, files, n_views=4, n_tiles_per_view=3, seed=0, mixed_precision=False)[1]
    assert embeddings["torch"].shape == (6, 512)
    np.testing.assert_allclose(embeddings["torch"], embeddings["spconv"], rtol=1e-5, atol=1e-6)
    # and a run resumes on the other backend (the backend is not a learned setting)
    resumed = run_training(
        _config(
            small_cohort,
            tmp_path / "resumed",
            epochs=2,
            sparse_backend="torch",
            mixed_precision=False,
            resume=tmp_path / "run" / "checkpoints" / "epoch_0001.pt",
        )
    )
    final_spconv, final_torch = load_checkpoint(result.checkpoint), load_checkpoint(resumed.checkpoint)
    assert final_torch["global_step"] == final_spconv["global_step"] == 4
    for key, value in final_spconv["model"].items():
        if key in ("projector.0.bias", "projector.3.bias"):
            continue  # biases before batch norm: zero gradients up to rounding, which Adam amplifies
        torch.testing.assert_close(final_torch["model"][key], value, rtol=1e-3, atol=1e-4, msg=key)


def test_a_checkpoint_naming_an_unknown_backend_is_refused_in_one_line(small_cohort, tmp_path):
    result = run_training(_config(small_cohort, tmp_path / "run", epochs=1))
    payload = load_checkpoint(result.checkpoint)
    payload["config"]["sparse_backend"] = "minkowski"
    save_atomic(payload, tmp_path / "future.pt")  # resealed, as a newer gigassl would write it
    with pytest.raises(ValueError, match=r"future\.pt: the checkpoint names an unknown sparse backend 'minkowski'"):
        load_model(tmp_path / "future.pt")
    with pytest.raises(ValueError, match="--sparse-backend must be one of auto, torch, spconv"):
        run_training(_config(small_cohort, tmp_path / "bad", sparse_backend="minkowski"))


def test_a_scaler_less_checkpoint_resumes_with_a_scaler():
    # a run started on the CPU (no loss scaling) resumed on a GPU in fp16 (scaling): the saved
    # state of a disabled scaler is empty and must not be loaded into an enabled one
    saved = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    assert saved == {}
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    train_loop.restore_scaler(scaler, saved)
    assert scaler.is_enabled() and scaler.get_scale() == 1024.0
    enabled_state = torch.amp.GradScaler("cpu", init_scale=8.0).state_dict()
    train_loop.restore_scaler(scaler, enabled_state)
    assert scaler.get_scale() == 8.0
    # scaling only where part of the forward runs in fp16
    assert train_loop.needs_grad_scaling(torch.float16, "torch")
    assert not train_loop.needs_grad_scaling(torch.bfloat16, "torch")
    assert train_loop.needs_grad_scaling(torch.bfloat16, "spconv")
    assert not train_loop.needs_grad_scaling(None, "spconv")


def test_rng_state_restores_on_a_node_with_any_number_of_gpus():
    from gigassl.training.checkpoint import rng_state, set_rng_state

    state = rng_state()
    assert set(state) == {"torch"}  # no per-GPU states that a smaller node could not restore
    expected = torch.rand(3)
    set_rng_state(state)
    torch.testing.assert_close(torch.rand(3), expected)


# ---------------------------------------------------------------------------------------------
# stage 2 for any tile encoder


def test_resnet50_features_train_its_own_layer4_and_embed_to_2048_d(tmp_path):
    resnet, encoder = load_resnet("random:resnet50")
    features = tmp_path / "features"
    write_synthetic_cohort(features, n_slides=4, n_tiles=12, n_augmentations=2, bank_size=6, encoder=encoder)
    result = run_training(_config(features, tmp_path / "out", epochs=1, batch_size=2, monitor_slides=2))
    payload = load_checkpoint(result.checkpoint)
    assert result.global_step == 2
    assert payload["architecture"] == HeadSpec.for_resnet("resnet50").to_dict()
    assert (payload["init"]["arch"], payload["init"]["sha256"]) == ("resnet50", encoder.sha256)
    # two Adam steps from the encoder's own layer4 (bottleneck 1×1 conv3 of block 2 as a Linear)
    trained = payload["model"]["layer4.block2.conv3.weight"]
    dense = resnet.layer4[2].conv3.weight.detach()[:, :, 0, 0]
    assert not torch.equal(trained, dense)
    torch.testing.assert_close(trained, dense, atol=0.01, rtol=0)
    model, _ = load_model(result.checkpoint)
    assert (model.feature_dim, model.slide_dim) == (1024, 2048)
    run_embedding(EmbedConfig(model=result.checkpoint, features=features, out=tmp_path / "e.h5", n_views=2, device="cpu"))
    written = read_embeddings(tmp_path / "e.h5")
    assert written.embeddings.shape == (4, 2048) and np.isfinite(written.embeddings).all()
    np.testing.assert_allclose(np.linalg.norm(written.embeddings, axis=1), 1.0, rtol=1e-5)


def test_an_exported_program_runs_through_extract_train_and_embed(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for seed in range(3):
        write_tissue_slide(slides / f"slide_{seed}.tif", mpp=0.5, seed=seed)
    program = export_tile_encoder(tiny_model(), tmp_path / "fm.pt2", 32, MEAN, STD, name="tiny-fm")
    assert (
        cli.main(
            [
                "extract",
                "--slides",
                str(slides),
                "--out",
                str(tmp_path / "x"),
                "--encoder",
                str(program),
                "--tile-size-px",
                "64",
                "--target-mpp",
                "2.0",
                "--num-workers",
                "0",
                "--batch-size",
                "32",
                "--bank",
                "--n-augmentations",
                "2",
                "--n-tiles-per-augmentation",
                "8",
                "--no-mixed-precision",
            ]
        )
        == 0
    )
    features = tmp_path / "x" / "features"
    result = run_training(_config(features, tmp_path / "out", epochs=1))
    payload = load_checkpoint(result.checkpoint)
    assert payload["architecture"] == HeadSpec.generic(12).to_dict() and payload["init"] is None
    assert (payload["encoder"]["arch"], payload["encoder"]["width"]) == ("tiny-fm", 12)
    run_embedding(EmbedConfig(model=result.checkpoint, features=features, out=tmp_path / "e.h5", n_views=2, device="cpu"))
    written = read_embeddings(tmp_path / "e.h5")
    assert written.slide_ids == ["slide_0", "slide_1", "slide_2"] and written.embeddings.shape == (3, 512)
    assert written.provenance["encoder_sha256"] == file_sha256(program)
    assert json.loads(written.provenance["unverified"]) == []


def test_an_init_of_another_width_than_the_features_is_one_line(tmp_path):
    encoder = EncoderInfo("fm.pt2", "ef" * 32, "export", "some-vit", 12, "torch.export")
    features = tmp_path / "features"
    write_synthetic_cohort(features, n_slides=4, n_tiles=12, n_augmentations=2, bank_size=6, encoder=encoder)
    save_encoder_checkpoint(load_resnet18("random", seed=5)[0], tmp_path / "r18.pt")
    with pytest.raises(UserError) as error:
        run_training(_config(features, tmp_path / "a", epochs=1, init=str(tmp_path / "r18.pt")))
    message = str(error.value)
    assert "\n" not in message
    assert "--init " in message and "resnet18 layer4 takes 256-d tile features" in message and "are 12-d" in message


def test_a_run_resumes_in_another_precision(small_cohort, tmp_path):
    # a run started in fp32 (a CPU without bf16 units) goes on under autocast (a GPU node), and back
    run_training(_config(small_cohort, tmp_path / "run", epochs=2, mixed_precision=False))
    resumed = run_training(
        _config(
            small_cohort,
            tmp_path / "other",
            epochs=2,
            mixed_precision=True,
            resume=tmp_path / "run" / "checkpoints" / "epoch_0001.pt",
        )
    )
    assert load_checkpoint(resumed.checkpoint)["global_step"] == 4
