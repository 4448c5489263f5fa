"""The process group, set up from the environment in exactly one place.

Launchers: torchrun (RANK, WORLD_SIZE, LOCAL_RANK set), Slurm's srun (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID mapped here), or a single process with no launcher. MASTER_ADDR/MASTER_PORT must come
from the launcher or the batch script; a lone process gets 127.0.0.1 and a free port.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str   # torchrun | slurm | single


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_rank_env(environ: dict) -> dict:
    """SLURM_* of one srun task -> the torch.distributed variables (pure; the Slurm tests call it)."""
    out = dict(RANK=environ["SLURM_PROCID"], WORLD_SIZE=environ["SLURM_NTASKS"],
               LOCAL_RANK=environ.get("SLURM_LOCALID", "0"))
    if "MASTER_ADDR" not in environ:
        raise RuntimeError("under srun MASTER_ADDR must be set by the batch script (first host of "
                           "SLURM_JOB_NODELIST); see cluster/templates/train.sbatch")
    out["MASTER_PORT"] = environ.get("MASTER_PORT") or str(10000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000)
    return out


def detect(environ: dict | None = None) -> DistEnv:
    """Fill os.environ with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* and say which launcher started us."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and env.get("SLURM_STEP_ID") is not None:
        env.update(slurm_rank_env(env))
        launcher = "slurm"
    else:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        launcher = "single"
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        env["MASTER_PORT"] = str(free_port())
    return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), launcher)


def init(timeout_s: float = 300.0) -> DistEnv:
    """Process group (NCCL on GPUs, gloo on CPUs) with a bounded timeout, so a dead rank
    makes the others fail instead of hanging forever."""
    import torch
    import torch.distributed as dist

    info = detect()
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return info


def shutdown() -> None:
    """Barrier then destroy: without it gloo runs sometimes abort at exit."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
