"""Is a synthetic screen as hard as real data? The field's baseline's levels, measured in memory.

The field's anchors (FIELD-NOTES; the MICON authors' notebook on JUMP, processed CellProfiler features):
replicate retrieval top-10 within a source (NSB) ~0.17 and across sources (NSS) ~0.09, and raw well
profiles classified by source with kNN accuracy 0.95-1.0. `ANCHORS` holds the bands a calibrated screen
must land in. `simulate_baseline` renders a screen site by site (micon.synth), preprocesses each site as
ingest does (illumination correction, per-image percentile scaling to 8 bits: micon.data.imaging), computes
a named featuriser's features as the embed job does (default: the CellProfiler-grade `cellprofiler`), and
builds well profiles as `evaluate` does (mean over sites, per-plate MAD against DMSO, ZCA-cor fitted on DMSO).
No files; the 300-compound `calibrated` screen takes a few minutes on 2 cores (`image_stats`: about 15 s).
`levels` is shared with the comparison (bench/science.py), which measures the same numbers through the real jobs.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd

from micon import schema

# (low, high) bands; None = no bound on that side
ANCHORS = {
    "nsb_top10": (0.12, 0.22),
    "nss_top10": (0.06, 0.13),
    "source_knn_raw": (0.90, None),
}
ANCHOR_SOURCE = ("MICON authors' notebook on JUMP (processed CellProfiler features): top-10 0.166 within a "
                 "source, 0.092 across sources; raw CellProfiler profiles classified by source with kNN "
                 "accuracy 0.95-1.0")


def knn_accuracy(feats: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Leave-one-out k-nearest-neighbour accuracy (Euclidean on z-scored features, majority vote, ties
    to the nearest): how well a label (the source) can be read off the profiles. Chance = largest class share."""
    x = np.asarray(feats, np.float64)
    sd = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    sq = (x ** 2).sum(axis=1)
    d = sq[:, None] + sq[None, :] - 2 * x @ x.T
    np.fill_diagonal(d, np.inf)
    nn = np.argsort(d, axis=1, kind="stable")[:, :k]
    codes, y = np.unique(np.asarray(labels), return_inverse=True)
    votes = np.zeros((len(x), len(codes)))
    for j in range(k):   # nearer neighbours break ties: weight 1 + tiny decreasing bonus
        np.add.at(votes, (np.arange(len(x)), y[nn[:, j]]), 1.0 + 1e-6 * (k - j))
    return float((votes.argmax(axis=1) == y).mean())


def levels(wells: pd.DataFrame, raw: np.ndarray, prof: np.ndarray, k: int = 10) -> dict:
    """The calibration numbers of one set of well profiles: NSB/NSS top-1 and top-k of the normalised
    profiles, and source kNN accuracy of raw and normalised profiles (all wells, DMSO included)."""
    from micon.eval.retrieval import topk_hit_rate

    topk = topk_hit_rate(wells, prof, ks=range(1, k + 1), modes=("nsb", "nss")).set_index("k")
    src = wells[schema.SOURCE].to_numpy()
    return {"nsb_top1": float(topk.loc[1, "nsb"]), f"nsb_top{k}": float(topk.loc[k, "nsb"]),
            "nss_top1": float(topk.loc[1, "nss"]), f"nss_top{k}": float(topk.loc[k, "nss"]),
            "source_knn_raw": knn_accuracy(raw, src), "source_knn_normalised": knn_accuracy(prof, src),
            "source_chance": float(pd.Series(src).value_counts(normalize=True).max())}


def within(name: str, value: float) -> bool:
    lo, hi = ANCHORS[name]
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def _plate_features(args) -> tuple[list[dict], np.ndarray]:
    screen, plate, featuriser = args
    from micon.data.imaging import scale_to_uint8
    from micon.eval.featurisers import get_featuriser
    from micon.synth import illumination_field, render_well_sites

    feat = get_featuriser(featuriser)

    cfg = screen.config
    pfx = screen.tech["plates"][plate]
    illum = illumination_field(cfg.image_size, pfx["illum_tilt"], pfx["illum_angle"], pfx["illum_vignette"])
    prow = screen.plates.set_index("Metadata_Plate").loc[plate]
    roles = dict(zip(screen.compounds.Metadata_JCP2022, screen.compounds.role))
    rows, feats = [], []
    wells = screen.wells[screen.wells.Metadata_Plate == plate]
    for well, jcp in zip(wells.Metadata_Well, wells.Metadata_JCP2022):
        sites = range(1, cfg.sites_per_well + 1)
        for site, img in zip(sites, render_well_sites(screen, plate, well, jcp, sites)):
            u8 = np.stack([scale_to_uint8(c.astype(np.float32) / np.maximum(illum, 1e-6)) for c in img])
            feats.append(feat.embed(u8[None], schema.CHANNELS)[0])
            rows.append({schema.SOURCE: prow.Metadata_Source, schema.BATCH: prow.Metadata_Batch,
                         schema.PLATE: plate, schema.WELL: well, schema.SITE: str(site), schema.JCP: jcp,
                         schema.ROLE: roles[jcp]})
    return rows, np.stack(feats)


def simulate_baseline(cfg, workers: int = 0, featuriser: str = "cellprofiler",
                      progress: bool = False) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """(well metadata, raw well profiles, normalised profiles) of a featuriser (micon.eval.featurisers; default
    the CellProfiler-grade baseline) on the screen `cfg` (a micon.synth.SynthConfig), without writing anything."""
    from micon.eval.profiles import well_profiles
    from micon.synth import design_screen

    screen = design_screen(cfg)
    plates = screen.plates.Metadata_Plate.tolist()
    workers = workers or min(len(plates), os.cpu_count() or 1)
    from micon.progress import bar as progress_bar

    jobs = [(screen, p, featuriser) for p in plates]
    bar = dict(total=len(plates), desc=f"{featuriser} features", unit="plate", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(progress_bar(pool.map(_plate_features, jobs), **bar))
    else:
        parts = [_plate_features(j) for j in progress_bar(jobs, **bar)]
    meta = pd.DataFrame([r for rows, _ in parts for r in rows])
    feats = np.concatenate([f for _, f in parts])
    return well_profiles(meta, feats)

