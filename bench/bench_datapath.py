"""The MICON training data path, plate shards + pairing buffer + control bank (before) against replicate-set
shards (now), side by side at three scales:

  1. real streams over real shard sets (the demo screen, the JUMP-structured `jumplike` screen, and a
     screen stored at 256 px for throughput): images used per image read, bytes read per example against
     the bytes of the images it uses, peak RSS of one loader worker, MICON examples/s per worker, pairs
     across sources, controls from the treated site's own plate;
  2. a metadata-only simulation over cpg0016's real plate maps (a JUMP `well.csv.gz` + `plate.csv.gz`;
     9 sites per well, 8 ranks x 10 workers, the buffers of train/configs/micon.yaml) driving the real
     ReplicatePairer / shard split and the real replicate-set planner.

    python bench/bench_datapath.py [--work DIR] [--wells ../shared/jump-metadata/well.csv.gz]
                                   [--plates ../shared/jump-metadata/plate.csv.gz] [--quick]

Missing screens are written under --work (synth + prep + featurize: a few minutes). Numbers go to
docs/BENCHMARKS.md ("Training data path").
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._report import markdown_table, write_section  # noqa: E402
from micon.methods import LossConfig, get_method  # noqa: E402

SITE_KB_256 = 134.6        # stored kB per 5-channel site at 256 px, dzstd ("Site storage formats")
DECODED_KB_256 = 5 * 256 * 256 / 1e3


# ------------------------------------------------------------------------------------------ model step

def synthetic_batch(method, batch, size, seed=0) -> dict:
    """A CPU batch shaped like the stream's for `method` (random pixels, random small graphs)."""
    from micon.chem.graph import MolGraph, collate_graphs

    g = torch.Generator().manual_seed(seed)
    out = {"views": torch.randn(batch, 2, 5, size, size, generator=g), "labels": torch.arange(batch)}
    if method.needs.controls:
        out["controls"] = torch.randn(batch, 2, 5, size, size, generator=g)
    if method.needs.graphs:
        dims = method.feature_dims()
        rng = np.random.default_rng(seed)
        src = np.repeat(np.arange(11), 2)[:22]
        out["graphs"] = collate_graphs([
            MolGraph(rng.random((12, dims["atom_dim"]), dtype=np.float32),
                     rng.random((22, dims["bond_dim"]), dtype=np.float32), np.stack([src % 12, (src + 1) % 12]))
            for _ in range(batch)])
    return out


def model_step(preset, size, batch, method_name="micon"):
    from micon.models.factory import ModelConfig

    method = get_method(method_name)
    torch.manual_seed(0)
    model = method.build_model(ModelConfig(preset=preset), 5, **method.feature_dims())
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    data = method.to_device(synthetic_batch(method, batch, size), torch.device("cpu"), torch.float32)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        loss = method.loss(model, data, LossConfig())["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


# ------------------------------------------------------------------------------------------ real streams

def stream_child(shards: str, graphs: str, rsets: bool, batches: int, warmup: int, crop: int,
                 shuffle_buffer: int, pair_buffer: int) -> dict:
    """One loader worker's stream, in this (fresh) process: counters between warm-up and the end."""
    from micon.data.pipeline import Augment, ExampleStream, StreamConfig

    torch.set_num_threads(1)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = StreamConfig(needs=get_method("micon").needs, batch_size=16, shuffle_buffer=shuffle_buffer,
                       pair_buffer=pair_buffer, replicate_sets=rsets,
                       augment=Augment(crop=crop, intensity_jitter=0.1))
    it = iter(ExampleStream(shards, cfg, 0, 1, 1, graphs))
    first = None
    for _ in range(warmup):
        first = next(it)["counts"]
    t0 = time.perf_counter()
    for _ in range(batches):
        last = next(it)["counts"]
    seconds = time.perf_counter() - t0
    d = {k: last.get(k, 0) - (first or {}).get(k, 0) for k in last}
    return {"counts": d, "total": last, "seconds": seconds,
            "rss_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024}


def run_stream(shards, graphs, rsets, batches, warmup, crop, shuffle_buffer=128, pair_buffer=4096) -> dict:
    args = json.dumps(dict(shards=str(shards), graphs=str(graphs), rsets=rsets, batches=batches, warmup=warmup,
                           crop=crop, shuffle_buffer=shuffle_buffer, pair_buffer=pair_buffer))
    proc = subprocess.run([sys.executable, __file__, "--child", args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stream_row(screen: str, path: str, r: dict) -> dict:
    """Ratios over the whole run (buffer fills included: conservative) and over the timed window (steady
    state), speed over the timed window."""
    c, w = r["total"], r["counts"]
    ex = max(c.get("examples", 0), 1)
    pairs = sum(v for k, v in c.items() if k.startswith("pairs_across_"))
    ctl = sum(v for k, v in c.items() if k.startswith("controls_"))
    ratio = lambda d, a, b: d.get(a, 0) / max(d.get(b, 1), 1)  # noqa: E731
    return {"screen": screen, "data path": path,
            "used / read (run)": f"{ratio(c, 'images_used', 'images_read'):.2f}",
            "used / read (steady)": f"{ratio(w, 'images_used', 'images_read'):.2f}",
            "kB read / example": f"{c.get('bytes_read', 0) / ex / 1e3:.1f}",
            "read / used bytes (run)": f"{ratio(c, 'bytes_read', 'bytes_used'):.2f}",
            "read / used bytes (steady)": f"{ratio(w, 'bytes_read', 'bytes_used'):.2f}",
            "pairs across sources": f"{c.get('pairs_across_source', 0) / max(pairs, 1):.2f}",
            "controls from own plate": f"{c.get('controls_plate', 0) / max(ctl, 1):.2f}",
            "worker RSS MB": f"{r['rss_mb']:.0f}",
            "examples/s/worker": f"{r['counts'].get('examples', 0) / r['seconds']:.1f}"}


# ------------------------------------------------------------------------------------------ simulation

def jump_index(wells_csv: str, plates_csv: str, sites: int):
    """A metadata-only site index of cpg0016's COMPOUND plates: treated and DMSO wells, `sites` per well."""
    import pandas as pd

    from micon import schema

    wells = pd.read_csv(wells_csv, dtype=str)
    plates = pd.read_csv(plates_csv, dtype=str)
    wells = wells.merge(plates, on=[schema.SOURCE, schema.PLATE])
    wells = wells[wells[schema.PLATE_TYPE] == "COMPOUND"]
    ctl = set(schema.POSITIVE_CONTROLS.values()) | {schema.EMPTY_WELL}
    role = np.where(wells[schema.JCP] == schema.DMSO, schema.NEGCON,
                    np.where(wells[schema.JCP].isin(ctl), "other", schema.TREATED))
    wells = wells.assign(**{schema.ROLE: role})
    wells = wells[wells[schema.ROLE] != "other"].reset_index(drop=True)
    idx = wells.loc[wells.index.repeat(sites)].reset_index(drop=True)
    idx[schema.SITE] = np.tile(np.arange(1, sites + 1).astype(str), len(wells))
    idx["key"] = idx[schema.PLATE] + "_" + idx[schema.WELL] + "_" + idx[schema.SITE]
    idx["shard"], idx["offset"], idx["size"], idx["codec"] = idx[schema.PLATE], 0, int(SITE_KB_256 * 1e3), "dzstd"
    idx[schema.INCHIKEY] = idx[schema.SMILES] = ""
    return idx


def simulate_plate_path(idx, ranks=8, workers=10, epochs=3, shard_sites=1900, shuffle_buffer=2000,
                        pair_buffer=50000, cache_plates=16, seed=0) -> dict:
    """Today's path over one worker's slot: the real shard split and ReplicatePairer on metadata, and a
    16-plate LRU of decoded DMSO plates for the controls."""
    import random

    from micon import schema
    from micon.data.pipeline import Counts, ReplicatePairer, shard_slot

    treated = idx[idx[schema.ROLE] == schema.TREATED]
    dmso_per_plate = idx[idx[schema.ROLE] == schema.NEGCON].groupby(schema.PLATE).size().to_dict()
    cols = [schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL, schema.SITE, schema.JCP]
    shards = []
    for _, g in treated.groupby(schema.PLATE, sort=True):
        recs = g[cols].to_dict("records")
        shards += [recs[i:i + shard_sites] for i in range(0, len(recs), shard_sites)]
    names = [str(i) for i in range(len(shards))]
    counts = Counts()
    pairer = ReplicatePairer(pair_buffer, "source", counts)
    cache: OrderedDict = OrderedDict()
    read = used = examples = peak_waiting = ctl_read = 0
    for epoch in range(epochs):
        rng = random.Random(f"{seed}-{epoch}")
        buf = []
        stream = (s for n in shard_slot(names, epoch, seed, 0, ranks * workers, False) for s in shards[int(n)])
        for meta in stream:
            read += 1
            if len(buf) < shuffle_buffer:
                buf.append(meta)
                continue
            i = rng.randrange(len(buf))
            buf[i], meta = meta, buf[i]
            pair = pairer.push({"meta": meta})
            peak_waiting = max(peak_waiting, len(pairer.waiting))
            if pair is None:
                continue
            examples += 1
            used += 4
            for s in pair:
                plate = s["meta"][schema.PLATE]
                if plate in cache:
                    cache.move_to_end(plate)
                else:
                    n = dmso_per_plate.get(plate, 0)
                    ctl_read += n
                    cache[plate] = n
                    if len(cache) > cache_plates:
                        cache.popitem(last=False)
    images_read = read + ctl_read
    cross = counts.get("pairs_across_source", 0) / max(examples, 1)
    same_plate = counts.get("pairs_across_well", 0) / max(examples, 1)
    return {"examples": examples, "images_read": images_read, "images_used": used,
            "bytes_read_per_example": (read * SITE_KB_256 + ctl_read * DECODED_KB_256) * 1e3 / max(examples, 1),
            "bytes_used_per_example": 2 * SITE_KB_256 * 1e3 + 2 * DECODED_KB_256 * 1e3,
            "worker_memory_mb": peak_waiting * SITE_KB_256 / 1e3 + cache_plates * np.mean(
                list(dmso_per_plate.values())) * DECODED_KB_256 / 1e3,
            "pairs_across_source": cross, "pairs_same_plate": same_plate, "sites_read_per_example": read / max(examples, 1),
            "evictions": counts.get("pair_evicted", 0)}


def simulate_rset_path(idx, ranks=8, workers=10, shard_mb=256.0, shuffle_buffer=128, seed=0, sites=9) -> dict:
    """The replicate-set path: the real planner (one site slot per well; the other slots are alike) and
    pairing over one worker's slot of the replicate-set shards."""
    from micon import schema
    from micon.data.pipeline import shard_slot
    from micon.data.replicate_sets import ReplicateSetConfig, assign_shards, pair_wells, plan_replicate_sets

    no_splits = {"heldout_sources": [], "heldout_batches": [], "heldout_compounds": []}
    samples, report = plan_replicate_sets(idx, no_splits, ReplicateSetConfig(include_poscon=False))
    shards = assign_shards(samples, idx["size"].to_numpy(), seed, shard_mb * 1e6)
    mine = shard_slot([str(i) for i in range(len(shards))], 0, seed, 0, ranks * workers, False)
    meta = idx[[schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL]].to_numpy()
    cols = (schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL)
    read = examples = cross = plate_ctl = ctl = json_bytes = 0
    sizes = []
    rng = np.random.default_rng(seed)
    for name in mine:
        for s in shards[int(name)]:
            n = len(s["t"])
            images = n + sum(c >= 0 for c in s["c"])
            read += images
            sizes.append(images * SITE_KB_256)
            json_bytes += 262 + 402 * n      # the sample's JSON, as measured on the jumplike screen's sets
            pairs = pair_wells([dict(zip(cols, meta[r])) for r in s["t"]], rng)
            examples += len(pairs)
            cross += sum(level == "source" for *_, level in pairs)
            ctl += len(s["level"])
            plate_ctl += sum(level == "plate" for level in s["level"])
    headers = 2 * 1024 * len(sizes)         # two members per set: a 512-byte header and ~half a block of padding
    return {"examples": examples, "images_read": read, "images_used": read, "n_sets": len(samples) * sites,
            "bytes_read_per_example": (read * SITE_KB_256 * 1e3 + json_bytes + headers) / max(examples, 1),
            "bytes_used_per_example": read * SITE_KB_256 * 1e3 / max(examples, 1),
            "worker_memory_mb": shuffle_buffer * float(np.percentile(sizes, 99)) / 1e3,
            "worker_memory_mean_mb": shuffle_buffer * float(np.mean(sizes)) / 1e3,
            "pairs_across_source": cross / max(examples, 1), "controls_from_own_plate": plate_ctl / max(ctl, 1),
            "left_out": len(report), "storage_tb": len(samples) * sites * float(np.mean(sizes)) / 1e9}


def sim_rows(name: str, old: dict, new: dict) -> list[dict]:
    def row(path, r, extra):
        return {"scale": name, "data path": path, "used / read": f"{r['images_used'] / max(r['images_read'], 1):.3f}",
                "MB read / example": f"{r['bytes_read_per_example'] / 1e6:.2f}",
                "read / used bytes": f"{r['bytes_read_per_example'] / r['bytes_used_per_example']:.2f}",
                "pairs across sources": f"{r['pairs_across_source']:.2f}",
                "worker memory MB": f"{r['worker_memory_mb']:.0f}", **extra}

    return [row("plate shards + pairing buffer + control bank", old,
                {"note": f"{old['sites_read_per_example']:.1f} sites read per example; "
                         f"{old['pairs_same_plate']:.0%} of pairs on one plate; {old['evictions']} evictions"}),
            row("replicate-set shards", new,
                {"note": f"controls from own plate {new['controls_from_own_plate']:.3f}; "
                         f"{new['left_out']} compounds with < 2 wells left out; "
                         f"storage {new['storage_tb']:.2f} TB at 256 px"})]


# ------------------------------------------------------------------------------------------ screens

def ensure_screen(work: Path, name: str, synth_args: list[str], prep_args: list[str]) -> tuple[Path, Path]:
    shards, graphs = work / name / "shards", work / name / "graphs"
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    if not (shards / "manifest.json").is_file():
        print(f"bench_datapath: writing the {name} screen under {work / name}", flush=True)
        subprocess.run([py, "-m", "data_prep.synth", str(work / name / "screen"), *synth_args], check=True, env=env,
                       cwd=ROOT, capture_output=True)
        subprocess.run([py, "-m", "data_prep.ingest", str(work / name / "screen"), str(shards), *prep_args],
                       check=True, env=env, cwd=ROOT, capture_output=True)
    # (re)builds the replicate sets only when they are missing or were made by another format or options
    subprocess.run([py, "-m", "data_prep.replicate_sets", str(shards)], check=True, env=env, cwd=ROOT,
                   capture_output=True)
    if not (graphs / "index.parquet").exists() and not list(graphs.glob("*")):
        subprocess.run([py, "-m", "data_prep.featurize", str(work / name / "screen" / "metadata" / "compound.csv.gz"),
                        str(graphs), "num_workers=1"], check=True, env=env, cwd=ROOT, capture_output=True)
    return shards, graphs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "bench" / "out" / "datapath"))
    ap.add_argument("--wells", default=str(ROOT.parent / "shared" / "jump-metadata" / "well.csv.gz"))
    ap.add_argument("--plates", default=str(ROOT.parent / "shared" / "jump-metadata" / "plate.csv.gz"))
    ap.add_argument("--quick", action="store_true", help="fewer batches (a smoke run, not for the record)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(stream_child(**json.loads(a.child))))
        return
    work = Path(a.work)
    t_all = time.perf_counter()
    screens = {
        "demo (120 compounds, 12 plates, 96 px)": ensure_screen(work, "demo", ["preset=demo"], ["shard_mb=2"]),
        "jumplike (1,536 compounds, 192 plates, 32 px)": ensure_screen(work, "jumplike", ["preset=jumplike"],
                                                                       ["shard_mb=1"]),
        "hires (tiny layout at 256 px)": ensure_screen(work, "hires", ["preset=tiny", "image_size=256",
                                                                        "n_compounds=24", "sites_per_well=3"],
                                                       ["shard_mb=4"]),
    }
    batches, warmup = (20, 5) if a.quick else (400, 40)
    rows = []
    for name, (shards, graphs) in screens.items():
        crop = 224 if name.startswith("hires") else 0
        for rsets, label in ((False, "plate shards + pairing buffer + control bank"), (True, "replicate-set shards")):
            r = run_stream(shards, graphs, rsets, batches, warmup, crop)
            rows.append(stream_row(name.split(" (")[0], label, r))
            print(rows[-1], flush=True)
    print(f"bench_datapath: simulating cpg0016 from {a.wells}", flush=True)
    idx9 = jump_index(a.wells, a.plates, sites=9)
    old = simulate_plate_path(idx9, epochs=1 if a.quick else 3)
    del idx9
    idx1 = jump_index(a.wells, a.plates, sites=1)
    new = simulate_rset_path(idx1)
    from micon import schema
    sim_compounds = idx1[idx1[schema.ROLE] == schema.TREATED][schema.JCP].nunique()
    sim_plates = idx1[schema.PLATE].nunique()
    sims = sim_rows("cpg0016 (simulated)", old, new)
    steps = [{"model (CPU, 2 threads)": f"{p} at {s} px, MICON step, 16 examples (64 images)",
              "step s": f"{t:.2f}"} for p, s in (("tiny", 64),) for t in [model_step(p, s, 16)]]
    t1, t2, t3 = markdown_table(rows), markdown_table(sims), markdown_table(steps)
    print(t1, t2, t3, sep="\n\n")
    write_section("Training data path", f"""
Before: plate shards streamed through a shuffle buffer, replicates paired by a buffer of waiting sites
(ReplicatePairer), controls drawn from the DMSO control bank through a 16-plate cache. Now: replicate-set
shards written by prep (one sample = one site slot of every well of a compound + a same-plate DMSO site per
well), read front to back. MICON examples (two wells, a site each, a control each), batches of 16, one
loader worker per row in its own process; ratios over the whole run ({warmup + batches} batches, buffer
fills included), examples/s over the last {batches} batches. "read / used bytes": bytes read from storage
(tar headers included; a control-bank miss counts the decoded DMSO plate it loads) over the payload of
the images placed into batches. "run" counts from the stream's start, so the buffers' first fill weighs on
it; "steady" is the timed window alone (on a screen whose whole control bank fits the 16-plate cache, the
plate path then reads no controls at all and uses more than it reads).

{t1}

Metadata-only simulation over cpg0016's real plate maps ({os.path.relpath(a.wells, ROOT)}:
{sim_plates:,} COMPOUND plates, {sim_compounds:,} treated compounds; 9 sites per well at {SITE_KB_256} kB,
8 ranks x 10 workers, one worker's slot; before: shuffle buffer 2,000, pair buffer 50,000, plate shards of
~1,900 sites, {1 if a.quick else 3} epochs; now: replicate-set shards of 256 MB, shuffle buffer 128 sets).
Worker memory: before = peak pairing-buffer occupancy x stored site + 16 decoded DMSO plates; now = 128
buffered sets at the 99th percentile of set size (a compound's sets hold at most 16 wells, so the bound is
128 x 16 x 2 x {SITE_KB_256} kB = {128 * 16 * 2 * SITE_KB_256 / 1e3:.0f} MB whatever the number of
compounds or plates; the bound is the buffer's, the process itself adds a fixed ~100-400 MB, the measured RSS
of the rows above). The simulation's "used / read" for replicate sets is 1.000 by construction (it counts
a sample's images as used when they are read); the real screens above measure it.

{t2}

Model step beside it (CPU, this machine):

{t3}

Whole benchmark: {time.perf_counter() - t_all:.0f} s.
""")


if __name__ == "__main__":
    main()
