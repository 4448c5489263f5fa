"""Synthetic screen generation speed: sites per second per core by image size and worker count.

    python bench/bench_synth.py [--quick]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from bench._report import markdown_table, write_section  # noqa: E402
from data_prep.synth import write_screen  # noqa: E402
from micon.synth import design_screen, render_well_sites, resolve_config  # noqa: E402


def render_only(cfg, n_sites: int) -> float:
    """Sites/s for rendering alone (no TIFF writes), one core."""
    screen = design_screen(cfg)
    wells = screen.wells.head(max(1, n_sites // cfg.sites_per_well))
    t0 = time.perf_counter()
    n = 0
    for plate, well, jcp in zip(wells.Metadata_Plate, wells.Metadata_Well, wells.Metadata_JCP2022):
        n += len(render_well_sites(screen, plate, well, jcp, range(1, cfg.sites_per_well + 1)))
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller screens")
    args = ap.parse_args()
    rows = []
    sizes = [(64, "tiny"), (96, "demo"), (256, "small"), (1080, "jump")]
    for size, name in sizes:
        n_sites = 40 if size >= 1080 else (200 if size >= 256 else 600)
        if args.quick:
            n_sites //= 4
        cfg = resolve_config(["preset=demo", f"image_size={size}", "workers=1"])
        rate = render_only(cfg, n_sites)
        rows.append({"what": f"render only, {size} px", "workers": 1, "sites/s": f"{rate:.1f}",
                     "sites/s/core": f"{rate:.1f}", "MB/site (5 x uint16 TIFF)": f"{5 * size * size * 2 / 1e6:.2f}"})
    for workers in (1, 2):
        out = Path(tempfile.mkdtemp())
        try:
            cfg = resolve_config(["preset=demo", f"workers={workers}"])
            s = write_screen(cfg, out / "screen", progress=False)
        finally:
            shutil.rmtree(out)
        rate = s["sites"] / s["seconds"]
        rows.append({"what": f"full demo screen to disk ({s['sites']} sites, 96 px)", "workers": workers,
                     "sites/s": f"{rate:.1f}", "sites/s/core": f"{rate / workers:.1f}",
                     "MB/site (5 x uint16 TIFF)": f"{5 * 96 * 96 * 2 / 1e6:.2f}"})
    table = markdown_table(rows)
    print(table)
    write_section("Synthetic screen generation", table + "\n\nRendering is NumPy/SciPy per cell window; "
                  "writing adds one TIFF per channel per site. Plates are independent, so generation scales "
                  "with processes (one plate per task).")


if __name__ == "__main__":
    main()
