"""The process group and every collective the jobs use, in one place.

The group is created as "cpu:gloo,cuda:nccl" on GPUs (gloo alone on CPU-only machines), so small
control collectives (a stop vote, a non-finite vote, the resume tag) run on CPU tensors through gloo
while the hot ones (the losses' embedding all-gathers) stay on the device through NCCL. NCCL has no
CPU backend: a CPU tensor in an NCCL-only group fails at the first step of every multi-GPU run.
Launchers: torchrun (RANK, WORLD_SIZE, LOCAL_RANK), Slurm's srun (SLURM_* mapped here), or one process.
Nothing here runs at import; without an initialised group every collective is the identity.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


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


def interface_towards(addr: str) -> str | None:
    """The network interface holding the local address this host reaches `addr` from (None when that is a
    loopback address or cannot be found). gloo otherwise listens on the address the host name resolves to,
    which on many machines is 127.0.0.1: the other nodes' ranks could not reach it."""
    import fcntl
    import struct

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(addr), 9))       # UDP: picks the route, sends nothing
            local = s.getsockname()[0]
    except OSError:
        return None
    if local.startswith("127."):
        return None
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:   # SIOCGIFADDR: the interface's IPv4 address
                got = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))[20:24]
            except OSError:
                continue
        if socket.inet_ntoa(got) == local:
            return name
    return None


def detect(environ: dict | None = None) -> DistEnv:
    """Fill os.environ with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* and say which launcher started us."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and env.get("SLURM_STEP_ID") is not None:
        env.update(slurm_rank_env(env))
        launcher = "slurm"
        nodes = int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or 1)
        if nodes > 1 and "GLOO_SOCKET_IFNAME" not in env:     # ranks on several nodes: gloo on the route between
            ifname = interface_towards(env["MASTER_ADDR"])
            if ifname:
                env["GLOO_SOCKET_IFNAME"] = ifname
    else:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        launcher = "single"
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        env["MASTER_PORT"] = str(free_port())
    return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), launcher)


def launch_local(module: str, nproc: int, args: list[str]) -> dict[int, int]:
    """`torchrun --standalone --nproc-per-node N -m module ARGS`, in this process. Returns {} when every rank
    exited 0, else the failed ranks' exit codes (negative: killed by that signal), for the caller to turn into
    its own exit code (torchrun's own is 1 for any failure)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", module, *args]))
    except ChildFailedError as e:
        return {rank: f.exitcode for rank, f in e.failures.items()}
    return {}


def backend_for(cuda: bool) -> str:
    """The process-group backend string: control collectives on CPU need gloo even on GPUs."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


_timeout_s: float | None = None    # the configured timeout, for messages
_peer_lost = False                 # a collective failed on a lost rank: no barrier at shutdown


def set_default_timeout(timeout_s: float) -> None:
    """Every process group made from now on waits at most `timeout_s`, not torch's default (30 min on gloo, 10
    on NCCL): DeepSpeed makes its own groups (a clone of the world group for the gradient all-reduce) with
    `new_group()` and no timeout, and a hung rank would hold the others there that long. torch reads these
    module defaults whenever a group is made without a timeout."""
    from torch.distributed import distributed_c10d as c10d

    global _timeout_s
    _timeout_s = timeout_s
    td = datetime.timedelta(seconds=timeout_s)
    c10d.default_pg_timeout = td
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = td


def init(timeout_s: float = 300.0) -> DistEnv:
    """Process group with a bounded timeout, so a dead rank makes the others fail instead of hanging; every
    group made later (DeepSpeed's too) gets the same timeout."""
    global _peer_lost
    info = detect()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    set_default_timeout(timeout_s)
    _peer_lost = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(cuda), rank=info.rank, world_size=info.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return info


def peer_failure(e: BaseException) -> str | None:
    """What a collective's error means for people, when it means another rank was lost: 'timeout' (no answer
    within the timeout: a rank stopped or hangs) or 'lost' (its connection closed: a rank died); else None."""
    if not isinstance(e, RuntimeError) or not (dist.is_available() and dist.is_initialized()):
        return None
    text = str(e).lower()
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if any(s in text for s in ("connection closed by peer", "connection reset by peer", "broken pipe",
                               "connection refused", "socket closed")):
        return "lost"
    return None


def peer_failure_message(kind: str, rank: int, step: int, where: str) -> str:
    """One line for a rank that lost its peers (and marks the group unusable: shutdown skips its barrier)."""
    global _peer_lost
    _peer_lost = True
    wait = f"engine.dist_timeout_s={_timeout_s:g}" if _timeout_s is not None else "the process group's timeout"
    cause = (f"no answer from another rank within {wait} (a rank stopped, hangs or its node is unreachable)"
             if kind == "timeout" else "another rank's connection closed (that rank died or was killed)")
    return (f"rank {rank} at step {step}: {cause}; stopping every rank. The last checkpoint is in {where}: rerun "
            f"the same command to resume from it (raise engine.dist_timeout_s if a rank is only slow)")


def shutdown() -> None:
    """Barrier then destroy: without it gloo runs sometimes abort at exit. After a lost rank, destroy only (a
    barrier would wait for the lost rank once more)."""
    if dist.is_initialized():
        try:
            if not _peer_lost:
                dist.barrier()
        finally:
            dist.destroy_process_group()
            _forget_deepspeed_groups()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches the groups of the first process group in module globals; a second run in the
    same process (a notebook, an in-process test) would meet the destroyed ones. Reset them."""
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP",
                 "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP"):
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        if isinstance(getattr(groups, name, None), dict):
            setattr(groups, name, {})


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# --------------------------------------------------------------------------- control collectives (CPU, gloo)

def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def max_vote(value: float) -> float:
    """The largest `value` over all ranks (a stop signal number, a non-finite flag). Always a CPU tensor:
    the group routes it through gloo, whatever the device of the model."""
    t = torch.tensor([float(value)], dtype=torch.float64, device="cpu")
    if rank_world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s picklable `obj` on every rank (e.g. the checkpoint tag to resume from)."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=torch.device("cpu"))
    return box[0]


# --------------------------------------------------------------------------- data collectives (device)

def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather `x` [n, ...] along dim 0 -> [world * n, ...], rank r's rows at [r*n, (r+1)*n).

    Gradients flow back to every rank's input (the backward is a reduce-scatter *sum*). Without an
    initialised process group, or with one process, returns `x` unchanged. Shapes must match on all ranks.
    Runs on x's device (NCCL for CUDA tensors).
    """
    if rank_world()[1] == 1:
        return x
    x = x.contiguous()
    try:
        from torch.distributed._functional_collectives import all_gather_single_autograd as _ag
    except ImportError:  # torch < 2.5
        try:
            from torch.distributed._functional_collectives import all_gather_tensor_autograd as _ag
        except ImportError:
            _ag = None
    if _ag is not None:
        out = _ag(x, 0, dist.group.WORLD)
        wait = getattr(out, "wait", None)  # AsyncCollectiveTensor: materialise before indexing
        return wait() if callable(wait) else out
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(x), dim=0)


def gather_no_grad(x: Tensor) -> Tensor:
    """All-gather without gradients (labels, keys), on x's device."""
    world = rank_world()[1]
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


def global_sum(x: Tensor) -> Tensor:
    """Sum of `x` over ranks (a new tensor), on x's device."""
    if rank_world()[1] == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
