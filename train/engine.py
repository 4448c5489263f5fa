"""The DeepSpeed engine's settings: its JSON config, the AdamW kernel, the learning-rate schedule,
determinism switches, the device memory a log line reports, and where torch builds DeepSpeed's JIT op."""
from __future__ import annotations

import math
import os
import resource
import sys

import torch


def ds_config(cfg, world_size: int, bf16: bool) -> dict:
    """DeepSpeed's configuration. bf16: bf16 weights and activations, DeepSpeed's fp32 master weights and AdamW
    state, and gradients summed over the ranks in fp32 (one rounding to bf16 at the end instead of one per
    hop, which grows with the number of ranks; twice the bytes of a bf16 reduction, ~100 MB a step for
    ResNet-50, hidden behind backward). docs/BENCHMARKS.md ("ZeRO stage and precision") says why ZeRO 1."""
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.engine.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.engine.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "bf16": {"enabled": bf16},
        "communication_data_type": "fp32",
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def optimizer_kernel(kernel: str, device: torch.device) -> dict:
    """torch AdamW's implementation flags for optim.kernel: fused (one kernel for every tensor; CUDA and CPU) or
    foreach (one kernel per operation over all tensors); auto = fused on GPUs, foreach on CPU. The three give
    the same update within float rounding. Under ZeRO 1/2 the optimizer sees DeepSpeed's flat fp32 partitions
    (one tensor per group), so the choice matters most with engine.zero_stage=0."""
    if kernel == "auto":
        kernel = "fused" if device.type == "cuda" else "foreach"
    return {"fused": kernel == "fused", "foreach": kernel == "foreach"}


def set_deterministic(on: bool) -> tuple[bool, bool, bool, bool]:
    """deterministic=true: torch's deterministic algorithms everywhere (an op without one fails with its name)
    and cuDNN without autotuning; cuBLAS needs its workspace fixed before its first use. CPU runs then repeat
    bit for bit at the same thread count (intra-op reductions are split by thread). Returns the previous
    settings, for `restore_determinism`."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                torch.backends.cudnn.benchmark, torch.utils.deterministic.fill_uninitialized_memory)
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)
    # torch then also fills every uninitialised tensor (torch.empty) with NaN, a memory pass per allocation
    # that tripled the CPU step here; it only guards against reading uninitialised memory
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on and torch.cuda.is_available()
    return previous


def restore_determinism(previous: tuple[bool, bool, bool, bool]) -> None:
    torch.use_deterministic_algorithms(previous[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[1], previous[2]
    torch.utils.deterministic.fill_uninitialized_memory = previous[3]


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up then cosine decay to min_ratio of the base rate (a picklable closure target)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        t = min(1.0, (step - warmup) / max(total - warmup, 1))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def environment_extensions() -> str:
    """Keep torch's JIT-built extensions (DeepSpeed's shm op) inside this Python environment:
    TORCH_EXTENSIONS_DIR defaults to <sys.prefix>/torch_extensions. In the shared ~/.cache/torch_extensions,
    two checkouts' environments rebuild the op in turn (its hash holds the source path), about a minute each
    time. Torch serialises a build with an OS-level lock that a killed build releases. Returns the directory."""
    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
