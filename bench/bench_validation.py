"""What validation during training costs: one training with val.every on the demo screen (CPU), the seconds
of each validation against the training steps between validations; the same worked out for the GPU configs
from their measured rates.

    python bench/bench_validation.py [--out runs/bench_validation] [--steps 40] [--every 10] [--write]

The screen (preset demo, 20% of the compounds held out) is written once under OUT. Each validation embeds the
held-out wells' sites with the live encoder (forward only, eval mode), builds profiles and scores them; the
training throughput excludes it (the window restarts after it). --write puts the table in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._report import markdown_table, write_section  # noqa: E402

# the GPU configs' measured rates (docs/BENCHMARKS.md, "GPU check" and "GPU check: the Ray embed job"): a
# ResNet-50 MICON step (4 images per example) at ~1,800 images/s forward and backward on one H100, and the embed
# actor's forward at ~300-490 sites/s, bound by the CPU-side preprocessing, which validation shares
GPU_TRAIN_IMAGES_S = 1800.0
GPU_EMBED_SITES_S = 400.0


def run(args: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    if rc:
        raise SystemExit(f"{' '.join(args[:3])} exited {rc}; see {log}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_validation")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "screen" / "ground_truth").is_dir():
        run(["data_prep.synth", str(out / "screen"), "preset=demo", "seed=0"], out / "synth.log")
    if not (out / "shards" / "manifest.json").is_file():
        run(["data_prep.ingest", str(out / "screen"), str(out / "shards"), "heldout_compound_fraction=0.2",
             "workers=2"], out / "ingest.log")
    if not (out / "graphs").is_dir():
        run(["data_prep.featurize", str(out / "screen" / "metadata" / "compound.csv.gz"), str(out / "graphs")],
            out / "featurize.log")
    runs = out / "train"
    if not (runs / "final.json").is_file():
        run(["train.run", "-", f"data.shards={out / 'shards'}", f"data.graphs={out / 'graphs'}", f"out={runs}",
             f"steps={a.steps}", f"micro_batch={a.micro_batch}", f"ckpt_every={a.steps}", "progress=false",
             "wandb.enabled=false", f"val.every={a.every}", "val.max_wells=512", "data.num_workers=1"],
            out / "train.log")
    rows = [json.loads(x) for x in (runs / "metrics.jsonl").read_text().splitlines() if x.strip()]
    val = [r for r in rows if "val/seconds" in r]
    steps = [r["step_time"] for r in rows if r["step"] > 2]           # past the first steps' warm-up
    step_s = sorted(steps)[len(steps) // 2]
    first, rest = val[0]["val/seconds"], [r["val/seconds"] for r in val[1:]]
    again = sorted(rest)[len(rest) // 2] if rest else first
    log = (runs / "../train.log").resolve().read_text()
    line = next((x for x in log.splitlines() if "validation (val.split" in x), "")
    n_sites = int(line.split(" sites,")[0].rsplit(" ", 1)[1]) if " sites," in line else 0
    n_wells = int(val[0].get("val/n_wells", 0)) or int(line.split("): ")[1].split(" wells")[0]) if line else 0
    table = []
    for every in (a.every, 100, 500, 1000):
        table.append(["this CPU (measured)", f"{a.micro_batch} MICON examples, resnet tiny preset, 96 px",
                      every, f"{step_s:.2f}", f"{again:.2f}", f"{again / (every * step_s + again):.1%}"])
    gpu_step = 256 * 4 / GPU_TRAIN_IMAGES_S
    gpu_val = 2048 / GPU_EMBED_SITES_S + 2.0          # 512 wells x 4 sites, plus ~2 s of profiles and scoring
    for every in (100, 500, 1000):
        table.append(["H100 (worked out)", "256 MICON examples, ResNet-50, 224 px, 512 wells x 4 sites", every,
                      f"{gpu_step:.2f}", f"{gpu_val:.1f}", f"{gpu_val / (every * gpu_step + gpu_val):.1%}"])
    body = (f"One training of {a.steps} steps with `val.every={a.every}` on the demo screen ({n_wells} validation "
            f"wells, {n_sites} sites, held-out compounds with their plates' DMSO): the first validation took "
            f"{first:.2f} s (it reads and decodes the sites once), each later one {again:.2f} s (median; embedding "
            f"forward only, profiles, NSB/NSS top-k and mAP of activity), against a median training step of "
            f"{step_s:.2f} s. The share is validation time over training time between two validations.\n\n"
            + markdown_table([dict(zip(["where", "step", "val.every", "step s", "validation s",
                                        "share of training time"], r)) for r in table])
            + "\n\nThe GPU rows are arithmetic, not measured: a ResNet-50 MICON step of 256 examples (1,024 images) at "
              f"the measured ~{GPU_TRAIN_IMAGES_S:,.0f} images/s of one H100 ({gpu_step:.2f} s), and a validation of "
              f"512 wells x 4 sites at the embed actor's measured ~{GPU_EMBED_SITES_S:.0f} sites/s (bound by the "
              "CPU-side preprocessing) plus ~2 s of scoring. On a GPU, `val.every=500` or more keeps the cost "
              "near 1-3%; with N ranks each embeds 1/N of the sites.")
    print(body)
    if a.write:
        write_section("Validation during training: its cost", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
