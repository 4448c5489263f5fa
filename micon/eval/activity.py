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
                  seed: int = 0, top_share: float = 0.0) -> pd.DataFrame:
    """Per treated compound: `mean_average_precision`, `corrected_p_value`, `active` (normalised well
    profiles in, e.g. hand-crafted or SimCLR profiles after MAD + ZCA).

    `top_share` > 0 calls the top share of compounds by mAP active instead of the BH rule: copairs' null
    for a compound's mAP is conservative (its wells share one null stream, so the null of the mean is as
    wide as a single AP's), and with a plate's 16 DMSO wells the rule can call nothing at all even where
    the ranking by mAP separates active from inactive compounds well (docs/RESULTS.md)."""
    from micon.eval.map import phenotypic_activity

    keep = wells[schema.ROLE].isin([schema.TREATED, schema.NEGCON]).to_numpy()
    _, m = phenotypic_activity(wells[keep].reset_index(drop=True), np.asarray(prof)[keep], null_size=null_size,
                               threshold=threshold, seed=seed)
    m = m[m[schema.JCP] != schema.DMSO].reset_index(drop=True)
    if top_share > 0:
        n = int(round(top_share * len(m)))
        top = m["mean_average_precision"].rank(ascending=False, method="first") <= n
        return m.assign(active=top.to_numpy(), rule=f"top {top_share:.0%} by mAP")
    return m.assign(active=(m["corrected_p_value"] < threshold).to_numpy(), rule=f"BH-corrected p < {threshold}")


def weights_table(call: pd.DataFrame, inactive_weight: float = 0.25) -> pd.DataFrame:
    """The rsets job's weights table: Metadata_JCP2022, weight (1 active, `inactive_weight` otherwise)."""
    return pd.DataFrame({schema.JCP: call[schema.JCP], "weight": np.where(call.active, 1.0, inactive_weight)})
