"""The MoCo v2 model: query and key encoders, the key queue, InfoNCE, shuffle-BN.

See :mod:`extract.moco.pretrain` for the training job and the defaults it uses.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from extract.device import rank, world_size
from extract.encoders.resnet import build_resnet

HEAD_OUT_DIM = 128


def mlp_head(in_dim: int = 512, hidden_dim: int | None = None, out_dim: int = HEAD_OUT_DIM) -> nn.Sequential:
    """MoCo v2's projection head in_dim → hidden_dim (default in_dim) → out_dim, stored as the
    ResNet's ``fc`` (keys ``fc.0.*``, ``fc.2.*``): 512 → 512 → 128 for ResNet18/34, 2048 → 2048 → 128 for ResNet50."""
    hidden_dim = hidden_dim or in_dim
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class KeyQueue(nn.Module):
    keys: torch.Tensor  # buffers, registered in __init__
    ptr: torch.Tensor

    """Ring buffer of ``size`` negative keys (size, dim), oldest overwritten first."""

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write (B, dim) keys at the pointer, wrapping around; with B > size the last ``size`` stay."""
        size = self.keys.shape[0]
        keys = keys.detach().to(self.keys.dtype)[-size:]
        rows = (int(self.ptr) + torch.arange(keys.shape[0], device=self.keys.device)) % size
        self.keys[rows] = keys
        self.ptr.fill_((int(self.ptr) + keys.shape[0]) % size)


@torch.no_grad()
def momentum_update(key_encoder: nn.Module, query_encoder: nn.Module, momentum: float) -> None:
    """θ_k ← m·θ_k + (1 − m)·θ_q for every parameter (buffers are left alone)."""
    for key_param, query_param in zip(key_encoder.parameters(), query_encoder.parameters()):
        key_param.mul_(momentum).add_(query_param.detach(), alpha=1.0 - momentum)


def info_nce_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised q, k (B, D) and queue (K, D) → logits (B, 1 + K), the positive in column 0."""
    positive = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    negative = q @ queue.T  # (B, K)
    return torch.cat([positive, negative], dim=1) / temperature


def info_nce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE: cross-entropy of :func:`info_nce_logits` with the positive as the target."""
    logits = info_nce_logits(q, k, queue, temperature)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


class MoCo(nn.Module):
    """Query encoder, momentum key encoder and queue (state-dict keys as in the MoCo repository).

    ``arch``: resnet18, resnet34 or resnet50 (:mod:`extract.encoders.resnet`).
    """

    def __init__(self, queue_size: int, seed: int = 0, arch: str = "resnet18") -> None:
        super().__init__()
        self.arch = arch
        self.encoder_q = build_resnet(arch)
        self.encoder_q.fc = mlp_head(self.encoder_q.layer4_width)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for param in self.encoder_k.parameters():
            param.requires_grad_(False)
        self.queue = KeyQueue(queue_size, HEAD_OUT_DIM, torch.Generator().manual_seed(seed))

    def query(self, images: torch.Tensor, encoder: nn.Module | None = None) -> torch.Tensor:
        """(B, 3, H, W) → (B, 128) normalised queries (``encoder``: the DDP wrapper, if any)."""
        return F.normalize((encoder or self.encoder_q)(images).float(), dim=1)

    @torch.no_grad()
    def keys(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) → (this process's keys (B, 128), all processes' keys for the queue)."""
        if world_size() == 1:
            keys = F.normalize(self.encoder_k(images).float(), dim=1)
            return keys, keys
        return _shuffled_keys(self.encoder_k, images)


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """The tensors of every rank concatenated along the first dimension (no gradient)."""
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _shuffled_keys(encoder_k: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle-BN: encode a random slice of the global key batch, then undo the permutation."""
    batch = images.shape[0]
    start = rank() * batch
    everything = all_gather(images)  # (world·B, 3, H, W)
    permutation = torch.randperm(len(everything), device=images.device)
    dist.broadcast(permutation, src=0)
    mine = permutation[start : start + batch]
    keys = F.normalize(encoder_k(everything[mine]).float(), dim=1)
    all_keys = all_gather(keys)[torch.argsort(permutation)]  # back to the gathered order
    return all_keys[start : start + batch], all_keys
