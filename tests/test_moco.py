import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from extract.augment import TileAugmentation
from extract.checkpoints.moco import CHECKPOINT_VERSION, load_training_checkpoint
from extract.checkpoints.sealed import CheckpointIntegrityError, save_atomic
from extract.config import MOCO_PROFILES, MocoConfig
from extract.encoders.tile_encoder import load_resnet18
from extract.errors import UserError
from extract.moco import monitors as moco_monitors
from extract.moco.data import EpochTileBatches, epoch_plan, fixed_tiles, index_slides
from extract.moco.model import KeyQueue, MoCo, info_nce_logits, info_nce_loss, momentum_update
from extract.moco.pretrain import make_views, run_pretraining, train_step
from extract.monitors import alignment, rankme, uniformity

SLIDE = "CMU-1-Small-Region.svs"
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- queue, momentum, loss


def test_queue_wraps_around_with_known_keys():
    queue = KeyQueue(size=5, dim=2)
    first = torch.tensor([[1.0, 0], [2, 0], [3, 0]])
    queue.enqueue(first)
    assert int(queue.ptr) == 3
    assert torch.equal(queue.keys[:3], first)
    queue.enqueue(torch.tensor([[4.0, 0], [5, 0], [6, 0]]))
    # rows 3, 4 take keys 4, 5; key 6 wraps to row 0; the oldest left is key 2 in row 1
    assert torch.equal(queue.keys[:, 0], torch.tensor([6.0, 2, 3, 4, 5]))
    assert int(queue.ptr) == 1


def test_queue_keeps_the_newest_when_the_batch_exceeds_it():
    queue = KeyQueue(size=3, dim=1)
    queue.enqueue(torch.tensor([[1.0]]))
    queue.enqueue(torch.arange(10.0, 15.0).view(5, 1))  # 5 keys into 3 rows, pointer at 1
    assert sorted(queue.keys.flatten().tolist()) == [12.0, 13.0, 14.0]
    assert int(queue.ptr) == 1


def test_queue_starts_normalised():
    queue = KeyQueue(size=7, dim=4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(queue.keys.norm(dim=1), torch.ones(7))


def test_momentum_update_hand_checked():
    key, query = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1)), nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        key[0].weight.copy_(torch.tensor([[1.0, 3.0]]))
        key[0].bias.fill_(2.0)
        query[0].weight.copy_(torch.tensor([[3.0, -1.0]]))
        query[0].bias.fill_(0.0)
        query[1].running_mean.fill_(9.0)
    momentum_update(key, query, 0.5)
    assert torch.equal(key[0].weight, torch.tensor([[2.0, 1.0]]))
    assert torch.equal(key[0].bias, torch.tensor([1.0]))
    assert key[1].running_mean.item() == 0.0  # buffers are not averaged
    momentum_update(key, query, 0.75)
    assert torch.equal(key[0].weight, torch.tensor([[2.25, 0.5]]))


def test_info_nce_analytic_value():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    queue = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    logits = info_nce_logits(q, q, queue, temperature=0.5)
    assert logits.shape == (2, 4)
    assert torch.allclose(logits[0], torch.tensor([2.0, 0.0, 2.0, -2.0]))
    row0 = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(2) + math.exp(-2)))
    row1 = -math.log(math.exp(2) / (math.exp(2) + math.exp(2) + 1 + 1))  # logits [2, 2, 0, 0]
    expected = (row0 + row1) / 2
    assert info_nce_loss(q, q, queue, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_monitors_analytic():
    features = torch.zeros(100, 20)
    features[torch.arange(100), torch.arange(100) % 4] = 1.0  # 4 equal singular values
    assert rankme(features) == pytest.approx(4.0, rel=1e-4)
    z = torch.nn.functional.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    assert alignment(z, z) == 0.0
    assert uniformity(z) < uniformity(z[:1].repeat(50, 1) + 1e-3 * z)  # spread beats collapsed


# ----------------------------------------------------------------------------- config


def test_small_cpu_profile_replaces_defaults_only():
    config = MocoConfig(slides="s", out="o", profile="small-cpu", batch_size=32)
    profile = MOCO_PROFILES["small-cpu"]
    assert config.tile_size_px == profile["tile_size_px"] and config.queue_size == profile["queue_size"]
    assert config.batch_size == 32  # an explicit value wins
    assert MocoConfig(slides="s", out="o").tile_size_px == 224
    moved = dataclasses.replace(config, out="p")  # the filled values survive a replace
    assert (moved.tile_size_px, moved.batch_size, moved.momentum) == (96, 32, profile["momentum"])
    with pytest.raises(ValueError, match="profile"):
        MocoConfig(slides="s", out="o", profile="tiny")
    with pytest.raises(ValueError, match="momentum"):
        MocoConfig(slides="s", out="o", momentum=1.0)


def test_explicit_value_equal_to_the_default_profile_wins_over_small_cpu(monkeypatch):
    """``--profile small-cpu --momentum 0.999`` must train at 0.999 (the ablation docs/benchmarks.md runs)."""
    from gigassl.cli import build_parser, config_from_args

    assert MocoConfig(slides="s", out="o", profile="small-cpu", momentum=0.999, epochs=200).momentum == 0.999
    argv = ["pretrain-tiles", "--slides", "s", "--out", "o", "--profile", "small-cpu", "--momentum", "0.999"]
    config = config_from_args(MocoConfig, build_parser().parse_args(argv))
    assert (config.momentum, config.queue_size) == (0.999, MOCO_PROFILES["small-cpu"]["queue_size"])
    monkeypatch.setenv("COLUMNS", "400")  # one line per flag in the help
    help_text = build_parser()._subparsers._group_actions[0].choices["pretrain-tiles"].format_help()
    assert "default: 0.999; small-cpu: 0.99" in " ".join(help_text.split())


# ----------------------------------------------------------------------------- data on the real slide


@pytest.fixture(scope="module")
def slide_tiles(slides_dir):
    slides, skipped = index_slides([slides_dir / SLIDE], target_mpp=1.0, tile_size_px=32, tissue_threshold=0.5, progress=False)
    assert not skipped and len(slides) == 1 and len(slides[0]) > 50
    return slides


def test_epoch_plan_is_seeded_and_balanced():
    plan = epoch_plan([10, 1000], n_tiles=4000, tiles_per_visit=4, seed=3, epoch=1)
    assert plan.shape == (4000, 2) and plan.dtype == np.int64
    assert np.array_equal(plan, epoch_plan([10, 1000], 4000, 4, seed=3, epoch=1))
    assert not np.array_equal(plan, epoch_plan([10, 1000], 4000, 4, seed=3, epoch=2))
    share = (plan[:, 0] == 0).mean()
    assert 0.4 < share < 0.6  # slides drawn uniformly, not by size
    assert plan[plan[:, 0] == 0, 1].max() < 10
    runs = plan[:, 0].reshape(-1, 4)
    assert (runs == runs[:, :1]).all()  # 4 tiles of one slide in a row


def test_batches_do_not_depend_on_workers_or_ranks(slide_tiles):
    plan = epoch_plan([len(s) for s in slide_tiles], 24, 4, seed=0, epoch=0)
    single = list(torch.utils.data.DataLoader(EpochTileBatches(slide_tiles, plan, 8, 32), batch_size=None))
    workers = list(torch.utils.data.DataLoader(EpochTileBatches(slide_tiles, plan, 8, 32), batch_size=None, num_workers=2))
    assert len(single) == 3 and single[0].shape == (8, 3, 32, 32) and single[0].dtype == torch.uint8
    assert all(torch.equal(a, b) for a, b in zip(single, workers))
    halves = [list(EpochTileBatches(slide_tiles, plan, 8, 32, rank=r, world_size=2)) for r in (0, 1)]
    assert all(torch.equal(torch.cat([a, b]), whole) for a, b, whole in zip(*halves, single))
    assert single[0].float().std() > 5  # real tissue, not blank


def test_representation_monitors_build_no_autograd_graph(slide_tiles, monkeypatch):
    seen: list[torch.Tensor] = []
    original = moco_monitors.uniformity

    def recording_uniformity(z: torch.Tensor) -> float:
        seen.append(z)
        return original(z)

    monkeypatch.setattr(moco_monitors, "uniformity", recording_uniformity)
    model = MoCo(queue_size=8, seed=0)
    tiles = fixed_tiles(slide_tiles, 8, 32, seed=0)
    row = moco_monitors.representation_monitors(model.encoder_q, tiles, TileAugmentation(), CPU, False, 0, 0.2)
    assert math.isfinite(row["alignment"]) and math.isfinite(row["fresh_infonce"])
    assert seen and not seen[0].requires_grad and seen[0].grad_fn is None  # read-only: no graph kept


def test_few_steps_on_real_tiles_lower_the_loss(slide_tiles):
    torch.manual_seed(0)
    tiles = fixed_tiles(slide_tiles, 16, 32, seed=0)
    view_q, view_k = make_views(tiles, TileAugmentation(), torch.Generator().manual_seed(0), CPU)
    model = MoCo(queue_size=48, seed=0)
    reference_queue = model.queue.keys.clone()
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.05, momentum=0.9)

    def loss_now() -> float:
        with torch.no_grad():
            return info_nce_loss(model.query(view_q), model.keys(view_k)[0], reference_queue, 0.2).item()

    before = loss_now()
    for _ in range(4):
        result = train_step(model, view_q, view_k, optimizer, momentum=0.9, temperature=0.2, device=CPU, mixed_precision=False)
        assert math.isfinite(result.loss)
    assert loss_now() < before - 0.1
    assert int(model.queue.ptr) == (4 * 16) % 48


# ----------------------------------------------------------------------------- the job: checkpoints, resume, loaders


def _tiny_config(slides_dir, out, **changes):
    settings = dict(
        slides=slides_dir,
        out=out,
        target_mpp=1.0,
        tile_size_px=32,
        batch_size=8,
        queue_size=12,
        tiles_per_epoch=16,
        tiles_per_visit=4,
        epochs=2,
        monitor_tiles=8,
        num_workers=0,
        checkpoint_every=1,
        device="cpu",
        lr=0.1,
    )
    settings.update(changes)
    return MocoConfig(**settings)


@pytest.fixture(scope="module")
def trained(slides_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    (folder / SLIDE).symlink_to(slides_dir / SLIDE)
    out = tmp_path_factory.mktemp("moco")
    result = run_pretraining(_tiny_config(folder, out))
    return folder, out, result


def test_run_writes_checkpoints_and_monitors(trained):
    _, out, result = trained
    assert result.exit_code == 0 and result.epochs_done == 2 and result.n_slides == 1
    assert f"2 epochs on 1 slides → encoder {result.encoder_path}" in result.format()
    raw = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert raw["epoch"] == 2 and raw["step"] == 4 and raw["config"]["tile_size_px"] == 32
    assert raw["state_dict"]["queue.keys"].shape == (12, 128)
    assert int(raw["state_dict"]["queue.ptr"]) == (4 * 8) % 12
    assert {"optimizer", "rng", "monitors"} <= set(raw)
    assert (out / "checkpoints" / "epoch_0001.pt").is_file()
    lines = (out / "monitors.csv").read_text().splitlines()
    assert len(lines) == 3 and "rankme_tile256" in lines[0] and "uniformity" in lines[0]
    assert all(math.isfinite(row["rankme_tile256"]) and row["rankme_tile256"] >= 1 for row in result.monitors)


def test_resume_checks_the_settings_against_the_checkpoint(trained, tmp_path):
    folder, out, _ = trained
    assert load_training_checkpoint(out / "last.pt", _tiny_config(folder, tmp_path))["epoch"] == 2
    with pytest.raises(UserError, match=r"--tile-size-px 32 \(checkpoint\) vs 64"):
        load_training_checkpoint(out / "last.pt", _tiny_config(folder, tmp_path, tile_size_px=64))


def test_a_checkpoint_of_an_older_version_is_refused_in_one_line(trained, tmp_path):
    folder, out, _ = trained
    raw = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert raw["format_version"] == CHECKPOINT_VERSION == 2
    raw["format_version"] = 1  # sealed, but of the version that read settings under their old names
    save_atomic(raw, tmp_path / "old.pt")
    with pytest.raises(UserError, match=r"version 1 .*run `gigassl pretrain-tiles` again") as refused:
        load_training_checkpoint(tmp_path / "old.pt", _tiny_config(folder, tmp_path))
    assert "\n" not in str(refused.value) and str(tmp_path / "old.pt") in str(refused.value)


def test_an_unsealed_checkpoint_is_refused_in_one_line(trained, tmp_path):
    folder, out, _ = trained
    raw = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    raw.pop("content_sha256")  # as versions before the seal wrote it, or another tool would
    torch.save(raw, tmp_path / "unsealed.pt")
    with pytest.raises(CheckpointIntegrityError, match="no content hash.*train again") as refused:
        load_training_checkpoint(tmp_path / "unsealed.pt", _tiny_config(folder, tmp_path))
    assert "\n" not in str(refused.value) and "unsealed.pt" in str(refused.value)


def test_a_checkpoint_with_the_former_setting_names_is_refused(trained, tmp_path):
    folder, out, _ = trained
    raw = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    config = raw["config"]  # the settings' names before they carried their units are not read
    config["mpp"], config["tile_size"] = config.pop("target_mpp"), config.pop("tile_size_px")
    save_atomic(raw, tmp_path / "renamed.pt")
    with pytest.raises(UserError, match=r"--target-mpp None \(checkpoint\) vs 1.0; --tile-size-px None \(checkpoint\) vs 32"):
        load_training_checkpoint(tmp_path / "renamed.pt", _tiny_config(folder, tmp_path))


@pytest.mark.slow
def test_resume_is_exact(trained, tmp_path):
    folder, out, _ = trained
    resumed = run_pretraining(_tiny_config(folder, tmp_path, resume=out / "checkpoints" / "epoch_0001.pt"))
    straight = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    again = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, again["state_dict"][key]), key
    assert [m["loss"] for m in resumed.monitors] == [m["loss"] for m in straight["monitors"]]
    with pytest.raises(ValueError, match="batch-size"):
        run_pretraining(_tiny_config(folder, tmp_path / "x", batch_size=4, resume=out / "last.pt"))


def test_written_checkpoints_load_as_tile_encoders(trained, tmp_path):
    _, out, _ = trained
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["state_dict"]
    expected = state["encoder_q.layer4.1.conv2.weight"]
    encoder, info = load_resnet18(out / "encoder.pt")  # the package's own layout, strict
    assert info.source == "gigassl" and torch.equal(encoder.layer4[1].conv2.weight, expected)
    from_training, info = load_resnet18(out / "last.pt")  # the training checkpoint as it is
    assert info.source == "moco" and torch.equal(from_training.layer4[1].conv2.weight, expected)
    original_layout = {"epoch": 2, "arch": "resnet18", "state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(original_layout, tmp_path / "checkpoint_0001.pth.tar")
    from_moco_repo, info = load_resnet18(tmp_path / "checkpoint_0001.pth.tar")
    assert info.source == "moco"
    for key, value in from_moco_repo.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, encoder.state_dict()[key]), key


def test_only_the_newest_checkpoints_are_kept(trained, tmp_path):
    folder, _, _ = trained
    out = tmp_path / "kept"
    run_pretraining(_tiny_config(folder, out, epochs=3, keep_checkpoints=1))
    assert [p.name for p in (out / "checkpoints").glob("epoch_*.pt")] == ["epoch_0003.pt"]
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=True)["epoch"] == 3
    with pytest.raises(ValueError, match="keep-checkpoints"):
        _tiny_config(folder, out, keep_checkpoints=0)


@pytest.mark.slow
def test_two_processes_under_torchrun_share_one_queue(trained, tmp_path):
    """gloo DDP with shuffle-BN through the real command line; the queue holds both ranks' keys."""
    import os
    import subprocess
    import sys

    folder, _, _ = trained
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "gigassl.cli",
        "pretrain-tiles",
        "--slides",
        str(folder),
        "--out",
        str(out),
        "--target-mpp",
        "1.0",
        "--tile-size-px",
        "32",
        "--batch-size",
        "8",
        "--queue-size",
        "12",
        "--tiles-per-epoch",
        "16",
        "--tiles-per-visit",
        "4",
        "--epochs",
        "1",
        "--monitor-tiles",
        "8",
        "--num-workers",
        "0",
        "--device",
        "cpu",
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert finished.returncode == 0, finished.stderr[-3000:]
    raw = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert len(raw["rng"]["augment"]) == 2
    assert not torch.equal(raw["rng"]["augment"][0], raw["rng"]["augment"][1])  # ranks draw different views
    assert int(raw["state_dict"]["queue.ptr"]) == (2 * 8) % 12  # 2 steps of the global batch of 8
    encoder, _ = load_resnet18(out / "encoder.pt")
    assert torch.isfinite(encoder.layer4[0].conv1.weight).all()


# ----------------------------------------------------------------------------- --arch


@pytest.mark.parametrize(("arch", "width"), [("resnet34", 512), ("resnet50", 2048)])
def test_one_step_of_each_arch_and_its_encoder_loads(arch, width, tmp_path):
    from extract.checkpoints.moco import encoder_resnet, save_encoder
    from extract.encoders.kinds import load_encoder

    torch.manual_seed(0)
    tiles = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    view_q, view_k = make_views(tiles, TileAugmentation(), torch.Generator().manual_seed(0), CPU)
    model = MoCo(queue_size=8, seed=0, arch=arch)
    assert model.encoder_q.fc[0].in_features == width and model.encoder_q.fc[2].out_features == 128
    before = model.encoder_q.layer3[0].conv1.weight.detach().clone()
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.05, momentum=0.9)
    result = train_step(model, view_q, view_k, optimizer, momentum=0.9, temperature=0.2, device=CPU, mixed_precision=False)
    assert math.isfinite(result.loss) and not torch.equal(before, model.encoder_q.layer3[0].conv1.weight)
    assert encoder_resnet(model).arch == arch
    save_encoder(model, tmp_path / "encoder.pt", MocoConfig(slides=tmp_path, out=tmp_path, arch=arch), epoch=1)
    loaded = load_encoder(tmp_path / "encoder.pt")
    assert (loaded.info.arch, loaded.info.source, loaded.layer4_width) == (arch, "gigassl", width)
    assert torch.equal(loaded.layer4[0].conv1.weight, model.encoder_q.layer4[0].conv1.weight)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "last.pt")  # the training checkpoint's layout
    assert load_encoder(tmp_path / "last.pt").info.source == "moco"


def test_pretrain_tiles_arch_resnet50_writes_a_resnet50_encoder(trained, tmp_path):
    from extract.encoders.kinds import load_encoder

    folder, out, _ = trained
    result = run_pretraining(_tiny_config(folder, tmp_path / "r50", arch="resnet50", epochs=1, monitor_tiles=0))
    assert result.epochs_done == 1
    loaded = load_encoder(result.encoder_path)
    assert (loaded.info.arch, loaded.feature_dim) == ("resnet50", 1024)
    assert torch.load(result.checkpoint_path, map_location="cpu", weights_only=True)["arch"] == "resnet50"
    with pytest.raises(ValueError, match=r"--arch resnet18 \(checkpoint\) vs resnet34"):
        run_pretraining(_tiny_config(folder, tmp_path / "x", arch="resnet34", resume=out / "last.pt"))
    with pytest.raises(ValueError, match="--arch 'vit': choose one of resnet18, resnet34, resnet50"):
        _tiny_config(folder, tmp_path, arch="vit")
