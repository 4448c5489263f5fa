"""Write a synthetic Cell Painting screen to disk in the JUMP cpg0016 layout.

    ./launch.sh synth OUT [preset=NAME] [seed=N] [key=value ...]     (presets and keys: below)

Layout (paths relative to OUT, as in a cpg0016 mirror):
    metadata/{plate,well,compound}.csv.gz
    {source}/images/{batch}/images/{plate}/Images/r01c01f01p01-ch1sk1fk1fl1.tiff   (uint16, one per channel)
    {source}/images/{batch}/illum/{plate}/{plate}_Illum{Channel}.npy
    {source}/workspace/load_data_csv/{batch}/{plate}/load_data.csv
    {source}/workspace/load_data_csv/{batch}/{plate}/load_data_with_illum.parquet
    ground_truth/{compounds.csv, technical.json, config.yaml}
PathName_* columns are relative to OUT (a real mirror's s3:// prefixes are mapped at ingest).
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from micon.progress import bar as progress_bar

from micon import schema
from micon.config import ConfigError, help_or_usage, save_config
from micon.synth import (FACTORS, PRESETS, Screen, SynthConfig, design_screen, illumination_field, render_well_sites,
                         resolve_config)

# Order of the Orig columns in a JUMP load_data file (alphabetical, as cpg0016 writes them).
LOAD_DATA_CHANNELS = ("AGP", "DNA", "ER", "Mito", "RNA")


def write_csv_gz(df: pd.DataFrame, path: Path) -> None:
    """gzip with mtime=0 so the same seed gives the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        gz.write(df.to_csv(index=False).encode())
    path.write_bytes(buf.getvalue())


def phenix_name(well: str, site: int, channel_number: int) -> str:
    r, c = schema.parse_well(well)
    return f"r{r + 1:02d}c{c + 1:02d}f{site:02d}p01-ch{channel_number}sk1fk1fl1.tiff"


def plate_dirs(plate_row) -> dict[str, Path]:
    s, b, p = plate_row.Metadata_Source, plate_row.Metadata_Batch, plate_row.Metadata_Plate
    return dict(images=Path(s) / "images" / b / "images" / p / "Images",
                illum=Path(s) / "images" / b / "illum" / p,
                load_data=Path(s) / "workspace" / "load_data_csv" / b / p)


def write_plate(screen: Screen, plate: str, out: str) -> tuple[str, int]:
    """Render and write one plate: TIFFs, illumination functions, load_data (CSV + parquet)."""
    cfg = screen.config
    root = Path(out)
    prow = screen.plates.set_index("Metadata_Plate").loc[plate]
    prow.Metadata_Plate = plate
    dirs = plate_dirs(prow)
    for d in dirs.values():
        (root / d).mkdir(parents=True, exist_ok=True)
    numbers = screen.tech["sources"][prow.Metadata_Source]["channel_number"]
    if cfg.write_illum:
        pfx = screen.tech["plates"][plate]
        illum = illumination_field(cfg.image_size, pfx["illum_tilt"], pfx["illum_angle"], pfx["illum_vignette"])
        for ch in schema.CHANNELS:
            np.save(root / dirs["illum"] / f"{plate}_Illum{ch}.npy", illum)
    rows = []
    wells = screen.wells[screen.wells.Metadata_Plate == plate]
    n_sites = 0
    for well, jcp in zip(wells.Metadata_Well, wells.Metadata_JCP2022):
        sites = range(1, cfg.sites_per_well + 1)
        for site, img in zip(sites, render_well_sites(screen, plate, well, jcp, sites)):
            row = dict(Metadata_Source=prow.Metadata_Source, Metadata_Batch=prow.Metadata_Batch,
                       Metadata_Plate=plate, Metadata_Well=well, Metadata_Site=str(site))
            for ci, ch in enumerate(schema.CHANNELS):
                name = phenix_name(well, site, numbers[ch])
                tifffile.imwrite(root / dirs["images"] / name, img[ci])
            for ch in LOAD_DATA_CHANNELS:
                row[f"FileName_Orig{ch}"] = phenix_name(well, site, numbers[ch])
                row[f"PathName_Orig{ch}"] = str(dirs["images"]) + "/"
            rows.append(row)
            n_sites += 1
    load_data = pd.DataFrame(rows)
    load_data.to_csv(root / dirs["load_data"] / "load_data.csv", index=False)
    if cfg.write_parquet:
        with_illum = load_data.copy()
        if cfg.write_illum:
            for ch in LOAD_DATA_CHANNELS:
                with_illum[f"FileName_Illum{ch}"] = f"{plate}_Illum{ch}.npy"
                with_illum[f"PathName_Illum{ch}"] = str(dirs["illum"]) + "/"
        with_illum.astype(str).to_parquet(root / dirs["load_data"] / "load_data_with_illum.parquet", index=False)
    return plate, n_sites


def write_screen(cfg, out: Path, progress: bool = True) -> dict:
    """Design and write a whole screen; returns a summary."""
    t0 = time.perf_counter()
    screen = design_screen(cfg)
    out.mkdir(parents=True, exist_ok=True)
    meta = out / "metadata"
    write_csv_gz(screen.plates, meta / "plate.csv.gz")
    write_csv_gz(screen.wells, meta / "well.csv.gz")
    write_csv_gz(screen.compounds[[schema.JCP, schema.INCHIKEY, schema.INCHI, schema.SMILES]],
                 meta / "compound.csv.gz")
    truth = out / "ground_truth"
    truth.mkdir(exist_ok=True)
    gt = screen.compounds.copy()
    for k, name in enumerate(FACTORS):
        gt[f"phenotype_{name}"] = screen.direction[:, k].round(5)
    gt.to_csv(truth / "compounds.csv", index=False)
    (truth / "technical.json").write_text(json.dumps(screen.tech, indent=1, sort_keys=True))
    # workers changes speed, never bytes: leave it out so the tree depends on the content config only
    save_config(dataclasses.replace(cfg, workers=0), truth / "config.yaml")

    workers = cfg.workers or os.cpu_count() or 1
    plates = screen.plates.Metadata_Plate.tolist()
    n_sites = 0
    bar = progress_bar(total=len(plates), desc="synth plates", unit="plate", disable=not progress)
    if workers == 1:
        for p in plates:
            n_sites += write_plate(screen, p, str(out))[1]
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(plates))) as pool:
            futs = [pool.submit(write_plate, screen, p, str(out)) for p in plates]
            for fut in as_completed(futs):
                n_sites += fut.result()[1]
                bar.update()
    bar.close()
    seconds = time.perf_counter() - t0
    counts = screen.wells.merge(screen.compounds[[schema.JCP, "role", "activity"]], on=schema.JCP)
    return dict(out=str(out), plates=len(plates), wells=len(screen.wells), sites=n_sites,
                sources=screen.plates.Metadata_Source.nunique(), batches=screen.plates.Metadata_Batch.nunique(),
                compounds=int((screen.compounds.role == schema.TREATED).sum()),
                active=int(((screen.compounds.role == schema.TREATED) & (screen.compounds.magnitude > 0)).sum()),
                dmso_wells=int((counts.role == schema.NEGCON).sum()), seconds=round(seconds, 2),
                workers=workers)


def presets_help(width: int = 100) -> str:
    """Every preset of micon.synth.PRESETS with the keys it sets (those that differ from preset=tiny's)."""
    base = resolve_config([])
    lines = ["presets (preset=NAME sets these keys; key=value given after it win):"]
    for name, values in PRESETS.items():
        diff = " ".join(f"{k}={v}" for k, v in values.items() if getattr(base, k) != v) or "(the defaults above)"
        lines += textwrap.wrap(diff, width, initial_indent=f"  {name:<17} ", subsequent_indent=" " * 20)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if (rc := help_or_usage(argv, __doc__, SynthConfig, positional=1, instance=resolve_config([]),
                            extra=presets_help())) is not None:
        return rc
    out = Path(argv[0])
    try:
        cfg = resolve_config(argv[1:])
    except ConfigError as e:
        print(f"synth: {e}", file=sys.stderr)
        return 2
    s = write_screen(cfg, out)
    print(f"synth: wrote {s['sites']} sites ({s['wells']} wells, {s['plates']} plates, {s['batches']} batches, "
          f"{s['sources']} sources; {s['compounds']} compounds of which {s['active']} active, "
          f"{s['dmso_wells']} DMSO wells) to {out} in {s['seconds']} s "
          f"[preset={cfg.preset} seed={cfg.seed} image_size={cfg.image_size}]")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
