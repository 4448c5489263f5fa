"""Naive per-image features of a synthetic screen read straight from its TIFFs (test helper)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from micon import schema


def load_data_frames(root: Path) -> pd.DataFrame:
    return pd.concat([pd.read_csv(p, dtype=str) for p in sorted(root.glob("*/workspace/load_data_csv/*/*/load_data.csv"))],
                     ignore_index=True)


def well_features(root: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-site channel log-mean and log-spread, averaged per well: the simplest profile there is."""
    ld = load_data_frames(root)
    feats = []
    for _, r in ld.iterrows():
        f = []
        for ch in schema.CHANNELS:
            im = tifffile.imread(root / r[f"PathName_Orig{ch}"] / r[f"FileName_Orig{ch}"]).astype(np.float64)
            f += [np.log(im.mean()), np.log(im.std())]
        feats.append(f)
    site = ld[[schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL]].copy()
    x = pd.DataFrame(np.array(feats), index=site.index)
    wells = pd.concat([site, x], axis=1).groupby([schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL],
                                                 as_index=False).mean()
    meta = wells[[schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL]].merge(
        pd.read_csv(root / "metadata" / "well.csv.gz"), on=[schema.SOURCE, schema.PLATE, schema.WELL])
    return meta, wells.drop(columns=[schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL]).to_numpy()
