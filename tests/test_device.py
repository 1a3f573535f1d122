"""Device decisions: torchrun ranks on their own GPU, bf16 only on CPUs that have it, clear errors,
one torchrun set-up for both training jobs."""

from __future__ import annotations

import pytest
import torch

from extract import device as device_module
from extract.device import DistContext, autocast_dtype, init_distributed, rank, rank_device, resolve_device, world_size


def test_each_torchrun_rank_is_made_current_on_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert rank_device("auto") == torch.device("cuda", 2)
    assert current == [torch.device("cuda", 2)]  # pinned memory and kernels then go to GPU 2, not 0
    assert rank_device("cuda:1") == torch.device("cuda", 1)  # an explicit index wins
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(ValueError, match="LOCAL_RANK=5 but this node has 4 GPU"):
        rank_device("cuda")
    monkeypatch.delenv("LOCAL_RANK")
    assert rank_device("cpu") == torch.device("cpu")


def test_one_process_is_rank_0_of_1_without_a_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    context = init_distributed("cpu")
    assert context == DistContext(0, 1, torch.device("cpu"), False) and context.is_main
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: nothing to join either
    assert init_distributed("cpu") == context
    # MoCo's job and Giga-SSL training share this one set-up (the multi-rank runs are in test_moco, test_train)
    import extract.moco.pretrain
    import gigassl.train

    assert extract.moco.pretrain.init_distributed is gigassl.train.init_distributed is init_distributed


def test_one_distributed_check_answers_every_module(monkeypatch: pytest.MonkeyPatch) -> None:
    import extract.checkpoints.moco
    import extract.moco.model
    import gigassl.training.distributed
    import gigassl.training.loss

    assert (rank(), world_size()) == (0, 1)  # no process group
    for module in (extract.checkpoints.moco, extract.moco.model, gigassl.training.distributed, gigassl.training.loss):
        assert module.world_size is world_size, module.__name__
    assert extract.moco.model.rank is gigassl.training.loss.rank is rank
    # inside a group, the group's answer (the two-rank runs: test_moco, test_train, test_loss)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 3)
    assert (rank(), world_size()) == (3, 4)


def test_absent_devices_are_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available.*--device cpu"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="MPS is not available.*--device cpu"):
        resolve_device("mps")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")


def test_cpu_autocast_only_where_the_cpu_has_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: False)
    assert autocast_dtype(torch.device("cpu")) is None
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)
    assert autocast_dtype(torch.device("cpu")) == torch.bfloat16
