"""Giga-SSL training under torchrun: batch norm over the global batch, and means over ranks.

The process group is joined by :func:`extract.device.init_distributed` (the torchrun set-up
shared with MoCo: gloo on the CPU, nccl on CUDA, one GPU per local rank).
:class:`GlobalBatchNorm1d` normalises with the statistics of the global batch through a
differentiable all-reduce, which also runs on gloo (``SyncBatchNorm`` does not), so a training
step on R ranks equals the one-process step on the same global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import FunctionCtx

from extract.device import DistContext, world_size


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients of every rank's loss (as the gathering
    NT-Xent does), so that DDP's averaging gives the gradient of the global-batch loss."""

    @staticmethod
    def forward(ctx: FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` whose training statistics are those of the batch over all ranks.

    Sums, sums of squares and counts are all-reduced with gradients (:class:`_AllReduceSum`), so forward and backward equal a
    one-process batch norm of the concatenated batch. Same parameters and buffers (and state
    dict keys) as ``BatchNorm1d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        x32 = x.float()
        local = torch.cat([x32.sum(0), (x32 * x32).sum(0), x32.new_tensor([float(len(x32))])])
        total = _AllReduceSum.apply(local)  # (2C + 1,): sums, sums of squares, count over all ranks
        count = total[-1]
        mean = total[: self.num_features] / count
        var = (total[self.num_features : 2 * self.num_features] / count - mean * mean).clamp_min(0)
        if self.num_batches_tracked is None or self.running_mean is None or self.running_var is None:
            raise ValueError("GlobalBatchNorm1d needs track_running_stats=True in training")
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            unbiased = var * count / (count - 1).clamp_min(1)
            self.running_mean.mul_(1 - momentum).add_(momentum * mean)
            self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
        out = (x32 - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return out.to(x.dtype)


def use_global_batch_norm(module: nn.Module) -> nn.Module:
    """Swap every ``BatchNorm1d`` of ``module`` for :class:`GlobalBatchNorm1d` (weights kept)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            replacement = GlobalBatchNorm1d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats, device=child.weight.device
            )
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement)
        else:
            use_global_batch_norm(child)
    return module


def all_reduce_mean(value: torch.Tensor, context: DistContext) -> torch.Tensor:
    """The mean of ``value`` over ranks (``value`` itself on one process)."""
    if context.world_size > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= context.world_size
    return value
