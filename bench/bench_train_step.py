"""Where the CPU training step's time goes: forward, backward and AdamW of one PaCLR step (bench/science.py's
settings: `tiny` = resnet10t, 5 channels, 32 examples = 128 images) against threads, channels_last, the
crop size, AdamW's implementation and deterministic=true; the model alone on a fixed synthetic batch, so
the data stream's share is not in it (the trainer's data_wait_share says that). Each setting's loss after
the same steps is shown beside its time: a cheaper setting must train the same.

    python bench/bench_train_step.py [--steps 6] [--repeats 2] [--threads 2]

Records into docs/BENCHMARKS.md ("CPU training step"). Settings are interleaved and repeated so a load
from other work on the machine spreads over all of them; the median of the repeats is shown.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench._report import markdown_table, write_section  # noqa: E402

BASE = dict(threads=2, channels_last=False, crop=56, kernel="for_loop", deterministic=False)
SETTINGS = [   # one change from today's step at a time (--threads sets the base's thread count)
    {}, {"threads": 1}, {"threads": 2}, {"channels_last": True}, {"kernel": "foreach"}, {"kernel": "fused"},
    {"deterministic": True}, {"crop": 48}, {"crop": 40},
]


def step_times(threads, channels_last, crop, kernel, deterministic, steps, method_name="paclr", batch=32) -> dict:
    from bench.bench_datapath import synthetic_batch
    from micon.methods import LossConfig, get_method
    from micon.models.factory import ModelConfig
    from train.trainer import optimizer_kernel, set_deterministic

    torch.set_num_threads(threads)
    set_deterministic(deterministic)
    method = get_method(method_name)
    torch.manual_seed(0)
    model = method.build_model(ModelConfig(preset="tiny"), 5, **method.feature_dims())
    if channels_last:
        model.image_encoder.use_channels_last()
    flags = optimizer_kernel(kernel, torch.device("cpu")) if kernel != "for_loop" else {"foreach": False}
    opt = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=0.05, **flags)
    data = method.to_device(synthetic_batch(method, batch, crop), torch.device("cpu"), torch.float32)
    parts = {"forward": 0.0, "backward": 0.0, "AdamW": 0.0}
    for i in range(steps + 1):   # the first step warms oneDNN's caches: not timed
        t0 = time.perf_counter()
        loss = method.loss(model, data, LossConfig())["loss"]
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if i:
            for k, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[k] += dt / steps
    set_deterministic(False)
    return parts | {"loss": float(loss.detach())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the base setting (today: all cores)")
    ap.add_argument("--no-record", action="store_true", help="print the table only")
    a = ap.parse_args()
    base = BASE | {"threads": a.threads}
    settings = [c for c in SETTINGS if not c or base | c != base]
    runs: dict[int, list[dict]] = {i: [] for i in range(len(settings))}
    for r in range(a.repeats):
        for i, change in enumerate(settings):
            runs[i].append(step_times(**(base | change), steps=a.steps))
            print(f"repeat {r + 1}/{a.repeats}, setting {i + 1}/{len(settings)}: {change or 'base'} "
                  f"{sum(runs[i][-1][k] for k in ('forward', 'backward', 'AdamW')):.2f} s/step", flush=True)
    today = statistics.median(sum(x[k] for k in ("forward", "backward", "AdamW")) for x in runs[0])
    rows = []
    for i, change in enumerate(settings):
        med = {k: statistics.median(x[k] for x in runs[i]) for k in ("forward", "backward", "AdamW", "loss")}
        total = statistics.median(sum(x[k] for k in ("forward", "backward", "AdamW")) for x in runs[i])
        s = base | change
        rows.append({"setting": ", ".join(f"{k}={v}" for k, v in change.items()) or "base",
                     "threads": s["threads"], "crop px": s["crop"], "forward s": f"{med['forward']:.3f}",
                     "backward s": f"{med['backward']:.3f}", "AdamW s": f"{med['AdamW']:.3f}",
                     "step s": f"{total:.3f}", "steps/s": f"{1 / total:.2f}", "vs base": f"{today / total:.2f}x",
                     f"loss after {a.steps + 1} steps": f"{med['loss']:.5f}"})
    table = markdown_table(rows)
    print(table)
    if not a.no_record:
        write_section(f"CPU training step ({a.threads} thread{'s' if a.threads > 1 else ''})", "One PaCLR step of `bench/science.py`'s runs (resnet10t multichannel, "
                      "5 channels, 32 examples = 128 images, fp32), model only on a fixed synthetic batch, median "
                      f"of {a.repeats} interleaved repeats of {a.steps} steps; `base` = {a.threads} thread(s), NCHW, "
                      f"AdamW's per-tensor loop, fp32 (today's step at 2 threads is torch's default here).\n\n{table}")


if __name__ == "__main__":
    main()
