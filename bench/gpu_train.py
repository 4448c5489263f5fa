"""GPU training throughput: images/s and data-wait share for the ResNet-50 and ViT-S/16 presets in bf16
on one GPU at 224 px with 5 channels, first with synthetic tensors (model only), then fed from shards.

    python bench/gpu_train.py [SHARDS GRAPHS] [--steps N] [--batch B]

Needs a CUDA GPU; records into docs/BENCHMARKS.md ("GPU training throughput").
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench._report import markdown_table, write_section  # noqa: E402


def run(preset: str, batch: int, steps: int, loader=None, method_name: str = "paclr", size: int = 224) -> dict:
    from bench.bench_datapath import synthetic_batch
    from micon.methods import LossConfig, get_method
    from micon.models.factory import ModelConfig

    dev = torch.device("cuda")
    method = get_method(method_name)
    model = method.build_model(ModelConfig(preset=preset, img_size=size if "vit" in preset else 0), 5,
                               **method.feature_dims()).to(dev)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    fixed = method.to_device(synthetic_batch(method, batch, size), dev, torch.float32)
    it = iter(loader) if loader is not None else None
    data_t, t_all = 0.0, []
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 3):
        t0 = time.perf_counter()
        data = method.to_device(next(it), dev, torch.float32) if it is not None else fixed
        torch.cuda.synchronize()
        td = time.perf_counter() - t0
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = method.loss(model, data, LossConfig())["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        if i >= 3:
            t_all.append(time.perf_counter() - t0)
            data_t += td
    images = method.images_per_example * batch * steps
    return {"images/s": images / sum(t_all), "data-wait share": data_t / sum(t_all),
            "peak GB": torch.cuda.max_memory_allocated() / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("shards", nargs="?")
    ap.add_argument("graphs", nargs="?")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_train: no CUDA GPU here; this benchmark only runs on a GPU")
    torch.backends.cudnn.benchmark = True
    rows = []
    for preset in ("resnet50", "vit_small_patch16_224"):
        r = run(preset, args.batch, args.steps)
        rows.append({"preset": preset, "input": "synthetic tensors", **{k: f"{v:.2f}" for k, v in r.items()}})
        if args.shards:
            from micon.data.pipeline import Augment, ExampleStream, StreamConfig, collate_identity
            from micon.methods import get_method
            cfg = StreamConfig(needs=get_method("paclr").needs, batch_size=args.batch, augment=Augment(crop=224))
            ds = ExampleStream(args.shards, cfg, 0, 1, args.workers, args.graphs)
            loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=args.workers,
                                                 collate_fn=collate_identity, pin_memory=True, prefetch_factor=4)
            r = run(preset, args.batch, args.steps, loader)
            rows.append({"preset": preset, "input": f"shards, {args.workers} workers",
                         **{k: f"{v:.2f}" for k, v in r.items()}})
    table = markdown_table(rows)
    print(table)
    write_section("GPU training throughput", f"bf16 autocast, 224 px, 5 channels, batch {args.batch} examples "
                  f"(4 images each: PaCLR step).\n\n{table}")


if __name__ == "__main__":
    main()
