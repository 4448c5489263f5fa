"""The process group: on GPUs it must carry CPU control collectives (gloo) beside device ones (NCCL).
No GPU here, so CUDA is faked only to see which group would be created and where control tensors live;
the real two-rank collectives run in test_losses_distributed."""
from __future__ import annotations

import pytest
import torch

from micon import distributed


def test_backend_carries_cpu_collectives_on_gpus():
    assert distributed.backend_for(cuda=True) == "cpu:gloo,cuda:nccl"
    assert distributed.backend_for(cuda=False) == "gloo"


def test_init_on_a_gpu_node_creates_a_mixed_group_and_votes_on_cpu(monkeypatch):
    import torch.distributed as dist

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: seen.setdefault("device", i))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    for k, v in dict(RANK="11", WORLD_SIZE="16", LOCAL_RANK="3", MASTER_ADDR="10.0.0.1", MASTER_PORT="29500").items():
        monkeypatch.setenv(k, v)
    info = distributed.init(timeout_s=60)
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (11, 16, 3, "torchrun")
    assert seen["backend"] == "cpu:gloo,cuda:nccl" and seen["device"] == 3
    assert seen["timeout"].total_seconds() == 60

    # the votes the trainer takes every step are CPU tensors whatever the model's device
    reduced = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 16)
    monkeypatch.setattr(dist, "get_rank", lambda: 11)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: reduced.append(t.device.type))
    monkeypatch.setattr(dist, "broadcast_object_list", lambda box, src, device=None: reduced.append(device.type))
    assert distributed.max_vote(1.0) == 1.0
    distributed.broadcast_object("step00000010")
    assert reduced == ["cpu", "cpu"]


def test_without_a_group_collectives_are_the_identity():
    x = torch.randn(3, 2)
    assert distributed.gather_with_grad(x) is x and distributed.gather_no_grad(x) is x
    assert distributed.max_vote(2.5) == 2.5 and distributed.broadcast_object("a") == "a"
    distributed.barrier()


@pytest.mark.parametrize("env,launcher", [({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
                                            "SLURM_STEP_ID": "0", "MASTER_ADDR": "n1"}, "slurm"), ({}, "single")])
def test_launchers_are_detected(env, launcher):
    info = distributed.detect(dict(env))
    assert info.launcher == launcher


def test_torch_extensions_live_in_the_environment(monkeypatch):
    """DeepSpeed's JIT op is built once per Python environment, not in the shared ~/.cache that two
    checkouts' environments would rebuild in turn; a directory the user set is kept."""
    import sys
    from pathlib import Path

    from train.engine import environment_extensions

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert environment_extensions() == str(Path(sys.prefix) / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")
    assert environment_extensions() == "/somewhere/else"
