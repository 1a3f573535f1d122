"""NT-Xent against pytorch-metric-learning and an analytic value; the DDP variant on 2 gloo ranks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_metric_learning.losses import NTXentLoss

from gigassl.training.loss import (
    constant_output_loss,
    gather_with_gradient,
    nt_xent,
    nt_xent_distributed,
    positive_pair_accuracy,
    rank,
    world_size,
)


def _pml(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """PML's NT-Xent: both views stacked, the slide index as label (positives = same label)."""
    labels = torch.arange(len(z1)).repeat(2)
    return NTXentLoss(temperature=temperature)(torch.cat([z1, z2]), labels)


@pytest.mark.parametrize("batch, dim, temperature", [(2, 3, 0.05), (16, 8, 0.05), (33, 64, 0.5), (64, 256, 0.1)])
def test_equals_pytorch_metric_learning_values_and_gradients(batch: int, dim: int, temperature: float) -> None:
    generator = torch.Generator().manual_seed(batch)
    z1 = torch.randn(batch, dim, generator=generator, dtype=torch.float64, requires_grad=True)
    z2 = (z1.detach() + 0.5 * torch.randn(batch, dim, generator=generator, dtype=torch.float64)).requires_grad_(True)
    ours = nt_xent(z1, z2, temperature)
    reference = _pml(z1, z2, temperature)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    for got, expected in zip(torch.autograd.grad(ours, [z1, z2]), torch.autograd.grad(reference, [z1, z2])):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_equals_pml_in_float32_at_training_size() -> None:
    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(128, 256, generator=generator, requires_grad=True)
    z2 = torch.randn(128, 256, generator=generator, requires_grad=True)
    ours, reference = nt_xent(z1, z2), _pml(z1, z2, 0.05)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for got, expected in zip(torch.autograd.grad(ours, [z1, z2]), torch.autograd.grad(reference, [z1, z2])):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_analytic_value_on_orthonormal_views() -> None:
    # both views of slide i are e_i: for every anchor the positive has cosine 1, the 2B − 2
    # negatives cosine 0, so the loss is log(1 + (2B − 2)·exp(−1/τ))
    batch, temperature = 4, 0.5
    z = torch.eye(batch, 6)
    expected = math.log(1 + (2 * batch - 2) * math.exp(-1 / temperature))
    assert nt_xent(z, z.clone(), temperature).item() == pytest.approx(expected, rel=1e-6)


def test_is_scale_invariant_and_zero_for_a_single_pair() -> None:
    generator = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(8, 4, generator=generator), torch.randn(8, 4, generator=generator)
    assert nt_xent(3 * z1, 0.1 * z2).item() == pytest.approx(nt_xent(z1, z2).item(), rel=1e-5)
    assert nt_xent(z1[:1], z2[:1]).item() == 0.0


def test_is_computed_in_fp32_under_autocast_and_from_half_inputs() -> None:
    generator = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(32, 16, generator=generator), torch.randn(32, 16, generator=generator)
    reference = nt_xent(z1, z2).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = nt_xent(z1, z2)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(reference, rel=1e-6)
    assert nt_xent(z1.bfloat16(), z2.bfloat16()).item() == pytest.approx(reference, rel=0.02)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        nt_xent(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.ones(4, 3), torch.ones(4, 3), temperature=0.0)


def test_constant_output_loss_is_nt_xent_of_identical_views_and_below_random_positives() -> None:
    z = torch.ones(20, 8)
    assert float(nt_xent(z, z.clone())) == pytest.approx(constant_output_loss(20), rel=1e-6)
    assert constant_output_loss(20) == pytest.approx(math.log(39))
    # unrelated positives at temperature 0.05 score worse than collapsing: why collapse is where a
    # loss with nothing to learn ends
    generator = torch.Generator().manual_seed(0)
    random = nt_xent(torch.randn(20, 256, generator=generator), torch.randn(20, 256, generator=generator), 0.05)
    assert float(random) > constant_output_loss(20) + 0.3
    with pytest.raises(ValueError):
        constant_output_loss(0)


def test_positive_pair_accuracy() -> None:
    generator = torch.Generator().manual_seed(2)
    z1 = torch.randn(50, 32, generator=generator)
    assert positive_pair_accuracy(z1, z1 + 0.01 * torch.randn(50, 32, generator=generator)) == 1.0
    # view 2 of slide i is view 1 of slide i + 1: every anchor's nearest is a negative
    z1 = torch.eye(4)
    z2 = torch.roll(z1, 1, dims=0)
    assert positive_pair_accuracy(z1, z2) == 0.0
    # half right: slides 0, 1 aligned, slides 2, 3 swapped
    z2 = z1[[0, 1, 3, 2]]
    assert positive_pair_accuracy(z1, z2) == 0.5


def test_without_distributed_the_ddp_variant_is_the_plain_loss() -> None:
    assert (rank(), world_size()) == (0, 1)
    generator = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(8, 4, generator=generator), torch.randn(8, 4, generator=generator)
    assert nt_xent_distributed(z1, z2).item() == nt_xent(z1, z2).item()
    assert gather_with_gradient(z1) is z1


def _ddp_worker(process: int, world: int, folder: str, z1: torch.Tensor, z2: torch.Tensor) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=process, world_size=world)
    try:
        torch.set_num_threads(1)
        b = len(z1) // world
        local1 = z1[process * b : (process + 1) * b].clone().requires_grad_(True)
        local2 = z2[process * b : (process + 1) * b].clone().requires_grad_(True)
        loss = nt_xent_distributed(local1, local2, 0.05)
        loss.backward()
        torch.save({"loss": loss.detach(), "g1": local1.grad, "g2": local2.grad}, f"{folder}/rank{process}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawning two interpreters that import torch takes ~20 s on a shared CPU
def test_two_gloo_ranks_give_the_global_loss_and_its_gradients(tmp_path: Path) -> None:
    world, batch = 2, 12
    generator = torch.Generator().manual_seed(4)
    z1 = torch.randn(batch, 16, generator=generator, dtype=torch.float64)
    z2 = z1 + 0.3 * torch.randn(batch, 16, generator=generator, dtype=torch.float64)
    mp.spawn(_ddp_worker, args=(world, str(tmp_path), z1, z2), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    g1, g2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    single = nt_xent(g1, g2, 0.05)
    single.backward()
    torch.testing.assert_close(torch.stack([r["loss"] for r in results]).mean(), single.detach())
    # each rank's gradient is that of the sum of the ranks' losses; DDP divides by the world size
    torch.testing.assert_close(torch.cat([r["g1"] for r in results]) / world, g1.grad)
    torch.testing.assert_close(torch.cat([r["g2"] for r in results]) / world, g2.grad)
