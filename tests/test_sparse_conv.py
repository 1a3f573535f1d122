"""The two sparse backends: the plain-PyTorch one against spconv (the reference), and the choice
of backend.

Equality is checked on random multi-map batches built the way training builds them: maps of
different extents, tiles merged on one cell (slide-level scaling below 1), isolated sites (no
neighbour: every off-centre tap is empty) and clusters (every tap used). Tolerances: fp32 forward
outputs within 1e-5 relative to the largest output, gradients within 1e-4 relative to the largest
gradient (the two backends sum the 9 taps in different orders).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from gigassl.model import GigaSSLModel
from gigassl.sparse import conv as sparse_conv
from gigassl.sparse.conv import (
    SparseBackendError,
    make_sparse_tensor,
    resolve_backend,
    strided_conv3x3,
    submanifold_conv3x3,
    submanifold_rulebook,
    sum_pool_3x3_stride2,
)
from gigassl.sparse.maps import augment_cells, collate_views


def random_batch(seed: int, n_maps: int = 24, channels: int = 256):
    """Maps of 1–12 tiles over extents 1–12 cells, slide-augmented (scale ∈ [0.5, 2]: merges)."""
    rng = np.random.default_rng(seed)
    views = []
    for i in range(n_maps):
        n_tiles = int(rng.integers(1, 13))
        extent = int(rng.integers(1, 13))
        cells = rng.integers(0, extent, size=(n_tiles, 2))
        if i % 4 == 0:
            cells = augment_cells(cells, rng, (0.5, 2.0))
        views.append((rng.standard_normal((n_tiles, channels)).astype(np.float32), cells))
    views.append((rng.standard_normal((1, channels)).astype(np.float32), np.array([[0, 0]])))  # one tile alone
    return collate_views(views)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _tensor(batch, backend: str, features: torch.Tensor | None = None):
    features = batch.features if features is None else features
    return make_sparse_tensor(features, batch.indices, batch.spatial_shape, batch.batch_size, backend)


def _sorted_rows(tensor) -> torch.Tensor:
    """(N, C) features in (batch, y, x) order, whatever order the backend produced."""
    keys = (tensor.indices[:, 0].long() * 100_000 + tensor.indices[:, 1].long()) * 100_000 + tensor.indices[:, 2].long()
    return tensor.features[torch.argsort(keys)]


@pytest.mark.spconv
@pytest.mark.parametrize("kind", ["submanifold", "strided"])
@pytest.mark.parametrize("seed", [0, 1])
def test_torch_convolutions_equal_spconv_forward_and_backward(kind: str, seed: int) -> None:
    batch = random_batch(seed, channels=32)
    make = submanifold_conv3x3 if kind == "submanifold" else strided_conv3x3
    torch.manual_seed(seed)
    ours, reference = make(32, 24, "torch"), make(32, 24, "spconv")
    reference.weight.data.copy_(ours.weight.data)
    results = {}
    for name, conv in (("torch", ours), ("spconv", reference)):
        features = batch.features.clone().requires_grad_(True)
        out = conv(_tensor(batch, name, features))
        rows = _sorted_rows(out)
        (rows * torch.linspace(-1, 1, rows.numel()).view_as(rows)).sum().backward()
        results[name] = (out, rows, features.grad, conv.weight.grad)
    (out_t, rows_t, dx_t, dw_t), (out_s, rows_s, dx_s, dw_s) = results["torch"], results["spconv"]
    assert sorted(map(tuple, out_t.indices.tolist())) == sorted(map(tuple, out_s.indices.tolist()))
    assert _relative_error(rows_t, rows_s) < 1e-5
    assert _relative_error(dx_t, dx_s) < 1e-4
    assert _relative_error(dw_t, dw_s) < 1e-4


@pytest.mark.spconv
def test_torch_model_equals_spconv_model_forward_and_gradients() -> None:
    batch = random_batch(2)
    torch.manual_seed(0)
    ours = GigaSSLModel(None, sparse_backend="torch").train()
    reference = GigaSSLModel(None, sparse_backend="spconv").train()
    reference.load_state_dict(ours.state_dict(), strict=True)  # one state dict for both backends
    z_t, z_s = ours(batch), reference(batch)
    assert _relative_error(z_t, z_s) < 1e-5
    z_t.square().sum().backward()
    z_s.square().sum().backward()
    for (name, p_t), p_s in zip(ours.named_parameters(), reference.parameters()):
        if name.startswith("projector.") and name.endswith(".bias") and name != "projector.6.bias":
            continue  # a bias before batch norm has a zero gradient: only rounding noise to compare
        assert _relative_error(p_t.grad, p_s.grad) < 1e-4, name
    with torch.no_grad():
        assert _relative_error(ours.eval().pool(batch), reference.eval().pool(batch)) < 1e-5


def test_empty_neighbourhoods_leave_only_the_centre_tap() -> None:
    # isolated sites: the submanifold conv is the per-site product with the centre weight
    features = torch.randn(3, 4)
    indices = torch.tensor([[0, 1, 1], [0, 5, 5], [1, 1, 1]])
    maps = make_sparse_tensor(features, indices, [8, 8], 2, "torch")
    conv = submanifold_conv3x3(4, 2, "torch")
    book = submanifold_rulebook(maps)
    assert all(len(book.inputs[tap]) == 0 for tap in range(9) if tap != 4)
    torch.testing.assert_close(conv(maps).features, features @ conv.weight[:, 1, 1, :].T)


def test_neighbours_on_other_maps_or_past_the_edge_are_not_neighbours() -> None:
    # (0, y, W-1) and (0, y+1, 0) are consecutive keys in a row-major flattening: must not pair
    indices = torch.tensor([[0, 0, 3], [0, 1, 0], [1, 0, 3]])
    maps = make_sparse_tensor(torch.ones(3, 1), indices, [2, 4], 2, "torch")
    book = submanifold_rulebook(maps)
    assert sum(len(book.inputs[tap]) for tap in range(9) if tap != 4) == 0


def test_shortcut_pool_reuses_the_strided_rulebook_and_matches_the_lookup_version() -> None:
    batch = random_batch(3, channels=8)
    maps = _tensor(batch, "torch")
    out = strided_conv3x3(8, 8, "torch")(maps)
    fast = sum_pool_3x3_stride2(maps, out)
    shuffled = torch.randperm(len(out.indices))  # the lookup path accepts outputs in any order
    slow = sparse_conv._sum_pool_by_lookup(maps.features, maps.indices, out.indices[shuffled], out.spatial_shape)
    torch.testing.assert_close(slow, fast[shuffled])


def test_torch_backend_runs_in_bf16_under_autocast_close_to_fp32() -> None:
    batch = random_batch(4, channels=16)
    conv = submanifold_conv3x3(16, 8, "torch")
    reference = conv(_tensor(batch, "torch")).features
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = conv(_tensor(batch, "torch")).features
    assert mixed.dtype == torch.bfloat16 and reference.dtype == torch.float32
    assert _relative_error(mixed.float(), reference) < 0.02


def test_backend_choice_and_its_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(SparseBackendError, match="unknown sparse backend 'sparse'"):
        resolve_backend("sparse", "cpu")
    with pytest.raises(SparseBackendError, match="no kernels for device 'mps'.*--sparse-backend torch"):
        resolve_backend("spconv", "mps")
    # spconv hidden: a one-line error that says what to install or pass
    monkeypatch.setitem(sys.modules, "spconv", None)
    monkeypatch.setitem(sys.modules, "spconv.pytorch", None)
    sparse_conv.spconv_available.cache_clear()
    try:
        with pytest.raises(SparseBackendError, match=r"pip install 'gigassl\[spconv\]'.*--sparse-backend torch"):
            GigaSSLModel(None, sparse_backend="spconv")
        model = GigaSSLModel(None, sparse_backend="auto")  # and the default needs no spconv
        assert model.sparse_backend == "torch"
    finally:
        sparse_conv.spconv_available.cache_clear()


@pytest.mark.spconv
def test_spconv_algorithm_follows_the_input_device_not_the_construction_device() -> None:
    import spconv.pytorch as spconv

    batch = random_batch(5, channels=8)
    conv = submanifold_conv3x3(8, 8, "spconv")
    conv.algo = spconv.ConvAlgo.MaskImplicitGemm  # as if built for a GPU, then moved to the CPU
    out = conv(_tensor(batch, "spconv"))
    assert conv.algo == spconv.ConvAlgo.Native and torch.isfinite(out.features).all()


def test_the_torch_backend_is_deterministic_forward_and_backward() -> None:
    # a row gathered by several taps must not be accumulated in a thread-dependent order in the
    # backward pass (advanced indexing's backward is; index_select's is not): resume is bit-exact
    batch = random_batch(6)
    torch.manual_seed(0)
    model = GigaSSLModel(None, sparse_backend="torch").train()
    runs = []
    for _ in range(3):
        model.zero_grad()
        z = model(batch)
        z.square().sum().backward()
        runs.append([z.detach().clone()] + [p.grad.clone() for p in model.parameters()])
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))
