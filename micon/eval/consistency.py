"""Consistency as the field scores it: on consensus profiles (the median of each compound's wells), are
compounds that share an annotation (a target, a mechanism) closer to each other than to the others?
copairs' pair rules through `micon.eval.map.average_precision`; cost grows with the annotated compounds
squared, not with the wells."""
from __future__ import annotations


import numpy as np
import pandas as pd

from micon import schema
from micon.eval.map import Ties, _negcon, average_precision, mean_average_precision


def consensus_profiles(meta: pd.DataFrame, feats: np.ndarray, *, compound_col: str = schema.JCP,
                       method: str = "median") -> tuple[pd.DataFrame, np.ndarray]:
    """One profile per compound: the `method` (median, as pycytominer's aggregate and JUMP's consensus) of
    its wells' profiles; metadata columns constant within a compound are kept, with `n_wells`."""
    from micon.eval.profiles import aggregate_wells

    cons_meta, cons = aggregate_wells(meta.reset_index(drop=True), np.asarray(feats), by=[compound_col], method=method)
    return cons_meta.rename(columns={"n_sites": "n_wells"}), cons


def target_consistency(meta: pd.DataFrame, feats: np.ndarray, annotation: str, *, compound_col: str = schema.JCP,
                       separator: str = "|", null_size: int = 10000, threshold: float = 0.05, seed: int = 0,
                       ties: Ties = "expected", **kwargs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Phenotypic consistency as the field scores it (Arevalo et al. 2024; JUMP's recipe): on consensus
    profiles (the median of each compound's wells, DMSO and unannotated compounds left out), are compounds
    that share an annotation (`annotation`, e.g. a target; several joined by `separator` count for each)
    closer to each other than to compounds that share none? Positives: other compounds with the same
    annotation; negatives: compounds with a different one. Returns (AP frame per compound x annotation,
    mAP frame per annotation). Cost grows with the annotated compounds squared, not the wells."""
    keep = ~_negcon(meta, compound_col) & meta[annotation].notna().to_numpy() & \
        (meta[annotation].astype(str).str.strip() != "").to_numpy()
    sub = meta.reset_index(drop=True).loc[keep, [compound_col, annotation]].reset_index(drop=True)
    cons_meta, cons = consensus_profiles(sub, np.asarray(feats)[keep], compound_col=compound_col)
    if annotation not in cons_meta.columns:
        raise ValueError(f"target_consistency: {annotation} differs between wells of one compound")
    labels = cons_meta[annotation].astype(str).str.split(separator)
    rows = np.repeat(np.arange(len(cons_meta)), labels.str.len().to_numpy())
    exploded = cons_meta.iloc[rows].reset_index(drop=True)
    exploded[annotation] = [s.strip() for parts in labels for s in parts]
    # a compound with two annotations is neither its own positive nor its own negative
    ap = average_precision(exploded, cons[rows], pos_sameby=[annotation], pos_diffby=[compound_col], neg_sameby=[],
                           neg_diffby=[annotation, compound_col], ties=ties, **kwargs)
    return ap, mean_average_precision(ap, [annotation], null_size=null_size, threshold=threshold, seed=seed)
