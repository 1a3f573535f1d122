"""The CUDA code paths, on a GPU. Marked ``cuda``: deselected (and counted) on machines without one,
run by ``scripts/gpu_check.sh``. Each compares the GPU with the CPU where the two should agree."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from extract.encoders.tile_encoder import ResNet18
from gigassl.model import GigaSSLModel, SparseLayer4
from gigassl.sparse.conv import make_sparse_tensor
from gigassl.sparse.maps import collate_views
from test_model import _dense_layer4_with_average_shortcut, _full_map, _randomise_batch_norms

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def resnet() -> ResNet18:
    torch.manual_seed(0)
    model = ResNet18()
    _randomise_batch_norms(model, torch.Generator().manual_seed(0))
    return model.eval()


def _tensor(views, device):
    batch = collate_views(views).to(device)
    return make_sparse_tensor(batch.features, batch.indices, batch.spatial_shape, batch.batch_size, "torch")


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_torch_backend_equals_the_dense_layer4_on_cuda(resnet: ResNet18, dtype) -> None:
    layer4 = SparseLayer4("torch").load_dense(resnet.layer4).eval().to(CUDA)
    reference = _dense_layer4_with_average_shortcut(resnet.layer4).eval()
    dense, views = _full_map(7, 5, 256, n_maps=2, seed=3)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        sparse = layer4(_tensor(views, CUDA)).dense().float().cpu()
    expected = reference(dense)
    out_h, out_w = expected.shape[2:]
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype is None else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(sparse[:, :, :out_h, :out_w], expected, **tolerance)


def test_a_model_built_on_the_cpu_runs_on_the_gpu_and_back(resnet: ResNet18) -> None:
    model = GigaSSLModel(resnet, device="cpu").eval()
    rng = np.random.default_rng(0)
    batch = collate_views([(rng.standard_normal((5, 256)).astype(np.float32), rng.integers(0, 9, (5, 2))) for _ in range(8)])
    with torch.no_grad():
        on_cpu = model.pool(batch)
        on_gpu = model.to(CUDA).pool(batch).cpu()
        back = model.to("cpu").pool(batch)
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(back, on_cpu)


def test_one_mixed_precision_training_run_then_cpu_resume(tmp_path: Path) -> None:
    from gigassl.config import TrainConfig
    from gigassl.synthetic.cohort import write_synthetic_cohort
    from gigassl.train import run_training
    from gigassl.training.checkpoint import load_checkpoint

    features = tmp_path / "features"
    write_synthetic_cohort(features, n_slides=8, n_tiles=24, n_augmentations=3, bank_size=10, seed=2)
    settings = dict(features=features, n_tiles_per_view=3, batch_size=4, warmup_epochs=1, monitor_slides=4, checkpoint_every=1)
    first = run_training(TrainConfig(out=tmp_path / "cpu", epochs=2, device="cpu", mixed_precision=False, **settings))
    # a run started on the CPU (no loss scaling) resumed on the GPU under autocast
    resumed = run_training(
        TrainConfig(
            out=tmp_path / "gpu", epochs=2, device="cuda", resume=tmp_path / "cpu" / "checkpoints" / "epoch_0001.pt", **settings
        )
    )
    checkpoint = load_checkpoint(resumed.checkpoint)
    assert checkpoint["global_step"] == load_checkpoint(first.checkpoint)["global_step"]
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    assert math.isfinite(checkpoint["history"][-1]["train_loss"])


def test_extraction_on_cuda_with_pinned_memory_matches_the_cpu(slides_dir: Path, tmp_path: Path) -> None:
    from extract.config import ExtractConfig
    from extract.features.slide_file import SlideFeatures
    from extract.run import run_extraction

    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "CMU-1-Small-Region.svs").symlink_to(slides_dir / "CMU-1-Small-Region.svs")
    outputs = {}
    for device in ("cpu", "cuda"):
        config = ExtractConfig(
            slides=folder,
            out=tmp_path / device,
            encoder="random",
            device=device,
            mixed_precision=False,
            n_augmentations=2,
            n_tiles_per_augmentation=8,
            num_workers=1,
            strict=True,
        )
        summary = run_extraction(config)
        assert summary.exit_code == 0
        with SlideFeatures(tmp_path / device / "features" / "CMU-1-Small-Region.h5") as slide:
            outputs[device] = slide.features()
    assert len(outputs["cuda"]) > 0
    np.testing.assert_allclose(outputs["cuda"], outputs["cpu"], rtol=1e-3, atol=1e-3)


def test_embedding_on_cuda_matches_the_cpu(tmp_path: Path) -> None:
    from gigassl.embed import embed_slides
    from gigassl.synthetic.cohort import write_synthetic_cohort

    paths = write_synthetic_cohort(tmp_path, n_slides=6, n_tiles=40, n_augmentations=1, bank_size=4)
    torch.manual_seed(0)
    model = GigaSSLModel(None).eval()
    _, on_cpu = embed_slides(model, paths, 10, 5, 0, device="cpu", mixed_precision=False)
    _, on_gpu = embed_slides(model, paths, 10, 5, 0, device="cuda", mixed_precision=False)
    _, mixed = embed_slides(model, paths, 10, 5, 0, device="cuda", mixed_precision=True)
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-4, atol=1e-5)
    assert np.min(np.sum(mixed * on_cpu, axis=1)) > 0.999  # cosine of unit vectors


def test_one_moco_step_on_cuda() -> None:
    from extract.augment import TileAugmentation
    from extract.moco.model import MoCo
    from extract.moco.pretrain import make_views, train_step

    torch.manual_seed(0)
    tiles = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)
    view_q, view_k = make_views(tiles, TileAugmentation(), torch.Generator().manual_seed(0), CUDA)
    assert view_q.device.type == "cuda"
    model = MoCo(queue_size=16, seed=0).to(CUDA)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    result = train_step(
        model, view_q, view_k, optimizer, momentum=0.99, temperature=0.2, device=CUDA, mixed_precision=True, scaler=scaler
    )
    assert math.isfinite(result.loss)
