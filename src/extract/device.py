"""One place that decides the device and the autocast dtype.

Everything else takes a ``torch.device`` and lets tensors follow their inputs, so the same
code path serves the CPU and CUDA.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available to this torch ({torch.__version__}); "
                         "install a CUDA build of torch or use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for but this node has {torch.cuda.device_count()} GPU(s); use cuda:0 … or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for but Apple MPS is not available here; use --device cpu or auto")
    return device


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision this device runs fast: bf16 where supported, fp16 on older GPUs."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16
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
