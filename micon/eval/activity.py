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


NULL_PREFIX = "NULL_"


def negcon_null(wells: pd.DataFrame, raw: np.ndarray, *, share: float = 0.5, seed: int = 0, repeats: int = 1,
                replicates: int | None = None, null_size: int = 10000, normalise=None,
                **recipe) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The mAP of activity that DMSO itself reaches on this screen, beside the compounds' under the same fit.

    The random-ranking chance (and copairs' permutation p-value) takes a compound without effect to be
    exchangeable with its plates' DMSO wells. Under the profiling recipe it is not, because those DMSO
    wells are also what the profiles were fitted on: the per-plate median and MAD pull them toward the
    plate's other wells (an inactive compound falls below chance), and ZCA whitening fitted on fewer DMSO
    wells than features leaves every out-of-fit well standing apart from them (it rises above chance, the
    more the closer the feature count comes to the DMSO count). The size of each depends on the features,
    so mAP of activity is not comparable across feature sets against the random-ranking chance alone.

    Here a `share` of each plate's DMSO wells (drawn with `seed`) become pseudo-compounds of as many wells
    as a compound has (`replicates`, by default the median), each well on a different plate, as a
    compound's replicates are (`pseudo_compounds`). The profiles are normalised again (`normalise_wells`,
    `recipe`: its keyword arguments; or `normalise(wells, raw) -> (wells, raw, profiles)`, another profile
    recipe) on the remaining DMSO wells alone, so a pseudo-compound's wells and a compound's wells are
    both out of the fit: for a compound without effect the two are exchangeable, and the pseudo-compounds'
    mAP is the level an inactive compound reaches. `wells`, `raw`: aggregated wells (`aggregate_wells`).
    `repeats` > 1 draws that many splits (seeds `seed`, `seed` + 1, ...), so that a screen with few DMSO
    wells per plate (few pseudo-compounds) still gets a steady level. Returns (compounds' mAP frame,
    pseudo-compounds' mAP frame), copairs' recipe on those profiles, with a `repeat` column.
    """
    from micon.eval.map import phenotypic_activity
    from micon.eval.profiles import normalise_wells

    comps, nulls = [], []
    for r in range(repeats):
        pseudo = pseudo_compounds(wells, share=share, seed=seed + r, replicates=replicates)
        w, _, prof = normalise(pseudo, raw) if normalise is not None else normalise_wells(pseudo, raw, **recipe)
        keep = w[schema.ROLE].isin([schema.TREATED, schema.NEGCON]).to_numpy()
        _, m = phenotypic_activity(w[keep].reset_index(drop=True), prof[keep], null_size=null_size, seed=seed + r)
        m = m[m[schema.JCP] != schema.DMSO].assign(repeat=r)
        is_null = m[schema.JCP].str.startswith(NULL_PREFIX).to_numpy()
        comps.append(m[~is_null])
        nulls.append(m[is_null])
    return pd.concat(comps, ignore_index=True), pd.concat(nulls, ignore_index=True)


def pseudo_compounds(wells: pd.DataFrame, *, share: float = 0.5, seed: int = 0,
                     replicates: int | None = None) -> pd.DataFrame:
    """`wells` (same rows, same order) with a `share` of each plate's DMSO wells relabelled as treated
    pseudo-compounds of `replicates` wells each, every well on a different plate, like a compound's
    replicates (see `negcon_null`). `replicates`: by default the median number of wells of a treated
    compound. The i-th drawn wells of the plates, in a random order of plates, are cut into groups of that
    size; a remainder too small for a group stays DMSO. A plate keeps at least one DMSO well: with `share`
    0.5 and 16 DMSO wells per plate, 8 of each plate's go into pseudo-compounds (on cpg0016, with about 5
    wells per compound over 1,876 plates, that is about 8 x 375 pseudo-compounds of 5 wells)."""
    from micon.eval.profiles import negcon_mask

    if not 0 < share < 1:
        raise ValueError(f"negcon_null: share must lie in (0, 1), got {share}")
    rng = np.random.default_rng(seed)
    w = wells.reset_index(drop=True).copy()
    neg = negcon_mask(w)
    if schema.ROLE not in w.columns:        # roles from the JCP2022 ids: DMSO is negcon, the rest treated
        w[schema.ROLE] = np.where(neg, schema.NEGCON, schema.TREATED)
    if replicates is None:
        sizes = w.loc[(w[schema.ROLE] == schema.TREATED).to_numpy(), schema.JCP].value_counts()
        replicates = int(sizes.median()) if len(sizes) else 2
    replicates = max(int(replicates), 2)
    plates = w.loc[neg, schema.PLATE]
    order = pd.Series(rng.random(len(w)))[neg].groupby(plates).rank(method="first").astype(int)
    n_held = np.floor(share * plates.map(plates.value_counts())).astype(int)
    held = order[order <= n_held]
    plate_rank = dict(zip(rng.permutation(plates.unique()), range(plates.nunique())))
    frame = pd.DataFrame({"i": held, "p": plates[held.index].map(plate_rank)}).sort_values(["i", "p"])
    frame["g"] = frame.groupby("i").cumcount() // replicates
    frame["n"] = frame.groupby(["i", "g"])["p"].transform("size")
    frame = frame[frame["n"] == replicates]
    if frame.empty:
        raise ValueError(f"negcon_null: too few DMSO wells for one pseudo-compound of {replicates} wells on "
                         f"{replicates} plates (each plate keeps at least one DMSO well)")
    codes = frame.groupby(["i", "g"], sort=True).ngroup()
    w.loc[frame.index, schema.JCP] = [f"{NULL_PREFIX}{k:04d}" for k in codes]
    w.loc[frame.index, schema.ROLE] = schema.TREATED
    return w


def null_summary(compounds: pd.DataFrame, null: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict:
    """`negcon_null`'s two frames as the report's numbers: `map_activity_null` (the pseudo-compounds' mean
    mAP over every repeat: what a compound without effect reaches), `map_activity_over_null` (the compounds'
    mean mAP under the same fits, each compound averaged over the repeats, minus it; about 0 when no
    compound has an effect) with a bootstrap interval over compounds (`_lo`, `_hi`; the null's own spread
    is not resampled; `_chance`: 0, the level of a compound without effect), and `n_null_compounds`
    (pseudo-compounds per repeat)."""
    m = compounds.groupby(schema.JCP)["mean_average_precision"].mean().to_numpy(np.float64)
    level_ = float(null["mean_average_precision"].mean()) if len(null) else float("nan")
    per_repeat = null.groupby("repeat").size().max() if "repeat" in null.columns and len(null) else len(null)
    out = dict(map_activity_null=level_, n_null_compounds=int(per_repeat),
               map_activity_over_null=float(m.mean() - level_) if len(m) else float("nan"),
               map_activity_over_null_chance=0.0,
               map_activity_over_null_lo=float("nan"), map_activity_over_null_hi=float("nan"))
    if len(m) > 1:
        boots = m[np.random.default_rng(seed).integers(0, len(m), (n_boot, len(m)))].mean(axis=1) - level_
        out["map_activity_over_null_lo"], out["map_activity_over_null_hi"] = (
            float(v) for v in np.quantile(boots, [(1 - level) / 2, (1 + level) / 2]))
    return out
