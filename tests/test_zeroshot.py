"""Zero-shot scoring (micon.eval.zeroshot) against a direct computation on random inputs: per query, the
rank of its first well (and compound) by cosine similarity, written as plain loops."""
from __future__ import annotations

import math

import numpy as np
import pytest

from micon.eval.zeroshot import first_hit_ranks, zero_shot_retrieval


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _direct(pred_ids, pred, well_ids, wells, ks):
    ranks_w, ranks_c, positives = [], [], []
    compounds = list(dict.fromkeys(well_ids))
    consensus = {c: np.mean([w / np.linalg.norm(w) for w, i in zip(wells, well_ids) if i == c], axis=0)
                 for c in compounds}
    for q_id, q in zip(pred_ids, pred):
        if q_id not in well_ids:
            continue
        sims = [_cos(q, w) for w in wells]
        best = max(s for s, i in zip(sims, well_ids) if i == q_id)
        ranks_w.append(1 + sum(s > best for s, i in zip(sims, well_ids) if i != q_id))
        own = _cos(q, consensus[q_id])
        ranks_c.append(1 + sum(_cos(q, consensus[c]) > own for c in compounds if c != q_id))
        positives.append(list(well_ids).count(q_id))
    out = {}
    for level, ranks, n in (("well", ranks_w, len(wells)), ("compound", ranks_c, len(compounds))):
        for name, cut in {"top1pct": max(1, math.ceil(0.01 * n)), **{f"top{k}": k for k in ks}}.items():
            out[f"zs_{level}_{name}"] = float(np.mean([r <= cut for r in ranks]))
    # chance of a hit within the first k of n wells with p positives: 1 - C(n-p, k) / C(n, k)
    n = len(wells)
    out["zs_well_top5_chance"] = float(np.mean([1 - math.comb(n - p, 5) / math.comb(n, 5) for p in positives]))
    out["zs_compound_top5_chance"] = 5 / len(compounds)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_scores_equal_a_direct_computation_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    n_comp, dim = int(rng.integers(8, 30)), int(rng.integers(2, 12))
    ids = np.array([f"c{i}" for i in range(n_comp)])
    well_ids = rng.choice(ids, size=int(rng.integers(40, 200)))
    centres = rng.normal(size=(n_comp, dim))
    wells = centres[[int(w[1:]) for w in well_ids]] + rng.normal(0, 1.5, (len(well_ids), dim))
    wells = np.round(wells, 1)                      # ties happen: a tie is not counted as scored higher
    pred_ids = np.concatenate([ids, ["not_in_screen"]])
    pred = np.concatenate([centres + rng.normal(0, 1.0, centres.shape), rng.normal(size=(1, dim))])
    metrics, per_query = zero_shot_retrieval(pred_ids, pred, well_ids, wells, ks=(1, 5))
    direct = _direct(pred_ids, pred, list(well_ids), wells, (1, 5))
    for key, value in direct.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert metrics["n_queries"] == len(set(well_ids)) and "not_in_screen" not in set(per_query["compound"])


def test_a_query_whose_own_well_is_nearest_has_rank_one_and_a_query_without_wells_rank_zero():
    wells = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    ranks = first_hit_ranks(np.array(["a", "b", "z"]), np.array([[1.0, 0.1], [1.0, 0.0], [1.0, 0.0]]),
                            np.array(["a", "b", "c"]), wells)
    assert ranks.tolist() == [1, 3, 0]


def test_predictions_in_another_space_are_refused():
    with pytest.raises(ValueError, match="same space"):
        zero_shot_retrieval(["a"], np.ones((1, 3)), ["a"], np.ones((1, 4)))
