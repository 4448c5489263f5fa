"""A first-pass activity call: which compounds look different from DMSO at all?

On JUMP most compounds are indistinguishable from DMSO; their replicates cannot be matched, and at
consortium scale they fill a contrastive loss with noise. The call is the field's recipe (copairs):
phenotypic-activity mAP of each compound's wells against same-plate DMSO wells, a permutation p-value,
Benjamini-Hochberg over compounds; active = corrected p below `threshold`. Its table feeds the
replicate-set builder as weights (`./launch.sh rsets SHARDS weights=FILE`), e.g. active 1, inactive 0.25.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from micon import schema


def activity_call(wells: pd.DataFrame, prof: np.ndarray, threshold: float = 0.05, null_size: int = 10000,
                  seed: int = 0) -> pd.DataFrame:
    """Per treated compound: `mean_average_precision`, `corrected_p_value`, `active` (normalised well
    profiles in, e.g. hand-crafted or SimCLR profiles after MAD + ZCA)."""
    from micon.eval.map import phenotypic_activity

    keep = wells[schema.ROLE].isin([schema.TREATED, schema.NEGCON]).to_numpy()
    _, m = phenotypic_activity(wells[keep].reset_index(drop=True), np.asarray(prof)[keep], null_size=null_size,
                               threshold=threshold, seed=seed)
    m = m[m[schema.JCP] != schema.DMSO].reset_index(drop=True)
    return m.assign(active=(m["corrected_p_value"] < threshold).to_numpy())


def weights_table(call: pd.DataFrame, inactive_weight: float = 0.25) -> pd.DataFrame:
    """The rsets job's weights table: Metadata_JCP2022, weight (1 active, `inactive_weight` otherwise)."""
    return pd.DataFrame({schema.JCP: call[schema.JCP], "weight": np.where(call.active, 1.0, inactive_weight)})
