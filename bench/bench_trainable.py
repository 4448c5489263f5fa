"""What model.trainable saves: the official recipe's model (ResNet-101 per channel, 1,000-d, fingerprint MLP) with
every parameter training against only the last stage (layer4 + heads) or only the heads.

    python bench/bench_trainable.py [--size 64] [--batch 4] [--repeats 3] [--write]
    python bench/bench_trainable.py --device cuda --size 224 --batch 64 --write      (the GPU check's part)

For each setting: trainable parameters, the AdamW state torch actually allocates after one step (measured: the
sum of the optimiser's state tensors), what DeepSpeed adds per trainable parameter under bf16 (fp32 master
weights and fp32 gradients: arithmetic), and the CPU time of one MICON step at a small size (measured; backward
stops at the first trainable layer). --write appends the table to docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(trainable: str):
    from micon.methods import get_method
    from micon.models.factory import ModelConfig

    cfg = ModelConfig(preset="resnet101", mode="per_channel", per_channel_dim=200, trainable=trainable,
                      molecule="fingerprint", molecule_dim=512, projection_dim=512)
    torch.manual_seed(0)
    return get_method("micon").build_model(cfg, 5, fingerprint_bits=1024)


def step_batch(batch: int, size: int):
    g = torch.Generator().manual_seed(0)
    return {"views": torch.randn(batch, 2, 5, size, size, generator=g),
            "controls": torch.randn(batch, 2, 5, size, size, generator=g),
            "molecules": (torch.rand(batch, 1024, generator=g) < 0.05).float(),
            "labels": torch.arange(batch)}


def measure(trainable: str, batch: int, size: int, repeats: int, device: str = "cpu") -> dict:
    from micon.methods import LossConfig, get_method

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    model = build(trainable).to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if cuda else {"foreach": True}))
    data = {k: v.to(dev) for k, v in step_batch(batch, size).items()}
    method, cfg = get_method("micon"), LossConfig(temperature=1.0)
    times = []
    for i in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
            loss = method.loss(model, data, cfg)["loss"]
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if i:   # the first step allocates the optimiser state
            times.append(time.perf_counter() - t0)
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                      if torch.is_tensor(t) and t.dim() > 0)
    n_train = sum(p.numel() for p in params)
    return {"trainable": trainable, "params": sum(p.numel() for p in model.parameters()), "train": n_train,
            "adamw_mb": state_bytes / 2**20,
            # DeepSpeed bf16 + ZeRO 0/1 on one GPU: fp32 master copy (4 B) + fp32 gradient buffer (4 B) + AdamW (8 B)
            "ds_bf16_mb": n_train * 16 / 2**20, "step_s": statistics.median(times),
            "images_s": batch * 4 / statistics.median(times),
            "peak_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else float("nan")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64, help="image size (px) for the timed step")
    ap.add_argument("--batch", type=int, default=4, help="MICON examples per step (4 images x 5 channels each)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (bf16 autocast, fused AdamW)")
    ap.add_argument("--write", action="store_true", help="append the table to docs/BENCHMARKS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [measure(t, args.batch, args.size, args.repeats, args.device) for t in ("all", "last_stage", "head")]
    where = (torch.cuda.get_device_name(0) if args.device.startswith("cuda") else
             f"{platform.machine()} ({torch.get_num_threads()} threads)")
    full = rows[0]
    lines = ["| model.trainable | trainable parameters | AdamW state, measured (MB) | with DeepSpeed bf16 master "
             "weights and fp32 grads (16 B per trainable parameter), arithmetic (MB) | step (s), measured | step vs all | "
             "images/s | peak GB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['trainable']} | {r['train']:,} of {r['params']:,} ({100 * r['train'] / r['params']:.0f}%) "
                     f"| {r['adamw_mb']:.0f} | {r['ds_bf16_mb']:.0f} | {r['step_s']:.2f} | "
                     f"{r['step_s'] / full['step_s']:.2f}x | {r['images_s']:.0f} | {r['peak_gb']:.1f} |")
    cmd = "python bench/bench_trainable.py " + " ".join(argv if argv is not None else sys.argv[1:])
    head = (f"`{cmd.strip()}` on {where} (torch {torch.__version__}): "
            f"the official recipe's MICON (ResNet-101 per channel, per_channel_dim 200, Morgan MLP), one step of "
            f"{args.batch} examples at {args.size} px")
    text = head + "\n\n" + "\n".join(lines)
    print(text)
    print(f"\nlast_stage saves {full['adamw_mb'] - rows[1]['adamw_mb']:.0f} MB of AdamW state "
          f"({1 - rows[1]['adamw_mb'] / full['adamw_mb']:.0%}) and "
          f"{full['ds_bf16_mb'] - rows[1]['ds_bf16_mb']:.0f} MB in all under DeepSpeed bf16")
    if args.write:
        with open(ROOT / "docs" / "BENCHMARKS.md", "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
