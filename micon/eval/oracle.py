"""The ceiling of a synthetic screen: each well's true phenotype, read from the screen's ground truth.

A well's oracle profile is the log of the morphology factors its cells were rendered with
(micon.synth.well_factors): the compound's phenotype as expressed in the well's source, at its magnitude,
plus the well's biological variation. It is what a perfect reader of the images could recover; every
technical effect (staining, optics, density, illumination) is absent. Pure: tables in, arrays out.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from micon import schema
from micon.synth import FACTOR_SCALE, FACTORS, N_FACTORS, SynthConfig, site_seed, source_phenotype

FEATURE_NAMES = [f"oracle_{name}" for name in FACTORS]


class OracleError(ValueError):
    pass


def truth_tables(compounds: pd.DataFrame) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
    """ground_truth/compounds.csv -> (row of each compound id, directions [n, N_FACTORS], magnitudes [n])."""
    columns = [f"phenotype_{name}" for name in FACTORS]
    missing = [c for c in (schema.JCP, "magnitude", *columns) if c not in compounds.columns]
    if missing:
        raise OracleError(f"ground-truth compound table lacks columns {missing}: write the screen again with "
                          f"./launch.sh synth")
    rows = {jcp: i for i, jcp in enumerate(compounds[schema.JCP].astype(str))}
    return (rows, compounds[columns].to_numpy(np.float64),
            compounds["magnitude"].to_numpy(np.float64))


def oracle_well_profiles(wells: pd.DataFrame, compounds: pd.DataFrame, cfg: SynthConfig,
                         well_variation: bool = True) -> np.ndarray:
    """[n_wells, N_FACTORS] float64: for each row of `wells` (Metadata_Source, Metadata_Plate, Metadata_Well,
    Metadata_JCP2022) the log morphology factors FACTOR_SCALE * m_s * d_s (+ the well's biological noise,
    drawn as the renderer drew it, when `well_variation`). Without that noise every DMSO well is 0 and a
    per-plate MAD against DMSO is undefined, which is why it is on by default."""
    rows, direction, magnitude = truth_tables(compounds)
    out = np.zeros((len(wells), N_FACTORS))
    cache: dict[tuple, np.ndarray] = {}
    keys = zip(wells[schema.SOURCE].astype(str), wells[schema.PLATE].astype(str), wells[schema.WELL].astype(str),
               wells[schema.JCP].astype(str))
    for i, (source, plate, well, jcp) in enumerate(keys):
        if (source, plate, well, jcp) not in cache:
            if jcp not in rows:
                raise OracleError(f"well {plate}/{well} holds compound {jcp}, which the ground truth does not list: "
                                  f"these shards were not made from this screen")
            ci = rows[jcp]
            d, m = source_phenotype(cfg, direction[ci], float(magnitude[ci]), source, jcp)
            value = FACTOR_SCALE * m * np.asarray(d, np.float64)
            if well_variation:
                value = value + site_seed(cfg.seed, plate, well, 0).normal(0, cfg.well_noise, N_FACTORS)
            cache[source, plate, well, jcp] = value
        out[i] = cache[source, plate, well, jcp]
    return out
