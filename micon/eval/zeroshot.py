"""Zero-shot retrieval: profiles predicted from molecules alone, scored against the wells of the screen.

For each query compound, its predicted profile ranks the candidate wells (cosine similarity); the first
well of the same compound has a rank r (1 + wells of other compounds scored strictly higher). Reported:
the share of queries with r <= ceil(1% of the wells) ("top-1% accuracy", as CLOOME and MolPhenix report
molecule -> image retrieval), r <= k, and the same among compounds (each candidate compound's mean well
profile). Pure NumPy: arrays and ids in, numbers and a per-query table out.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _chance_hit(n_candidates: int, n_positive: int, k: int) -> float:
    """Probability that a random ranking puts one of n_positive among the first k of n_candidates."""
    k = min(k, n_candidates)
    if n_positive <= 0:
        return 0.0
    if n_candidates - n_positive < k:
        return 1.0
    return 1.0 - math.comb(n_candidates - n_positive, k) / math.comb(n_candidates, k)


def first_hit_ranks(query_ids: np.ndarray, queries: np.ndarray, candidate_ids: np.ndarray,
                    candidates: np.ndarray) -> np.ndarray:
    """For each query, 1 + the number of candidates of another id scored strictly higher (cosine) than the
    best candidate of its own id; 0 when no candidate has its id."""
    sims = _unit(queries) @ _unit(candidates).T
    own = np.asarray(query_ids)[:, None] == np.asarray(candidate_ids)[None, :]
    best_own = np.where(own, sims, -np.inf).max(axis=1)
    ranks = 1 + ((sims > best_own[:, None]) & ~own).sum(axis=1)
    return np.where(own.any(axis=1), ranks, 0)


def zero_shot_retrieval(pred_ids: Sequence[str], pred: np.ndarray, well_ids: Sequence[str], wells: np.ndarray,
                        ks: Sequence[int] = (1, 10), fraction: float = 0.01) -> tuple[dict, pd.DataFrame]:
    """Predicted profiles `pred` [n, D] of compounds `pred_ids` against well profiles `wells` [m, D] of
    compounds `well_ids` (the candidates, in the same space). Queries are the predicted compounds that have
    wells; every well counts as a candidate. Returns metrics (zs_well_top1pct, zs_well_top{k},
    zs_compound_top1pct, zs_compound_top{k}, each with _chance; n_queries, n_wells, n_compounds) and one row
    per query (compound, well_rank, compound_rank)."""
    pred_ids, well_ids = np.asarray(pred_ids, dtype=object), np.asarray(well_ids, dtype=object)
    pred, wells = np.asarray(pred, np.float64), np.asarray(wells, np.float64)
    if len(pred_ids) != len(pred) or len(well_ids) != len(wells):
        raise ValueError(f"{len(pred_ids)} ids for {len(pred)} predictions, {len(well_ids)} for {len(wells)} wells")
    if len(pred) and len(wells) and pred.shape[1] != wells.shape[1]:
        raise ValueError(f"predictions have {pred.shape[1]} features but the wells {wells.shape[1]}: score them "
                         f"in the same space (the predict job's well_profiles.parquet)")
    keep = np.isin(pred_ids, well_ids)
    q_ids, q = pred_ids[keep], pred[keep]
    compounds = pd.unique(well_ids)
    codes = pd.Index(compounds).get_indexer(well_ids)
    sums = np.zeros((len(compounds), wells.shape[1] if wells.ndim == 2 else 0))
    np.add.at(sums, codes, _unit(wells))
    consensus = sums / np.bincount(codes, minlength=len(compounds))[:, None]
    well_rank = first_hit_ranks(q_ids, q, well_ids, wells)
    compound_rank = first_hit_ranks(q_ids, q, compounds, consensus)
    per_query = pd.DataFrame({"compound": q_ids, "well_rank": well_rank, "compound_rank": compound_rank})
    n_wells, n_compounds = len(wells), len(compounds)
    n_pos = pd.Series(well_ids).value_counts().reindex(q_ids).to_numpy() if len(q_ids) else np.zeros(0, int)
    metrics: dict = {"n_queries": int(len(q_ids)), "n_wells": int(n_wells), "n_compounds": int(n_compounds)}
    for level, ranks, n, positives in (("well", well_rank, n_wells, n_pos),
                                       ("compound", compound_rank, n_compounds, np.ones(len(q_ids), int))):
        cutoffs = {"top1pct": max(1, math.ceil(fraction * n))} | {f"top{k}": int(k) for k in ks}
        for name, cut in cutoffs.items():
            value = float(np.mean(ranks <= cut)) if len(ranks) else float("nan")
            chance = float(np.mean([_chance_hit(n, int(p), cut) for p in positives])) if len(ranks) else float("nan")
            metrics[f"zs_{level}_{name}"], metrics[f"zs_{level}_{name}_chance"] = value, chance
    return metrics, per_query
