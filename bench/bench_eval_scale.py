"""evaluate at consortium size, stage by stage: a screen of N wells x D features (default 200,000 x 512,
replicates planted) through a profile recipe, top-k retrieval under every stringency (NR, NSB, NSS, NSP,
NSL), mAP of activity (against the query plate's DMSO), consistency mAP on consensus profiles (an
annotated share of the compounds) and one DMSO-null refit. Each stage's wall time, CPU time (this process,
its children and every Ray process) and peak RSS (the same processes, sampled), run in-process and on a
Ray cluster of two nodes; then the 550k-well figure from the measured per-core rates.

    python bench/bench_eval_scale.py [--wells 200000] [--dim 512] [--recipe jump] [--query-fraction 0.03125]
        [--ray-nodes 2] [--modes in-process ray] [--no-write]

Top-k's cost per query does not depend on which wells query, so an evenly spaced `--query-fraction` of the
wells queries the whole table and its time is divided by that fraction (the other stages run in full).
The two Ray nodes are ray.cluster_utils.Cluster nodes on this machine, one CPU each: they show that the
work spreads over nodes and what that costs here, not a speed-up (a 2-core machine has no spare cores).
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench._report import markdown_table, write_section  # noqa: E402
from micon import schema  # noqa: E402

TARGET_WELLS = 550_000
NODE_CORES = 32
MODES = ("nr", "nsb", "nss", "nsp", "nsl")


def make_screen(n_wells: int, d: int, seed: int = 0, n_sources: int = 12, batches_per_source: int = 4,
                replicates: int = 5, dmso_per_plate: int = 16, wells_per_plate: int = 384,
                annotated: float = 0.1, n_targets: int = 300):
    """A cpg0016-shaped screen: 384-well plates with 16 DMSO wells, each compound's `replicates` wells on
    different plates (in a random source each), plate and source offsets, a planted compound signal, and
    a target annotation on an `annotated` share of the compounds (planted as a shared direction)."""
    rng = np.random.default_rng(seed)
    n_plates = -(-n_wells // wells_per_plate)
    plate_source = rng.integers(0, n_sources, n_plates)
    plate_batch = rng.integers(0, batches_per_source, n_plates)
    plate = np.repeat(np.arange(n_plates), wells_per_plate)[:n_wells]
    slot = np.tile(np.arange(wells_per_plate), n_plates)[:n_wells]
    dmso = slot < dmso_per_plate
    treated = np.flatnonzero(~dmso)
    n_cpd = len(treated) // replicates
    # replicate r of every compound goes to a different plate: deal the treated wells in plate order
    order = treated[np.argsort(slot[treated] * n_plates + plate[treated], kind="stable")]
    compound = np.full(n_wells, -1)
    compound[order[:n_cpd * replicates]] = np.tile(np.arange(n_cpd), replicates)
    dmso |= compound < 0        # a remainder too small for a compound: more DMSO
    jcp = np.where(dmso, schema.DMSO, np.char.add("JCP2022_", np.char.zfill(compound.astype(str), 6)))
    target = np.where(rng.random(n_cpd) < annotated, rng.integers(0, n_targets, n_cpd), -1)
    meta = pd.DataFrame({
        schema.SOURCE: np.char.add("source_", plate_source[plate].astype(str)),
        schema.BATCH: np.char.add(np.char.add("batch_", plate_source[plate].astype(str)),
                                  np.char.add("_", plate_batch[plate].astype(str))),
        schema.PLATE: np.char.add("plate_", np.char.zfill(plate.astype(str), 5)),
        schema.WELL: [schema.well_name(s // 24, s % 24) for s in slot],
        schema.JCP: jcp,
        schema.ROLE: np.where(dmso, schema.NEGCON, schema.TREATED),
        "Metadata_Target": np.where(dmso | (target[np.maximum(compound, 0)] < 0), "",
                                    np.char.add("T", target[np.maximum(compound, 0)].astype(str))),
    })
    feats = rng.normal(size=(n_wells, d)).astype(np.float32)
    signal = rng.normal(size=(n_cpd, d)).astype(np.float32) * 0.45
    tdir = rng.normal(size=(n_targets, d)).astype(np.float32) * 0.45
    has = ~dmso
    feats[has] += signal[compound[has]]
    t = target[compound[has]]
    feats[np.flatnonzero(has)[t >= 0]] += tdir[t[t >= 0]]
    feats += rng.normal(size=(n_plates, d)).astype(np.float32)[plate] * 0.3
    feats += rng.normal(size=(n_sources, d)).astype(np.float32)[plate_source[plate]] * 0.5
    return meta, feats


class Meter:
    """Wall, CPU and peak RSS of one stage over this process, its children and every Ray process."""

    def __init__(self, ray_too: bool):
        import psutil

        self.psutil, self.ray_too = psutil, ray_too
        self.me = psutil.Process()

    def procs(self):
        out = [self.me, *self.me.children(recursive=True)]
        if self.ray_too:
            seen = {p.pid for p in out}
            for p in self.psutil.process_iter(["name", "cmdline"]):
                try:
                    cmd = " ".join(p.info["cmdline"] or [])
                    if p.pid not in seen and ("ray::" in (p.info["name"] or "") + cmd or "raylet" in cmd
                                              or "gcs_server" in cmd or "default_worker.py" in cmd):
                        out.append(p)
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                    pass
        return out

    def cpu(self) -> dict:
        total = {}
        for p in self.procs():
            try:
                t = p.cpu_times()
                total[p.pid] = t.user + t.system
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                pass
        return total

    def rss(self) -> int:
        n = 0
        for p in self.procs():
            try:
                n += p.memory_info().rss
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                pass
        return n

    def run(self, fn):
        before = self.cpu()
        peak = [self.rss()]
        stop = threading.Event()

        def sample():
            while not stop.wait(0.25):
                peak[0] = max(peak[0], self.rss())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        w0 = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - w0
        stop.set()
        thread.join()
        after = self.cpu()
        cpu = sum(after[p] - before.get(p, 0.0) for p in after)
        return out, wall, cpu, max(peak[0], self.rss())


def stages(meta, feats, names, recipe: str, query_fraction: float, ray_mode: bool, null_size: int):
    """(name, callable) per stage, in evaluate's order; each callable returns a short result string."""
    from micon.eval import map as mapm
    from micon.eval.activity import negcon_null
    from micon.eval.consistency import target_consistency
    from micon.eval.recipes import apply_recipe
    from micon.eval.retrieval import topk_hit_rate, topk_hit_rate_ray

    state = {}

    def recipe_stage():
        rec = apply_recipe(recipe, meta, feats, names)
        state["wells"], state["prof"] = rec.wells, rec.prof
        return f"{rec.prof.shape[1]} features"

    def topk_stage():
        w, x = state["wells"], state["prof"]
        rows = np.arange(0, len(w), int(round(1 / query_fraction)))
        fn = topk_hit_rate_ray if ray_mode else topk_hit_rate
        frame = fn(w.iloc[rows], x[rows], w, x, ks=range(1, 11), modes=MODES, progress=True)
        return " ".join(f"{m} {float(frame[m].iloc[0]):.3f}" for m in MODES)

    def activity_stage():
        w, x = state["wells"], state["prof"]
        _, m = mapm.phenotypic_activity(w, x, null_size=null_size, progress=True)
        return f"mAP {m['mean_average_precision'].mean():.3f} over {len(m):,} compounds"

    def consistency_stage():
        w, x = state["wells"], state["prof"]
        _, m = target_consistency(w, x, "Metadata_Target", null_size=null_size)
        return f"mAP {m['mean_average_precision'].mean():.3f} over {len(m):,} targets"

    def null_stage():
        def refit(wl, raw):
            rec = apply_recipe(recipe, wl, raw, names)
            return rec.wells, rec.raw, rec.prof
        comps, null = negcon_null(meta, feats, repeats=1, null_size=null_size, normalise=refit)
        return f"null mAP {null['mean_average_precision'].mean():.3f} ({len(null):,} pseudo-compounds)"

    return [(f"recipe={recipe}", recipe_stage), (f"top-k x{len(MODES)} stringencies", topk_stage),
            ("mAP of activity", activity_stage), ("consistency, consensus", consistency_stage),
            ("DMSO null (1 refit)", null_stage)]


def start_ray(nodes: int):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return cluster, len(alive)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wells", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--recipe", default="jump")
    ap.add_argument("--query-fraction", type=float, default=1 / 32)
    ap.add_argument("--ray-nodes", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["in-process", "ray"], choices=["in-process", "ray"])
    ap.add_argument("--null-size", type=int, default=1000)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    t0 = time.perf_counter()
    meta, feats = make_screen(args.wells, args.dim)
    names = [f"f{i:04d}" for i in range(args.dim)]
    n_cpd = meta.loc[meta[schema.ROLE] == schema.TREATED, schema.JCP].nunique()
    n_ann = meta.loc[meta["Metadata_Target"] != "", schema.JCP].nunique()
    print(f"screen: {len(meta):,} wells x {args.dim} features, {meta[schema.PLATE].nunique():,} plates, "
          f"{n_cpd:,} compounds ({n_ann:,} annotated) in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for mode in args.modes:
        cluster, n_nodes = (start_ray(args.ray_nodes) if mode == "ray" else (None, 0))
        meter = Meter(ray_too=mode == "ray")
        for name, fn in stages(meta, feats, names, args.recipe, args.query_fraction, mode == "ray", args.null_size):
            out, wall, cpu, rss = meter.run(fn)
            scale = 1 / args.query_fraction if name.startswith("top-k") else 1.0
            row = dict(mode=mode if mode == "in-process" else f"ray, {n_nodes} nodes", stage=name,
                       wall_s=round(wall * scale, 1), cpu_s=round(cpu * scale, 1),
                       peak_rss_gb=round(rss / 2**30, 2), result=out)
            if scale != 1.0:
                row["stage"] += f" (1/{round(scale)} of the queries timed, x{round(scale)})"
            rows.append(row)
            print(f"{row['mode']}: {row['stage']}: wall {row['wall_s']} s, CPU {row['cpu_s']} s, peak RSS "
                  f"{row['peak_rss_gb']} GB: {out}", flush=True)
        if cluster is not None:
            import ray
            ray.shutdown()
            cluster.shutdown()
    table = markdown_table(rows)
    print(table)
    # 550k from the in-process per-core rates: linear stages x (550k / N); top-k x (550k / N)^2;
    # consistency grows with the annotated compounds squared (the same share annotated: x (550k / N)^2)
    ratio = TARGET_WELLS / args.wells
    lines = []
    parallel = 0.0
    for r in rows:
        if r["mode"] != "in-process":
            continue
        quad = r["stage"].startswith("top-k") or r["stage"].startswith("consistency")
        cpu = r["cpu_s"] * (ratio ** 2 if quad else ratio)
        spread = r["stage"].startswith(("top-k", "mAP"))     # blocks that share nothing
        parallel += cpu if spread else 0.0
        where = (f"{cpu / NODE_CORES / 60:.1f} min on a {NODE_CORES}-core node (its blocks share nothing)" if spread
                 else f"{r['wall_s'] * (ratio ** 2 if quad else ratio) / 60:.1f} min of wall in the driver at this "
                      f"machine's rate (not spread over cores)")
        lines.append(f"* {r['stage'].split(' (')[0]}: {r['cpu_s']:,} CPU-s x {ratio:.2f}{'^2' if quad else ''} = "
                     f"{cpu:,.0f} CPU-s at 550k wells; {where}")
    lines.append("* evaluate's DMSO null refits the recipe 5 times (NULL_REPEATS): five times the line above; at "
                 "consortium size pass activity_null=false or read it from a subset of plates")
    print("\n".join(lines))
    if not args.no_write:
        body = (f"A screen of {len(meta):,} wells x {args.dim} features ({meta[schema.PLATE].nunique():,} plates of "
                f"384 wells, 16 DMSO each, {n_cpd:,} compounds of 5 wells on different plates, {n_ann:,} of them "
                f"annotated with one of 300 targets), recipe={args.recipe}, stages in evaluate's order. CPU: "
                f"this process, its children and every Ray process (raylets, workers); peak RSS: their sum, "
                f"sampled every 0.25 s. Top-k: {args.query_fraction:.4g} of the wells query the whole table, "
                f"times divided by it. The two Ray nodes are ray.cluster_utils.Cluster nodes of one CPU each "
                f"on this 2-core machine: the top-k tasks spread over both nodes; the other stages run in the "
                f"driver.\n\n" + table + "\n\n" + "\n".join(lines))
        write_section("Evaluation at 200k wells, stage by stage (in-process and 2 Ray nodes)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
