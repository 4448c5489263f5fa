"""Replicate retrieval at consortium size: NSB/NSS/NSP top-1..10 (what evaluate runs) and, with --map, the
phenotypic-activity and -consistency mAP, timed against the number of wells; the quadratic fit, and the
extrapolation to cpg0016's ~550k wells on a 32-core node (CPU) or on the GPU the run used.

    python bench/bench_retrieval_scale.py [--wells 10000 20000 50000] [--device cpu|cuda|auto|torch:cpu]
        [--threads 1 2] [--block-size 512] [--gallery-chunk 32768] [--map] [--check] [--no-write]

Profiles come from bench/bench_eval.py's `make_screen` (256-d, 5 sources x 3 batches, 384-well plates,
10% DMSO, 4 replicates per compound). CPU time is the process's (every thread); wall time is the call's.
`--check` also runs the CPU path at the smallest size and says whether the results are identical.
A GPU run in about a minute: `python bench/bench_retrieval_scale.py --device cuda --wells 50000 200000 --map --check`.
"""
from __future__ import annotations

import argparse
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
    ap.add_argument("--check", action="store_true", help="compare with the CPU path at the smallest size")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from micon.eval.retrieval import resolve_device

    device = resolve_device(args.device)
    rows, fits = [], []
    identical = None
    for threads in args.threads:
        if threads:
            set_threads(threads)
        sizes, cpu_s, wall_s, map_wall = [], [], [], []
        for n in args.wells:
            meta, feats = make_screen(n)
            frame, wall, cpu = run_topk(meta, feats, args.device, args.block_size, args.gallery_chunk,
                                        args.query_fraction)
            wall, cpu = wall / args.query_fraction, cpu / args.query_fraction
            row = dict(wells=n, device=device, threads=threads or "default", block=args.block_size,
                       queries_timed=f"{args.query_fraction:.3g}", topk_wall_s=round(wall, 1), topk_cpu_s=round(cpu, 1),
                       nsb_top10=round(float(frame["nsb"].iloc[-1]), 4))
            if args.map:
                (_, act, con), mwall, _ = run_map(meta, feats, args.device)
                row |= dict(map_wall_s=round(mwall, 1), activity_map=round(float(act["mean_average_precision"].mean()), 4),
                            consistency_map=round(float(con["mean_average_precision"].mean()), 4))
                map_wall.append(mwall)
            if args.check and identical is None and device != "cpu":
                ref, _, _ = run_topk(meta, feats, "cpu", args.block_size, args.gallery_chunk)
                identical = bool(ref.equals(frame))
            print(row, flush=True)
            rows.append(row)
            sizes.append(n)
            cpu_s.append(cpu)
            wall_s.append(wall)
        n_arr = np.array(sizes)
        for what, t in (("top-k CPU s", cpu_s), ("top-k wall s", wall_s)) + ((("mAP wall s", map_wall),) if map_wall else ()):
            if len(n_arr) >= 2:
                a, b = fit_quadratic(n_arr, np.array(t))
                fits.append(dict(threads=threads or "default", measure=what, a_per_N2=f"{a:.3e}", b_per_N=f"{b:.3e}",
                                 at_550k=round(a * TARGET_WELLS ** 2 + b * TARGET_WELLS, 0)))
    table = markdown_table(rows)
    fit_table = markdown_table(fits) if fits else ""
    print(table)
    print(fit_table)
    lines = []
    for f in fits:
        if f["measure"] == "top-k CPU s" and device == "cpu":
            per_node = f["at_550k"] / NODE_CORES
            lines.append(f"* threads={f['threads']}: top-k at 550k wells = {f['a_per_N2']} x 550,000^2 + {f['b_per_N']} x "
                         f"550,000 = {f['at_550k']:,.0f} CPU-s; on a {NODE_CORES}-core node (query blocks spread over "
                         f"the cores, no shared state) {per_node:,.0f} s = {per_node / 60:.1f} min of wall time.")
        if f["measure"] == "top-k wall s" and device != "cpu":
            lines.append(f"* one {device} device: top-k at 550k wells = {f['a_per_N2']} x 550,000^2 + {f['b_per_N']} x "
                         f"550,000 = {f['at_550k']:,.0f} s = {f['at_550k'] / 60:.1f} min.")
        if f["measure"] == "mAP wall s":
            lines.append(f"* threads={f['threads']}: activity + consistency mAP at 550k wells (wall, {device}) = "
                         f"{f['at_550k']:,.0f} s by the same fit.")
    if identical is not None:
        lines.append(f"* {device} against the CPU path at {args.wells[0]:,} wells: "
                     f"{'identical hit rates' if identical else 'DIFFERENT hit rates'}.")
    print("\n".join(lines))
    if args.no_write:
        return
    body = (f"{table}\n\n{fit_table}\n\n" + "\n".join(lines) + "\n\n"
            "Modes nsb, nss and nsp, k = 1..10, queries = every treated well, gallery = the same wells (what "
            "evaluate runs). Fit: least squares of t = a N^2 + b N over the sizes above.\n")
    write_section(f"Retrieval at consortium size ({device})", body)


if __name__ == "__main__":
    main()
