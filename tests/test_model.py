"""Sparse layer4 against dense references, and the Giga-SSL model on the CPU.

The padding semantics checked here (see ``gigassl.model``'s docstring):

- a submanifold 3×3 conv on a fully active map = ``F.conv2d(padding=1)``; block 1 of the sparse
  layer4 = the dense ``layer4[1]`` module itself;
- the strided sparse conv = ``F.conv2d(stride=2, padding=0)``; on a map placed one cell from the
  origin (``collate_views``' margin) it is the dense ``layer4[0].conv1`` (stride 2, padding 1);
- the ÷9 shortcut pool = ``F.avg_pool2d(3, 2)`` on the zero-filled map (inactive cells count);
- the whole sparse layer4 on a fully active map of odd sides = the dense layer4 whose shortcut
  stride is replaced by ``AvgPool2d(3, 2, padding=1, count_include_pad=True)``; on an even side
  the sparse conv keeps one more row of windows than the dense one (which hangs past the padding).
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from extract.encoders.tile_encoder import ResNet18, build_resnet
from gigassl.model import GigaSSLModel, HeadSpec, SparseLayer4
from gigassl.sparse.conv import (
    dense_to_sparse_weight,
    make_sparse_tensor,
    strided_conv3x3,
    submanifold_conv3x3,
    sum_pool_3x3_stride2,
)
from gigassl.sparse.layer4 import dense_layer4
from gigassl.sparse.maps import SparseBatch, collate_views

TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(params=["torch", pytest.param("spconv", marks=pytest.mark.spconv)])
def backend(request) -> str:
    """Every test taking this runs on both sparse backends (spconv where installed)."""
    return request.param


def to_tensor(batch: SparseBatch, backend: str):
    return make_sparse_tensor(batch.features, batch.indices, batch.spatial_shape, batch.batch_size, backend)


def _randomise_batch_norms(module: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BN statistics and affine terms, so that a mix-up of BN layers shows."""
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            n = bn.num_features
            bn.weight.data = 0.5 + torch.rand(n, generator=generator)
            bn.bias.data = 0.2 * torch.randn(n, generator=generator)
            bn.running_mean = 0.2 * torch.randn(n, generator=generator)
            bn.running_var = 0.5 + torch.rand(n, generator=generator)


@pytest.fixture(scope="module")
def resnet() -> ResNet18:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ResNet18()
    _randomise_batch_norms(model, generator)
    return model.eval()


def _full_map(height: int, width: int, channels: int, n_maps: int = 1, seed: int = 0):
    """Every cell of an H×W grid active: (dense (n, C, H, W), list of (features, cells) views)."""
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(n_maps, channels, height, width, generator=generator)
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    cells = np.stack([xs.ravel(), ys.ravel()], axis=1)  # (x, y)
    views = [(dense[i, :, cells[:, 1], cells[:, 0]].T.numpy(), cells) for i in range(n_maps)]
    return dense, views


def _sparse_from_dense(dense: torch.Tensor, backend: str):
    """A fully active sparse tensor with cell (y, x) at index (b, y, x): no margin, any shape."""
    n, c, h, w = dense.shape
    b, y, x = torch.meshgrid(torch.arange(n), torch.arange(h), torch.arange(w), indexing="ij")
    indices = torch.stack([b.ravel(), y.ravel(), x.ravel()], 1).int()
    return make_sparse_tensor(dense.permute(0, 2, 3, 1).reshape(-1, c), indices, [h, w], n, backend)


def test_weight_conversion_is_a_permutation() -> None:
    weight = torch.randn(5, 4, 3, 3)
    converted = dense_to_sparse_weight(weight)
    assert converted.shape == (5, 3, 3, 4)
    assert converted[2, 0, 1, 3] == weight[2, 3, 0, 1]


@pytest.mark.parametrize("height, width", [(6, 7), (5, 5)])
def test_submanifold_conv_on_full_map_is_dense_conv_with_padding_1(height: int, width: int, backend: str) -> None:
    dense, _ = _full_map(height, width, 8)
    weight = torch.randn(6, 8, 3, 3)
    conv = submanifold_conv3x3(8, 6, backend)
    conv.weight.data = dense_to_sparse_weight(weight)
    torch.testing.assert_close(conv(_sparse_from_dense(dense, backend)).dense(), F.conv2d(dense, weight, padding=1), **TOL)


@pytest.mark.parametrize("height, width", [(6, 7), (5, 8)])
def test_strided_sparse_conv_is_unpadded_dense_conv_and_with_margin_the_padded_one(
    resnet: ResNet18,
    height: int,
    width: int,
    backend: str,
) -> None:
    layer4 = SparseLayer4(backend).load_dense(resnet.layer4)
    weight = resnet.layer4[0].conv1.weight
    dense, views = _full_map(height, width, 256)
    # without margin: no padding
    unpadded = layer4.block0.conv1(_sparse_from_dense(dense, backend)).dense()
    torch.testing.assert_close(unpadded, F.conv2d(dense, weight, stride=2, padding=0), **TOL)
    # with collate's one-cell margin: the inactive cells are the dense conv's zero padding
    sparse = layer4.block0.conv1(to_tensor(collate_views(views), backend)).dense()
    expected = resnet.layer4[0].conv1(dense)  # stride 2, padding 1
    out_h, out_w = expected.shape[2:]
    torch.testing.assert_close(sparse[:, :, :out_h, :out_w], expected, **TOL)
    # beyond the dense output, only the windows that hang past an even side's padding
    assert sparse.shape[2] >= out_h + (height % 2 == 0) and sparse.shape[3] >= out_w + (width % 2 == 0)
    assert sparse[:, :, out_h + (height % 2 == 0) :].abs().sum() == 0
    assert sparse[:, :, :, out_w + (width % 2 == 0) :].abs().sum() == 0


def test_shortcut_pool_divides_by_nine_like_dense_avg_pool(backend: str) -> None:
    generator = torch.Generator().manual_seed(1)
    dense = torch.randn(2, 4, 9, 7, generator=generator)
    dense[:, :, ::3, 1::2] = 0.0  # inactive cells (zero in the dense map)
    dense[1, :, 4:, :] = 0.0
    active = dense.abs().sum(1) > 0  # (B, H, W)
    b, y, x = active.nonzero(as_tuple=True)
    indices = torch.stack([b, y, x], 1).int()
    features = dense[b, :, y, x]
    x_in = make_sparse_tensor(features, indices, [9, 7], 2, backend)
    out = strided_conv3x3(4, 1, backend)(x_in)
    pooled = sum_pool_3x3_stride2(x_in, out) / 9
    expected = F.avg_pool2d(dense, 3, 2)  # padding 0: always ÷9
    ob, oy, ox = out.indices.long().unbind(1)
    torch.testing.assert_close(pooled, expected[ob, :, oy, ox], **TOL)
    # every output site with a non-zero dense average is one of the sparse output sites
    assert (expected.abs().sum(1) > 0).sum().item() <= len(out.indices)


def test_sparse_block1_is_the_dense_block1_module(resnet: ResNet18, backend: str) -> None:
    layer4 = SparseLayer4(backend).load_dense(resnet.layer4).eval()
    dense, _ = _full_map(5, 6, 512, n_maps=2)
    out = layer4.block1(_sparse_from_dense(dense, backend))
    with torch.no_grad():
        torch.testing.assert_close(out.dense(), resnet.layer4[1](dense), **TOL)


def _dense_layer4_with_average_shortcut(layer4: nn.Sequential) -> nn.Sequential:
    """The dense layer4 whose shortcut averages 3×3 (÷9, zero padding 1) before a stride-1 1×1 conv."""
    dense = copy.deepcopy(layer4)
    conv, bn = dense[0].downsample
    conv.stride = (1, 1)
    dense[0].downsample = nn.Sequential(nn.AvgPool2d(3, 2, padding=1, count_include_pad=True), conv, bn)
    return dense


@pytest.mark.parametrize("height, width", [(5, 7), (7, 3)])
def test_sparse_layer4_equals_dense_layer4_with_average_shortcut_on_full_map(
    resnet: ResNet18,
    height: int,
    width: int,
    backend: str,
) -> None:
    layer4 = SparseLayer4(backend).load_dense(resnet.layer4).eval()
    dense_reference = _dense_layer4_with_average_shortcut(resnet.layer4).eval()
    dense, views = _full_map(height, width, 256, n_maps=2, seed=3)
    with torch.no_grad():
        sparse = layer4(to_tensor(collate_views(views), backend)).dense()
        expected = dense_reference(dense)
        out_h, out_w = expected.shape[2:]
        assert sparse[:, :, out_h:].abs().sum() == 0 and sparse[:, :, :, out_w:].abs().sum() == 0
        sparse = sparse[:, :, :out_h, :out_w]
        torch.testing.assert_close(sparse, expected, **TOL)
        # and it is not the plain dense layer4: the shortcuts differ
        assert not torch.allclose(sparse, resnet.layer4(dense), **TOL)


def test_training_mode_batch_norm_matches_dense_on_full_maps(resnet: ResNet18, backend: str) -> None:
    layer4 = SparseLayer4(backend).load_dense(resnet.layer4).train()
    dense_reference = _dense_layer4_with_average_shortcut(resnet.layer4).train()
    dense, views = _full_map(5, 5, 256, n_maps=3, seed=4)
    sparse = layer4(to_tensor(collate_views(views), backend)).dense()[:, :, :3, :3]
    torch.testing.assert_close(sparse, dense_reference(dense), **TOL)


def test_pool_is_the_mean_over_active_sites_and_maps_do_not_mix(resnet: ResNet18, backend: str) -> None:
    model = GigaSSLModel(resnet, device="cpu", sparse_backend=backend).eval()
    rng = np.random.default_rng(0)
    views = [(rng.standard_normal((t, 256)).astype(np.float32), rng.integers(0, 12, size=(t, 2))) for t in (1, 5, 9)]
    with torch.no_grad():
        batch = collate_views(views)
        pooled = model.pool(batch)
        out = model.layer4(to_tensor(batch, backend))
        for i, view in enumerate(views):
            on_map = out.indices[:, 0] == i
            torch.testing.assert_close(pooled[i], out.features[on_map].mean(0), **TOL)
            torch.testing.assert_close(pooled[i : i + 1], model.pool(collate_views([view])), **TOL)


def test_model_shapes_no_nans_and_gradients_reach_every_parameter(backend: str) -> None:
    torch.manual_seed(0)
    model = GigaSSLModel(None, projector_dim=64, device="cpu", sparse_backend=backend).train()
    rng = np.random.default_rng(1)
    views = [(rng.standard_normal((5, 256)).astype(np.float32), rng.integers(0, 40, size=(5, 2))) for _ in range(6)]
    batch = collate_views(views)
    features = batch.features.clone().requires_grad_(True)
    tensor = make_sparse_tensor(features, batch.indices, batch.spatial_shape, batch.batch_size, backend)
    z = model(tensor)
    assert z.shape == (6, 64) and torch.isfinite(z).all()
    assert model.pool(batch).shape == (6, 512)
    z.square().sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_state_dict_is_plain_tensors_and_round_trips_weights_only(resnet: ResNet18) -> None:
    model = GigaSSLModel(resnet, device="cpu").eval()
    state = model.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    torch.manual_seed(5)
    restored = GigaSSLModel(None, device="cpu").eval()
    restored.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    rng = np.random.default_rng(2)
    batch = collate_views([(rng.standard_normal((5, 256)).astype(np.float32), rng.integers(0, 9, size=(5, 2))) for _ in range(3)])
    with torch.no_grad():
        torch.testing.assert_close(restored(batch), model(batch))


def test_layer4_initialisation_copies_the_dense_weights(resnet: ResNet18) -> None:
    model = GigaSSLModel(resnet, device="cpu")
    torch.testing.assert_close(model.layer4.block1.conv2.weight, dense_to_sparse_weight(resnet.layer4[1].conv2.weight))
    torch.testing.assert_close(model.layer4.block0.shortcut_bn.running_var, resnet.layer4[0].downsample[1].running_var)
    with pytest.raises(ValueError, match="layer4"):
        SparseLayer4().load_dense(resnet.layer3)


def test_runs_under_cpu_autocast_close_to_fp32(resnet: ResNet18, backend: str) -> None:
    # torch: the products in bf16, sums in fp32; spconv (no bf16 kernels): the sparse convs in fp32
    model = GigaSSLModel(resnet, device="cpu", sparse_backend=backend).eval()
    rng = np.random.default_rng(3)
    batch = collate_views([(rng.standard_normal((5, 256)).astype(np.float32), rng.integers(0, 9, size=(5, 2))) for _ in range(4)])
    with torch.no_grad():
        reference = model.pool(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model.pool(batch)
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed.float(), reference, rtol=0.05, atol=0.05)


@pytest.mark.slow  # five optimiser steps over 9 M parameters: seconds alone, much more on a shared CPU
def test_a_few_adam_steps_lower_the_nt_xent_loss_on_fixed_views() -> None:
    from gigassl.training.loss import nt_xent

    torch.manual_seed(1)
    model = GigaSSLModel(None, projector_dim=32, device="cpu").train()
    rng = np.random.default_rng(4)
    slides = [rng.standard_normal((5, 256)).astype(np.float32) for _ in range(8)]
    cells = [rng.integers(0, 10, size=(5, 2)) for _ in range(8)]
    # view 2 of a slide: noisy features, tiles in another order (same cells)
    views = [(f, c) for f, c in zip(slides, cells)] + [
        (f[::-1] + 0.1 * rng.standard_normal(f.shape).astype(np.float32), c[::-1]) for f, c in zip(slides, cells)
    ]
    batch = collate_views(views)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        z = model(batch)
        loss = nt_xent(z[:8], z[8:], temperature=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses


# ---------------------------------------------------------------------------------------------
# ResNet34 / ResNet50 layer4 and the generic head (any width D)


@pytest.fixture(scope="module")
def deep_resnets() -> dict[str, nn.Module]:
    """ResNet34 and ResNet50 (v1.5, as extract.encoders.resnet builds it) with non-trivial BN statistics."""
    generator = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    models = {}
    for arch in ("resnet34", "resnet50"):
        model = build_resnet(arch)
        _randomise_batch_norms(model, generator)
        models[arch] = model.eval()
    return models


def test_resnet50_puts_the_stride_on_the_3x3_conv(deep_resnets: dict[str, nn.Module]) -> None:
    block0 = deep_resnets["resnet50"].layer4[0]
    assert block0.conv1.stride == (1, 1) and block0.conv2.stride == (2, 2)  # v1.5: the sparse strided conv is conv2


@pytest.mark.parametrize("arch, height, width", [("resnet34", 5, 7), ("resnet50", 5, 7), ("resnet50", 7, 3)])
def test_deeper_sparse_layer4_equals_dense_layer4_with_average_shortcut_on_full_map(
    deep_resnets: dict[str, nn.Module],
    arch: str,
    height: int,
    width: int,
    backend: str,
) -> None:
    resnet = deep_resnets[arch]
    head = HeadSpec.for_resnet(arch)
    layer4 = SparseLayer4(backend, head.feature_dim, head.width, head.block, head.n_blocks).load_dense(resnet.layer4).eval()
    dense_reference = _dense_layer4_with_average_shortcut(resnet.layer4).eval()
    dense, views = _full_map(height, width, resnet.trunk_width, n_maps=2, seed=5)
    with torch.no_grad():
        sparse = layer4(to_tensor(collate_views(views), backend)).dense()
        expected = dense_reference(dense)
        out_h, out_w = expected.shape[2:]
        assert sparse.shape[1] == resnet.layer4_width
        assert sparse[:, :, out_h:].abs().sum() == 0 and sparse[:, :, :, out_w:].abs().sum() == 0
        torch.testing.assert_close(sparse[:, :, :out_h, :out_w], expected, **TOL)
        assert not torch.allclose(sparse[:, :, :out_h, :out_w], resnet.layer4(dense), **TOL)


def test_bottleneck_training_mode_batch_norm_matches_dense_on_full_maps(deep_resnets: dict[str, nn.Module], backend: str) -> None:
    resnet = deep_resnets["resnet50"]
    layer4 = SparseLayer4(backend, 1024, 2048, "bottleneck", 3).load_dense(resnet.layer4).train()
    dense_reference = _dense_layer4_with_average_shortcut(resnet.layer4).train()
    dense, views = _full_map(5, 5, 1024, n_maps=2, seed=6)
    sparse = layer4(to_tensor(collate_views(views), backend)).dense()[:, :, :3, :3]
    torch.testing.assert_close(sparse, dense_reference(dense), **TOL)


def test_head_spec_is_read_from_the_dense_layer4(resnet: ResNet18, deep_resnets: dict[str, nn.Module]) -> None:
    assert HeadSpec.of_layer4(resnet.layer4) == HeadSpec() == HeadSpec.for_resnet("resnet18")
    assert HeadSpec.of_layer4(deep_resnets["resnet34"].layer4) == HeadSpec(256, "basic", 3, 512, "resnet34")
    assert HeadSpec.of_layer4(deep_resnets["resnet50"].layer4) == HeadSpec(1024, "bottleneck", 3, 2048, "resnet50")
    assert HeadSpec.of_layer4(dense_layer4(12, 512)) == HeadSpec.generic(12)
    with pytest.raises(ValueError, match="layer4 of 3 basic blocks: the dense stage has 2"):
        SparseLayer4("torch", 256, 512, "basic", 3).load_dense(resnet.layer4)


def test_resnet50_model_pools_2048_d_and_its_state_round_trips_through_its_head(deep_resnets: dict[str, nn.Module]) -> None:
    model = GigaSSLModel(deep_resnets["resnet50"], projector_dim=32, device="cpu", sparse_backend="torch").eval()
    assert (model.head.source, model.feature_dim, model.slide_dim) == ("resnet50", 1024, 2048)
    rng = np.random.default_rng(5)
    batch = collate_views(
        [(rng.standard_normal((5, 1024)).astype(np.float32), rng.integers(0, 9, size=(5, 2))) for _ in range(3)]
    )
    buffer = io.BytesIO()
    torch.save({"architecture": model.head.to_dict(), "model": model.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    restored = GigaSSLModel(None, 32, "cpu", "torch", head=HeadSpec.from_dict(saved["architecture"])).eval()
    restored.load_state_dict(saved["model"], strict=True)
    with torch.no_grad():
        pooled = model.pool(batch)
        assert pooled.shape == (3, 2048) and torch.isfinite(pooled).all()
        torch.testing.assert_close(restored(batch), model(batch))


@pytest.mark.parametrize("projection", [0, 16])
def test_generic_head_takes_any_width_and_trains_every_parameter(projection: int, backend: str) -> None:
    torch.manual_seed(2)
    head = HeadSpec.generic(12, input_projection_dim=projection)
    model = GigaSSLModel(None, projector_dim=16, device="cpu", sparse_backend=backend, head=head).train()
    assert (model.feature_dim, model.slide_dim, model.input_projection is not None) == (12, 512, projection > 0)
    assert model.layer4.block0.shortcut_conv.weight.shape == (512, projection or 12)
    rng = np.random.default_rng(6)
    batch = collate_views([(rng.standard_normal((5, 12)).astype(np.float32), rng.integers(0, 20, size=(5, 2))) for _ in range(4)])
    z = model(batch)
    assert z.shape == (4, 16) and torch.isfinite(z).all()
    z.square().sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_head_spec_refuses_bad_data_in_one_line(resnet: ResNet18) -> None:
    assert HeadSpec.from_dict(HeadSpec().to_dict()) == HeadSpec()
    with pytest.raises(ValueError, match="ckpt.pt: the sparse head is NoneType, not a mapping"):
        HeadSpec.from_dict(None, "ckpt.pt")  # no ResNet18 default for a checkpoint that does not say
    partial = {k: v for k, v in HeadSpec().to_dict().items() if k != "input_projection_dim"}
    with pytest.raises(ValueError, match=r"ckpt.pt: sparse head fields \['input_projection_dim'\] missing; train"):
        HeadSpec.from_dict(partial, "ckpt.pt")
    with pytest.raises(ValueError, match="ckpt.pt: unknown sparse head fields \\['kernel'\\]"):
        HeadSpec.from_dict({**HeadSpec().to_dict(), "kernel": 5}, "ckpt.pt")
    with pytest.raises(ValueError, match="ckpt.pt: invalid sparse head: block 'dense'"):
        HeadSpec.from_dict({**HeadSpec().to_dict(), "block": "dense"}, "ckpt.pt")
    with pytest.raises(ValueError, match="does not have the shape of the head"):
        GigaSSLModel(resnet, head=HeadSpec.for_resnet("resnet50"))
