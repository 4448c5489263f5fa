"""The prepared GPU check: one command for a single-GPU machine, under 8 minutes, one table.

    bash bench/gpu_check.sh                 (on the GPU machine, with the project's environment)
    python bench/gpu_check.py --smoke       (a CPU dry run of the same plumbing, tiny everything)

Rows: (1) each method's training step in bf16 on synthetic 5-channel 224 px tensors for ResNet-50 and
ViT-S/16 (model only: images/s, peak memory); (2) a few DeepSpeed steps of each method with ZeRO 1 and
ZeRO 2 in bf16, fed from shards of a synthetic screen stored at 256 px and cropped to 224 (images/s,
data-wait share, peak memory, from the job's own metrics); (3) the Ray embed job on the GPU (sites/s, and
whether its bytes equal the in-process reference). `--only embed` (what bench/gpu_check.sh runs) gives (3)
alone, with an initialised encoder and no training. Writes the table to docs/BENCHMARKS.md ("GPU check") with
the card's name, and to --table FILE. Tests never run it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._report import markdown_table, write_section  # noqa: E402

BUDGET_S = 7.5 * 60


def sh(args: list[str], log: Path, env: dict | None = None, timeout: float = 300) -> float:
    """Run one job; its output goes to `log`; returns seconds; raises with the log's tail on failure."""
    t0 = time.perf_counter()
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))   # keep carried packages
    with open(log, "w") as fh:
        proc = subprocess.run(args, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": path, "WANDB_MODE": "offline",
                                   "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} ... exited {proc.returncode}:\n{log.read_text()[-2000:]}")
    return time.perf_counter() - t0


def train_row(data: Path, work: Path, method: str, zero: int, preset: str, a) -> dict:
    out = work / f"train-{method}-z{zero}-{preset}"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    args = [torchrun, "--standalone", "--nproc-per-node", "1", "-m", "train.run", "-", f"method={method}",
            f"data.shards={data / 'shards'}", f"data.graphs={data / 'graphs'}", f"out={out}", f"steps={a.steps}",
            f"micro_batch={a.batch}", f"engine.zero_stage={zero}", f"engine.precision={a.precision}",
            f"model.preset={preset}", f"data.augment.crop={a.crop}", f"data.num_workers={a.workers}",
            "data.shuffle_buffer=64", "data.pair_buffer=4096", "progress=false", "wandb.enabled=false",
            f"ckpt_every={a.steps}", "optim.warmup_steps=1"]
    if "vit" in preset:
        args.append(f"model.img_size={a.crop}")
    seconds = sh(args, work / f"{out.name}.log", timeout=240)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = rows[2:] or rows          # the first steps compile kernels and fill the loader
    final = json.loads((out / "final.json").read_text())
    return {"part": "DeepSpeed from shards", "method": method, "preset": preset, "ZeRO": zero,
            "precision": final["precision"], "images/s": f"{statistics.median(r['images_per_second'] for r in steady):.0f}",
            "data-wait share": f"{statistics.median(r['data_wait_share'] for r in steady):.2f}",
            "peak memory GB": f"{rows[-1]['memory_mb'] / 1024:.2f}", "wall s": f"{seconds:.0f}",
            "final loss": f"{final['loss']:.3f}"}


def synthetic_rows(a) -> list[dict]:
    import torch

    from bench.gpu_train import run
    from micon.methods import METHODS

    rows = []
    for preset in a.presets:
        for name in METHODS:
            torch.cuda.empty_cache()
            r = run(preset, a.batch, a.steps, method_name=name, size=a.crop)
            rows.append({"part": "model only, synthetic tensors", "method": name, "preset": preset, "ZeRO": "-",
                         "precision": "bf16 autocast", "images/s": f"{r['images/s']:.0f}", "data-wait share": "-",
                         "peak memory GB": f"{r['peak GB']:.2f}", "wall s": "-", "final loss": "-"})
    return rows


def prepare(work: Path, a, py: str) -> None:
    """The synthetic screen, its shards and compound graphs (needs RDKit and Ray, no GPU)."""
    sh([py, "-m", "data_prep.synth", str(work / "screen"), "preset=tiny", f"image_size={a.size}", "n_compounds=24",
        "sites_per_well=1"], work / "synth.log")   # small enough to travel to a GPU machine (< 64 MiB)
    sh([py, "-m", "data_prep.ingest", str(work / "screen"), str(work / "shards"), "shard_mb=1"], work / "prep.log")
    sh([py, "-m", "data_prep.featurize", str(work / "screen" / "metadata" / "compound.csv.gz"), str(work / "graphs")],
       work / "featurize.log")


def tiled_shards(src: Path, dst: Path, k: int) -> Path:
    """The shard set at `src` listed `k` times (links to the same tars under new names): a larger embed
    input without carrying more bytes to the GPU machine. Site keys repeat; the check only times the job."""
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "shards").mkdir(parents=True)
    for entry in src.iterdir():
        if entry.name not in ("shards", "manifest.json", "replicate_sets"):
            (dst / entry.name).symlink_to(entry.resolve())
    doc = json.loads((src / "manifest.json").read_text())
    shards = []
    for j in range(k):
        for sh_ in doc["shards"]:
            name = sh_["name"].replace(".tar", f"-t{j}.tar")
            (dst / "shards" / name).symlink_to((src / "shards" / sh_["name"]).resolve())
            shards.append({**sh_, "name": name})
    doc["shards"], doc["n_sites"] = shards, doc["n_sites"] * k
    (dst / "manifest.json").write_text(json.dumps(doc))
    return dst


def make_checkpoint(data: Path, work: Path, preset: str) -> Path:
    """A model.pt of the `preset` image encoder (SimCLR, as initialised: the weights do not change the cost),
    written without a training run, for the shard set's channels."""
    import torch

    from micon.checkpoint import InferenceRecord, save_model_file
    from micon.methods import get_method
    from micon.models.factory import ModelConfig

    channels = json.loads((data / "shards" / "manifest.json").read_text())["channels"]
    cfg = ModelConfig(preset=preset)
    torch.manual_seed(0)
    model = get_method("simclr").build_model(cfg, len(channels))
    path = work / f"init-{preset}" / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model_file(path, model.state_dict(), InferenceRecord(method="simclr", model=vars(cfg), channels=channels,
                                                              preprocessing={"normalize": "plate"}),
                    {"method": "simclr", "seed": 0}, {"step": 0})
    return path


def embed_rows(data: Path, work: Path, ckpt: Path, preset: str, tiles: int) -> list[dict]:
    """The Ray embed job (python -m evaluate.embed: CPU decode tasks feeding one actor per GPU) on the shard
    set and on it listed `tiles` times: wall time with Ray's start-up, and the steady rate from the difference
    of the two runs; whether its bytes equal the in-process reference (embed_shard, the code of the actor
    before); and that reference's own rate with 1 and 12 decode threads. Without Ray (a wheel over the device
    tool's carry limit) only the in-process rows."""

    from evaluate.embed import SiteEncoder, embed_shard
    from micon.embeddings import part_path, read_part

    rows = []
    n_sites = json.loads((data / "shards" / "manifest.json").read_text())["n_sites"]
    try:
        import ray  # noqa: F401
        have_ray = True
    except ImportError:
        have_ray = False
    env = {"MICON_RAY_OBJECT_STORE_MB": os.environ.get("MICON_RAY_OBJECT_STORE_MB", "8192")}
    enc = SiteEncoder(str(ckpt), str(data / "shards"))
    manifest = enc.manifest
    ref = work / "embed-reference"
    (ref / "parts").mkdir(parents=True, exist_ok=True)
    threads = max(1, min(12, (os.cpu_count() or 2) - 2))
    for t in dict.fromkeys((1, threads)):
        for rep in range(2):                 # the second pass is timed: CUDA start-up and kernel choice excluded
            t1 = time.perf_counter()
            for s in manifest.data["shards"]:
                embed_shard(enc, str(manifest.root / "shards" / s["name"]), ref, 128, len(manifest.channels),
                            threads=t)
        rows.append({"part": f"before: the actor's code in-process (decode in {t} thread(s))", "method": "image encoder",
                     "preset": preset, "images/s": f"{n_sites / (time.perf_counter() - t1):.0f} sites/s"})
    if have_ray:
        walls = {}
        for k in (1, tiles):
            src = data / "shards" if k == 1 else tiled_shards(data / "shards", work / f"shards-x{k}", k)
            out = work / f"embed-x{k}"
            walls[k] = sh([sys.executable, "-m", "evaluate.embed", str(ckpt), str(src), str(out), "batch_size=128"],
                          work / f"embed-x{k}.log", env=env, timeout=300)
            rows.append({"part": f"Ray embed job, {n_sites * k} sites (start-up incl.)", "method": "image encoder",
                         "preset": preset, "images/s": f"{n_sites * k / walls[k]:.0f} sites/s", "wall s": f"{walls[k]:.0f}"})
        extra = walls[tiles] - walls[1]
        rate = f"{n_sites * (tiles - 1) / extra:.0f} sites/s" if extra > 0.5 else "n/a (no slower than the small run)"
        rows.append({"part": f"Ray embed job, steady (difference of the {n_sites * tiles}- and {n_sites}-site runs)",
                     "method": "image encoder", "preset": preset, "images/s": rate})
        same = all(read_part(part_path(work / "embed-x1", s["name"]))[0].tobytes()
                   == read_part(part_path(ref, s["name"]))[0].tobytes() for s in manifest.data["shards"])
        rows.append({"part": "Ray embed job: bytes equal to the in-process reference on this GPU",
                     "method": "image encoder", "preset": preset, "images/s": "yes" if same else "NO"})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU dry run: tiny model, 32 px, 2 steps")
    ap.add_argument("--work", default="", help="scratch directory (default: a temporary one)")
    ap.add_argument("--prepare", default="", metavar="DIR",
                    help="only build the screen, shards and graphs into DIR (no GPU needed) and stop")
    ap.add_argument("--only", choices=["all", "embed"], default="all",
                    help="embed: one short training run for a checkpoint, then the embed rows only")
    ap.add_argument("--tiles", type=int, default=8, help="the embed job's larger input: the shard set listed N times")
    ap.add_argument("--table", default="", metavar="FILE", help="also write the table (markdown) to FILE")
    ap.add_argument("--prepared", default="", metavar="DIR",
                    help="use the screen, shards and graphs that --prepare built (a GPU machine without RDKit/Ray)")
    a = ap.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not a.smoke and not a.prepare:
        print("gpu_check: no CUDA GPU here; run it on a GPU machine, or pass --smoke for a CPU dry run")
        return 2
    if a.smoke:
        a.presets, a.crop, a.batch, a.steps, a.workers, a.precision, a.size = ["tiny"], 32, 4, 3, 0, "fp32", 64
    else:
        a.presets, a.crop, a.batch, a.steps, a.workers, a.precision, a.size = (
            ["resnet50", "vit_small_patch16_224"], 224, 32, 8, min(8, max(1, (os.cpu_count() or 2) - 2)), "bf16", 256)
    t_start = time.perf_counter()
    work = Path(a.prepare or a.work or tempfile.mkdtemp(prefix="micon-gpu-check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    print(f"gpu_check: scratch {work}; device {torch.cuda.get_device_name(0) if gpu else 'CPU (smoke)'}", flush=True)
    data = Path(a.prepared).resolve() if a.prepared else work
    if not a.prepared:
        prepare(work, a, py)
    if a.prepare:
        shutil.rmtree(work / "screen")   # the raw TIFFs: the check reads shards only
        print(f"gpu_check: prepared {work}; on the GPU machine: bash bench/gpu_check.sh --prepared {work.name}")
        return 0
    print(f"gpu_check: screen, shards and graphs ready in {time.perf_counter() - t_start:.0f} s", flush=True)
    rows = synthetic_rows(a) if gpu and a.only == "all" else []
    from micon.methods import METHODS
    plan = [(m, z, a.presets[0]) for m in METHODS for z in (1, 2)] + [(list(METHODS)[0], 2, p) for p in a.presets[1:]]
    if a.only == "embed":   # the embed rows need no training: a checkpoint of the initialised encoder
        plan = []
    for method, zero, preset in plan:
        if time.perf_counter() - t_start > BUDGET_S:
            rows.append({"part": "DeepSpeed from shards", "method": method, "preset": preset, "ZeRO": zero,
                         "images/s": "skipped: time budget"})
            continue
        try:
            rows.append(train_row(data, work, method, zero, preset, a))
        except Exception as e:   # one failing configuration is a finding, not the end of the check
            rows.append({"part": "DeepSpeed from shards", "method": method, "preset": preset, "ZeRO": zero,
                         "images/s": f"FAILED: {str(e).splitlines()[0][:120]}"})
        print(f"gpu_check: {rows[-1]}", flush=True)

    try:
        rows += embed_rows(data, work, make_checkpoint(data, work, a.presets[0]), a.presets[0], a.tiles)
    except Exception as e:
        rows.append({"part": "embed", "images/s": f"FAILED: {str(e).splitlines()[0][:120]}"})
    columns = ["part", "method", "preset", "ZeRO", "precision", "images/s", "data-wait share", "peak memory GB",
               "wall s", "final loss"]
    table = markdown_table([{c: r.get(c, "") for c in columns if any(c in x for x in rows)} for r in rows])
    print(table)
    if a.table:
        Path(a.table).write_text(table + "\n")
    print(f"gpu_check: done in {time.perf_counter() - t_start:.0f} s")
    if gpu and a.only == "embed":
        write_section("GPU check: the Ray embed job", f"""`bash bench/gpu_check.sh --only embed`: a ResNet-50
image encoder (as initialised; the weights do not change the cost) embeds the synthetic screen's {a.size} px
shards with `python -m evaluate.embed CKPT SHARDS OUT batch_size=128` (Ray CPU tasks decode chunks of each shard
and feed one actor per GPU, which normalises on the device from pinned memory), on the shard set and on it listed
{a.tiles} times; the steady rate is the difference of the two. Beside it the actor's code before (decode and
preprocessing in the actor, 1 and 12 threads, in one process, second pass timed) and whether the job's bytes
equal it on this GPU.

{table}""")
    elif gpu:
        write_section("GPU check", f"""`bash bench/gpu_check.sh`: 5 channels, crop {a.crop} px from shards stored at
{a.size} px (synthetic screen), {a.batch} examples per step, {a.steps} steps per DeepSpeed run (median of steps 3+),
{a.workers} loader workers; images/s counts every image of an example (MICON/PaCLR: 4, CLIP/SimCLR: 2).

{table}""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
