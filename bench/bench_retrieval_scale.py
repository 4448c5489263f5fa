"""Replicate retrieval at consortium size: NSB/NSS/NSP top-1..10 (what evaluate runs) and, with --map, the
phenotypic-activity and -consistency mAP, timed against the number of wells; the quadratic fit, and the
extrapolation to cpg0016's ~550k wells on a 32-core node (CPU) or on the GPU the run used.

    python bench/bench_retrieval_scale.py [--wells 10000 20000 50000] [--device cpu|cuda|auto|torch:cpu]
        [--threads 1 2] [--block-size 512] [--gallery-chunk 32768] [--map] [--check] [--no-write]

Profiles come from bench/bench_eval.py's `make_screen` (256-d, 5 sources x 3 batches, 384-well plates,
10% DMSO, 4 replicates per compound). CPU time is the process's (every thread); wall time is the call's.
`--check` also runs the CPU path at the smallest size and says whether the results are identical.
A GPU run in about a minute: `python bench/bench_retrieval_scale.py --device cuda --wells 50000 200000 --map --check`
(it writes its own section, "Retrieval at consortium size (cuda)"; add --no-write to print only).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench._report import markdown_table, write_section  # noqa: E402
from bench.bench_eval import make_screen  # noqa: E402

TARGET_WELLS = 550_000
NODE_CORES = 32
MODES = ("nsb", "nss", "nsp")


def timed(fn):
    """(result, wall s, process CPU s) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def run_topk(meta, feats, device: str, block_size: int, gallery_chunk: int, query_fraction: float = 1.0):
    """Every well against every well; with query_fraction < 1 an evenly spaced share of the wells queries
    the whole table (the cost per query does not depend on which queries run, so the full run's time is
    this one's / query_fraction)."""
    from micon.eval.retrieval import topk_hit_rate

    kw = dict(ks=range(1, 11), modes=MODES, block_size=block_size, gallery_chunk=gallery_chunk, device=device)
    if query_fraction >= 1.0:
        return timed(lambda: topk_hit_rate(meta, feats, **kw))
    rows = np.arange(0, len(meta), int(round(1 / query_fraction)))
    return timed(lambda: topk_hit_rate(meta.iloc[rows], feats[rows], meta, feats, **kw))


def run_map(meta, feats, device: str):
    from micon.eval import map as mapm

    def both():
        ap, act = mapm.phenotypic_activity(meta, feats, null_size=1000, device=device)
        _, con = mapm.phenotypic_consistency(meta, feats, null_size=1000, device=device)
        return ap, act, con
    return timed(both)


def fit_quadratic(n: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """Least-squares t = a N^2 + b N (no constant: nothing is paid for no wells)."""
    a, b = np.linalg.lstsq(np.stack([n.astype(float) ** 2, n.astype(float)], 1), t, rcond=None)[0]
    return float(a), float(b)


def set_threads(n: int) -> None:
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    threadpool_limits(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wells", type=int, nargs="+", default=[10000, 20000, 50000])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, nargs="+", default=[0], help="0: leave the libraries' default")
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--gallery-chunk", type=int, default=32768)
    ap.add_argument("--query-fraction", type=float, default=1.0,
                    help="time this share of the queries against the whole table and scale up (long CPU runs)")
    ap.add_argument("--map", action="store_true", help="also time phenotypic activity + consistency mAP")
    ap.add_argument("--map-wells", type=int, nargs="+", help="sizes for the mAP (default: --wells)")
    ap.add_argument("--check", action="store_true", help="compare with the CPU path at the smallest size")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from micon.eval.retrieval import resolve_device

    device = resolve_device(args.device)
    meta, feats = make_screen(2000, seed=1)       # warm-up: first-call set-up (threads, CUDA context) not timed
    run_topk(meta, feats, args.device, args.block_size, args.gallery_chunk)
    if args.map:
        run_map(meta, feats, args.device)
    rows, map_rows, fits, lines = [], [], [], []
    identical = None
    for threads in args.threads:
        if threads:
            set_threads(threads)
        sizes, times = [], {"top-k CPU s": [], "top-k wall s": [], "mAP CPU s": [], "mAP wall s": []}
        for n in args.wells:
            meta, feats = make_screen(n)
            frame, wall, cpu = run_topk(meta, feats, args.device, args.block_size, args.gallery_chunk,
                                        args.query_fraction)
            wall, cpu = wall / args.query_fraction, cpu / args.query_fraction
            row = dict(wells=n, device=device, threads=threads or "default", block=args.block_size,
                       queries_timed=f"{args.query_fraction:.3g}", topk_wall_s=round(wall, 1), topk_cpu_s=round(cpu, 1),
                       nsb_top10=round(float(frame["nsb"].iloc[-1]), 4))
            times["top-k CPU s"].append(cpu)
            times["top-k wall s"].append(wall)
            if args.check and identical is None and device != "cpu":
                ref, _, _ = run_topk(meta, feats, "cpu", args.block_size, args.gallery_chunk)
                identical = bool(ref.equals(frame))
            print(row, flush=True)
            rows.append(row)
            sizes.append(n)
        map_sizes = (args.map_wells or args.wells) if args.map else []
        for n in map_sizes:
            meta, feats = make_screen(n)
            (_, act, con), mwall, mcpu = run_map(meta, feats, args.device)
            row = dict(wells=n, device=device, threads=threads or "default", map_wall_s=round(mwall, 1),
                       map_cpu_s=round(mcpu, 1), activity_map=round(float(act["mean_average_precision"].mean()), 4),
                       consistency_map=round(float(con["mean_average_precision"].mean()), 4))
            print(row, flush=True)
            map_rows.append(row)
            times["mAP CPU s"].append(mcpu)
            times["mAP wall s"].append(mwall)
        for what, t in times.items():
            measured = map_sizes if what.startswith("mAP") else sizes
            if len(t) < 2 or (what.endswith("CPU s") and device.startswith("cuda")):   # CPU time says little there
                continue
            n1, n2 = measured[-2], measured[-1]
            a, b = fit_quadratic(np.array(measured), np.array(t))
            exponent = np.log(t[-1] / t[-2]) / np.log(n2 / n1)
            at_target = t[-1] * (TARGET_WELLS / n2) ** 2     # quadratic from the largest size measured
            fits.append(dict(threads=threads or "default", measure=what, exponent=round(float(exponent), 2),
                             a_per_N2=f"{a:.3e}", b_per_N=f"{b:.3e}", lstsq_at_550k=round(a * TARGET_WELLS ** 2 + b * TARGET_WELLS),
                             from_largest_at_550k=round(at_target)))
            arith = f"{t[-1]:,.1f} s x (550,000 / {n2:,})^2 = {at_target:,.0f} s"
            if what == "top-k CPU s":
                lines.append(f"* threads={threads or 'default'}, top-k: {arith} of CPU; on a {NODE_CORES}-core node "
                             f"(query blocks spread over the cores: they share nothing) {at_target / NODE_CORES:,.0f} s = "
                             f"{at_target / NODE_CORES / 60:.1f} min of wall time, if every core runs at this machine's rate.")
            elif what == "top-k wall s" and device != "cpu":
                lines.append(f"* one {device} device, top-k: {arith} = {at_target / 60:.1f} min.")
            elif what == "mAP CPU s" and not device.startswith("cuda"):
                lines.append(f"* activity + consistency mAP ({device}): {arith} of CPU; on a {NODE_CORES}-core node "
                             f"{at_target / NODE_CORES / 60:.1f} min.")
            elif what == "mAP wall s" and device != "cpu":
                lines.append(f"* one {device} device, activity + consistency mAP: {arith} = {at_target / 60:.1f} min.")
    table = markdown_table(rows) + ("\n\n" + markdown_table(map_rows) if map_rows else "")
    fit_table = markdown_table(fits) if fits else ""
    print(table)
    print(fit_table)
    if identical is not None:
        lines.append(f"* {device} against the CPU path at {args.wells[0]:,} wells: "
                     f"{'identical hit rates' if identical else 'DIFFERENT hit rates'}.")
    print("\n".join(lines))
    if args.no_write:
        return
    body = (f"{table}\n\n{fit_table}\n\n" + "\n".join(lines) + "\n\n"
            "Modes nsb, nss and nsp, k = 1..10, queries = every treated well, gallery = the same wells (what "
            "evaluate runs). `exponent`: log(t2 / t1) / log(N2 / N1) over the two largest sizes (2 = quadratic); "
            "`lstsq_at_550k`: least squares of t = a N^2 + b N over every size; `from_largest_at_550k`: the largest "
            "size's time x (550,000 / N)^2, the figure in the lines above. `queries_timed` < 1: that share of the wells "
            "queried the whole table, times divided by it. CPU s: the process's CPU time, every thread (the "
            f"figure to trust on a shared machine; load average {os.getloadavg()[0]:.1f} when the run ended).\n")
    write_section(f"Retrieval at consortium size ({device})", body)


if __name__ == "__main__":
    main()
