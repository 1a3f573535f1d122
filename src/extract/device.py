"""One place that decides the device, the autocast dtype and, under torchrun, the rank.

Everything else takes a ``torch.device`` and lets tensors follow their inputs, so the same
code path serves the CPU and CUDA. :func:`init_distributed` is the torchrun set-up of both
training jobs (MoCo and Giga-SSL): rank, world size, this rank's device, the process group;
:func:`rank` and :func:`world_size` are the one answer to "is this process in a distributed run,
and where" that every module asks (0 of 1 without a process group).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from extract.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"device {name!r} asked for but CUDA is not available to this torch ({torch.__version__}); "
            "install a CUDA build of torch or use --device cpu or auto"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r} asked for but this node has {torch.cuda.device_count()} GPU(s); use cuda:0 … or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name!r} asked for but Apple MPS is not available here; use --device cpu or auto")
    return device


def rank_device(name: str = "auto") -> torch.device:
    """The device of this process: :func:`resolve_device`, and under torchrun (``LOCAL_RANK`` set) an
    unindexed ``cuda`` becomes ``cuda:LOCAL_RANK``, made the current device so that pinned memory,
    NCCL and every kernel of the rank use its own GPU rather than GPU 0."""
    device = resolve_device(name)
    local_rank = os.environ.get("LOCAL_RANK")
    if device.type == "cuda" and device.index is None and local_rank is not None:
        device = torch.device("cuda", int(local_rank))
        if device.index >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                "start at most one torchrun process per GPU (--nproc-per-node)"
            )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def world_size() -> int:
    """Processes in the default torch.distributed group; 1 without one (not joined, or not built in)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default torch.distributed group; 0 without one."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank 0 of 1 on the device asked for, unless under torchrun."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    initialised_here: bool = False  # this process joined the group, so it destroys it at the end

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str = "auto") -> DistContext:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (nccl on CUDA, gloo on the CPU),
    on this rank's device (:func:`rank_device`); else rank 0 of 1 on :func:`resolve_device`."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # torchrun's: this process is not to join a group
        return DistContext(device=resolve_device(device_name))
    device = rank_device(device_name)
    initialised_here = not dist.is_initialized()
    if initialised_here:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank(), world_size(), device, initialised_here)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 arithmetic (x86 AVX512-BF16 or AMX, Arm BF16), read from /proc/cpuinfo
    on Linux; False elsewhere (bf16 would be emulated there, slower than fp32)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            flags = set(info.read().split())
    except OSError:
        return False
    if platform.machine() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision this device runs fast: bf16 where supported, fp16 on older GPUs;
    on the CPU bf16 only where it has bf16 units (:func:`cpu_has_native_bf16`), else none (fp32)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return None


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """``torch.autocast`` on the device's reduced dtype, or nothing when disabled/unsupported."""
    dtype = autocast_dtype(device) if enabled else None
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
