"""The named featurisers side by side: CPU cost per site and per 1,000 sites of the CellProfiler-grade
baseline (`cellprofiler`, the demo's and the comparison's), the full CellProfiler set (`cellprofiler_full`)
and the whole-image statistics that were the baseline before (`image_stats`), on the demo's sites.

    python bench/bench_featurisers.py [--sites 40] [--full-sites 4] [--size 64] [--no-write]

Sites are rendered from the `calibrated_small` screen and scaled to 8 bits as ingest does. Times are CPU
seconds of this process (time.process_time, best of --repeats), so other work on the machine does not
inflate them. Also printed: where the `cellprofiler` set spends its time (segmentation, each measurement).
Writes the "Featurisers: cost per site" section of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench._report import markdown_table, write_section  # noqa: E402
from micon import schema  # noqa: E402

DEMO_SITES = 1620        # the demo's screen (calibrated_small)
DEMO_ACTORS = 2          # the embed job's CPU actors on 2 cores


def render_sites(n: int, size: int) -> np.ndarray:
    """n uint8 sites of the calibrated_small screen (its first wells), preprocessed as ingest does."""
    from micon.data.imaging import scale_to_uint8
    from micon.synth import design_screen, illumination_field, render_well_sites, resolve_config

    screen = design_screen(resolve_config(["preset=calibrated_small", f"image_size={size}"]))
    plate = screen.plates.Metadata_Plate.iloc[0]
    pfx = screen.tech["plates"][plate]
    illum = illumination_field(size, pfx["illum_tilt"], pfx["illum_angle"], pfx["illum_vignette"])
    wells = screen.wells[screen.wells.Metadata_Plate == plate]
    sites = []
    for well, jcp in zip(wells.Metadata_Well, wells.Metadata_JCP2022):
        for img in render_well_sites(screen, plate, well, jcp, range(1, screen.config.sites_per_well + 1)):
            sites.append(np.stack([scale_to_uint8(c.astype(np.float32) / np.maximum(illum, 1e-6)) for c in img]))
            if len(sites) == n:
                return np.stack(sites)
    return np.stack(sites)


def cpu_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def breakdown(sites: np.ndarray, repeats: int) -> list[dict]:
    """CPU ms per site of the `cellprofiler` set's segmentation and of each of its measurements."""
    from micon.eval.cellprofiler import CELLPROFILER, FeatureSet, _relabel, measure_objects, segment

    ch = list(schema.CHANNELS)
    segs = [segment(s, ch, CELLPROFILER.segmentation) for s in sites]
    rows = [{"part": "segmentation (nuclei, cells, cytoplasm)",
             "ms_per_site": 1e3 * cpu_seconds(lambda: [segment(s, ch) for s in sites], repeats) / len(sites)}]
    labels = [{"Nuclei": n, "Cells": c, "Cytoplasm": _relabel(y)} for n, c, y in segs]
    for m in CELLPROFILER.measures:
        one = FeatureSet("part", "", (m,))
        t = cpu_seconds(lambda: [measure_objects(s, ch, lab, one) for s, lab in zip(sites, labels)], repeats)
        what = f"{m.function} on {'/'.join(m.compartments)}" + (f" x {'/'.join(m.channels)}" if m.channels else "")
        rows.append({"part": what, "ms_per_site": 1e3 * t / len(sites)})
    for r in rows:
        r["ms_per_site"] = f"{r['ms_per_site']:.1f}"
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=40, help="sites timed for the fast featurisers")
    ap.add_argument("--full-sites", type=int, default=4, help="sites timed for cellprofiler_full (seconds each)")
    ap.add_argument("--size", type=int, default=64, help="site size in px (the demo's: 64)")
    ap.add_argument("--repeats", type=int, default=3, help="best of N (the full set: once)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    a = ap.parse_args()
    from micon.eval.cellprofiler import segment
    from micon.eval.featurisers import FEATURISERS, get_featuriser

    sites = render_sites(max(a.sites, a.full_sites), a.size)
    ch = list(schema.CHANNELS)
    n_obj = np.mean([segment(s, ch)[0].max() for s in sites[:a.sites]])
    rows, per_site = [], {}
    base = None
    for name in ("image_stats", "cellprofiler", "cellprofiler_full"):
        if name not in FEATURISERS:
            continue
        f = get_featuriser(name)
        n = a.full_sites if name == "cellprofiler_full" else a.sites
        f.embed(sites[:1], ch)                      # imports and name probes outside the timing
        t = cpu_seconds(lambda: f.embed(sites[:n], ch), 1 if name == "cellprofiler_full" else a.repeats) / n
        base = base or t
        per_site[name] = t
        rows.append({"featuriser": name, "features": len(f.feature_names(ch)), "sites timed": n,
                     "ms_per_site": f"{1e3 * t:.1f}", "s_per_1000_sites": f"{1e3 * t:.0f}",
                     "vs image_stats": f"x{t / base:.0f}" if t / base >= 10 else f"x{t / base:.1f}",
                     "demo embed, 1,620 sites on 2 actors": f"{DEMO_SITES * t / DEMO_ACTORS:.0f} s"})
        print(f"bench_featurisers: {name}: {1e3 * t:.1f} ms per site", flush=True)
    parts = breakdown(sites[:a.sites], a.repeats)
    table, table_parts = markdown_table(rows), markdown_table(parts)
    print(table)
    print(table_parts)
    body = (f"{a.size} px sites of the `calibrated_small` screen (the demo's; {n_obj:.1f} nuclei per site found), "
            f"CPU seconds of one process (`time.process_time`, best of {a.repeats}; `cellprofiler_full` once, "
            f"on {a.full_sites} sites). One core per embed actor, so the demo's two actors take about half the "
            f"per-core time.\n\n{table}\n\nWhere `cellprofiler` spends its time, ms per site:\n\n{table_parts}\n\n"
            "`cellprofiler_full` is every measurement cp-measure has at CellProfiler's defaults (Haralick texture "
            "at 256 grey levels, which is most of its cost, all compartment x channel pairs and all channel "
            "pairs for correlation, Costes included). The demo and the comparison use `cellprofiler`, the "
            "subset listed in micon/eval/cellprofiler.py (CELLPROFILER), with the same names. The demo embeds "
            f"`cellprofiler` where it embedded `image_stats` before: its embed stage costs about "
            f"{DEMO_SITES * (per_site['cellprofiler'] - per_site['image_stats']) / DEMO_ACTORS:.0f} s more on 2 "
            "cores. Process time is counted, so jobs running beside the benchmark change these numbers little.")
    if not a.no_write:
        write_section("Featurisers: cost per site", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
