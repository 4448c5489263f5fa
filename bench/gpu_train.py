"""GPU training throughput: the DeepSpeed step from shards against the bare model, ResNet-50, 5 channels,
224 px, bf16, PaCLR and MICON, with the training step's options (channels_last, fused AdamW, metrics read
every `log_every` steps, optionally torch.compile), and the data-wait share.

    python bench/gpu_train.py SHARDS GRAPHS [--steps 20] [--batch 64] [--compile]   (under 3 min of GPU time)
    python bench/gpu_train.py --smoke SHARDS GRAPHS                                   (CPU dry run, tiny model)

SHARDS/GRAPHS: e.g. those `python bench/gpu_check.py --prepare DIR` builds (DIR/shards, DIR/graphs: 256 px
sites, cropped to 224). Rows: the bare model on a fixed synthetic batch (torch AdamW, bf16 autocast: the
ceiling), then train.trainer in-process (one rank) fed from shards with today's settings and with the new
ones. Records into docs/BENCHMARKS.md ("GPU training throughput"). `run()` is what bench/gpu_check.py calls.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench._report import markdown_table, write_section  # noqa: E402

TODAY = ["engine.channels_last=off", "optim.kernel=for_loop", "wandb.log_every=1"]
NEW = ["engine.channels_last=auto", "optim.kernel=auto", "wandb.log_every=10"]


def run(preset: str, batch: int, steps: int, loader=None, method_name: str = "paclr", size: int = 224,
        channels_last: bool = False, compile: bool = False, device: str = "cuda") -> dict:
    """The bare model: forward, backward and fused AdamW under bf16 autocast on one fixed batch (or `loader`'s)."""
    from bench.bench_datapath import synthetic_batch
    from micon.methods import LossConfig, get_method
    from micon.models.factory import ModelConfig

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    method = get_method(method_name)
    model = method.build_model(ModelConfig(preset=preset, img_size=size if "vit" in preset else 0), 5,
                               **method.feature_dims()).to(dev)
    if channels_last:
        model.image_encoder.use_channels_last()
    if compile:
        model.image_encoder.compile()
    opt = torch.optim.AdamW(model.parameters(), 1e-4, fused=cuda)
    fixed = method.to_device(synthetic_batch(method, batch, size), dev, torch.float32)
    it = iter(loader) if loader is not None else None
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    data_t, t_all = 0.0, []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    warm = 5 if compile else 3
    for i in range(steps + warm):
        t0 = time.perf_counter()
        data = method.to_device(next(it), dev, torch.float32) if it is not None else fixed
        sync()
        td = time.perf_counter() - t0
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = method.loss(model, data, LossConfig())["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if i >= warm:
            t_all.append(time.perf_counter() - t0)
            data_t += td
    images = method.images_per_example * batch * steps
    return {"images/s": images / sum(t_all), "data-wait share": data_t / sum(t_all),
            "peak GB": torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")}


def trainer_run(shards: str, graphs: str, out: Path, method: str, preset: str, batch: int, steps: int, crop: int,
                workers: int, precision: str, options: list[str]) -> dict:
    """train.trainer in-process on one rank, from shards; rates from its own metrics past the first window."""
    from micon.config import load_config
    from micon.distributed import free_port
    from train.config import TrainConfig
    from train.trainer import EXIT_OK, train

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cfg = load_config(TrainConfig, None, [
        f"method={method}", f"data.shards={shards}", f"data.graphs={graphs}", f"out={out}", f"steps={steps}",
        f"micro_batch={batch}", "engine.zero_stage=1", f"engine.precision={precision}", f"model.preset={preset}",
        f"data.augment.crop={crop}", f"data.num_workers={workers}", "data.shuffle_buffer=64", "progress=false",
        "wandb.enabled=false", f"ckpt_every={steps}", "optim.warmup_steps=1", "resume=none", *options])
    t0 = time.perf_counter()
    if train(cfg) != EXIT_OK:
        raise RuntimeError(f"training {method} with {' '.join(options)} failed (see the log above)")
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # rows are windows of log_every steps: drop those holding the first steps (cuDNN autotuning, compilation,
    # the loader filling up) and weigh the rest by their steps
    first = max(5, cfg.wandb.log_every)
    steady = [r for r in rows if r["step"] > first] or rows[-1:]
    span = [(r["step"] - p["step"], r) for p, r in zip([{"step": 0}] + rows, rows) if r in steady]
    n = sum(k for k, _ in span)
    return {"images/s": sum(k * r["images_per_second"] for k, r in span) / n,
            "data-wait share": sum(k * r["data_wait_share"] for k, r in span) / n,
            "peak GB": rows[-1]["memory_mb"] / 1024, "loss": rows[-1]["loss/loss"], "wall s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards", nargs="?")
    ap.add_argument("graphs", nargs="?")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64, help="examples per GPU (PaCLR and MICON: 4 images each)")
    ap.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--compile", action="store_true", help="add torch.compile rows (about a minute each to compile)")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run: tiny model, 32 px, fp32, 4 steps")
    ap.add_argument("--work", default="runs/gpu_train")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not a.smoke:
        sys.exit("gpu_train: no CUDA GPU here; this benchmark only runs on a GPU (or pass --smoke)")
    preset, size, precision, device = ("tiny", 32, "fp32", "cpu") if a.smoke else ("resnet50", 224, "bf16", "cuda")
    if a.smoke:
        a.steps, a.batch, a.workers = 2, 4, 0
    if cuda:
        torch.backends.cudnn.benchmark = True
    t_start, rows = time.perf_counter(), []

    def row(part, method, r, **extra):
        rows.append({"part": part, "method": method, "images/s": f"{r['images/s']:.0f}",
                     "data-wait share": f"{r['data-wait share']:.2f}" if "loss" in r else "-",
                     "peak GB": f"{r['peak GB']:.1f}", "vs bare (channels_last)": "-", **extra})
        print(f"{part:55s} {method:6s} {r['images/s']:8.0f} images/s  ({time.perf_counter() - t_start:.0f} s so far)",
              flush=True)

    bare = {}
    for method, cl in (("paclr", False), ("paclr", True), ("micon", True)):
        torch.cuda.empty_cache() if cuda else None
        bare[method, cl] = run(preset, a.batch, a.steps, method_name=method, size=size, channels_last=cl,
                               device=device)
        row(f"bare model, synthetic batch{', channels_last' if cl else ''}", method, bare[method, cl])
    if a.compile:
        row("bare model, synthetic batch, channels_last + compile", "paclr",
            run(preset, a.batch, a.steps, method_name="paclr", size=size, channels_last=True, compile=True,
                device=device))
    if a.shards:
        new = "channels_last, fused AdamW, log_every 10"
        plan = [("paclr", "today's step", TODAY, a.batch), ("paclr", new, NEW, a.batch),
                ("micon", new, NEW, a.batch), ("paclr", f"{new}, {4 * a.batch} examples", NEW, 4 * a.batch)]
        if a.compile:
            plan.append(("paclr", "the new step + engine.compile", NEW + ["engine.compile=true"], a.batch))
        for method, label, options, batch in plan:
            torch.cuda.empty_cache() if cuda else None
            r = trainer_run(a.shards, a.graphs, Path(a.work) / f"{method}-{len(rows)}", method, preset, batch,
                            a.steps, size, a.workers, precision, options)
            ratio = r["images/s"] / bare[method, True]["images/s"]
            row(f"DeepSpeed ZeRO 1 from shards, {label}", method, r, **{"vs bare (channels_last)": f"{ratio:.0%}"})
            print(markdown_table(rows), flush=True)   # the table so far: a time limit keeps what was measured
    table = markdown_table(rows)
    print(table)
    if a.smoke:
        return
    write_section("GPU training throughput", f"{preset}, 5 channels, {size} px, bf16, {a.batch} examples per step "
                  f"(4 images each), {a.steps} timed steps, {a.workers} loader workers; {time.perf_counter() - t_start:.0f} s "
                  f"in all.\n\n{table}")


if __name__ == "__main__":
    main()
