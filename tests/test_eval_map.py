"""mAP framework: AP equal to copairs where copairs is defined, ties, null/p-values, BH, blockwise."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy.stats import false_discovery_control

from micon import schema
from micon.eval.map import (REFERENCE_INDEX, average_precision, benjamini_hochberg, expected_average_precision,
                            fraction_retrieved, mean_average_precision, null_average_precision, phenotypic_activity,
                            phenotypic_consistency)

copairs_map = pytest.importorskip("copairs.map")
from copairs.matching import assign_reference_index  # noqa: E402


def random_plates(n, rng, n_plates=6, n_compounds=70, d=24):
    meta = pd.DataFrame({schema.PLATE: rng.choice([f"P{i}" for i in range(n_plates)], n),
                         schema.JCP: [f"JCP2022_{i:06d}" for i in rng.integers(1, n_compounds, n)]})
    meta.loc[rng.random(n) < 0.2, schema.JCP] = schema.DMSO
    meta[schema.ROLE] = [schema.role_of(j) for j in meta[schema.JCP]]
    return meta, rng.normal(size=(n, d)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    return random_plates(500, np.random.default_rng(0))


def copairs_activity(meta, feats):
    ref = assign_reference_index(meta, f"{schema.JCP} == '{schema.DMSO}'", reference_col=REFERENCE_INDEX)
    return copairs_map.average_precision(ref, feats, pos_sameby=[schema.JCP, REFERENCE_INDEX], pos_diffby=[],
                                         neg_sameby=[schema.PLATE], neg_diffby=[schema.JCP, REFERENCE_INDEX],
                                         progress_bar=False)


def assert_same_ap(mine, ref):
    for col in ("n_pos_pairs", "n_total_pairs"):
        np.testing.assert_array_equal(mine[col].to_numpy(), ref[col].to_numpy())
    for col in ("average_precision", "normalized_average_precision"):
        np.testing.assert_allclose(mine[col].to_numpy(), ref[col].to_numpy(), rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("max_pairs", [4_000_000, 500])
def test_activity_equals_copairs(data, max_pairs, tmp_path):
    meta, x = data
    ap, maps = phenotypic_activity(meta, x, null_size=2000, max_pairs=max_pairs)
    ref = copairs_activity(meta, x)
    assert_same_ap(ap, ref)
    ref_map = copairs_map.mean_average_precision(ref, [schema.JCP], null_size=2000, threshold=0.05, seed=0,
                                                 progress_bar=False, cache_dir=tmp_path)
    both = maps.merge(ref_map, on=schema.JCP, suffixes=("", "_copairs"))
    assert len(both) == len(maps) == len(ref_map)
    for col in ("mean_average_precision", "mean_normalized_average_precision"):
        np.testing.assert_allclose(both[col], both[f"{col}_copairs"], rtol=1e-6, atol=1e-9)
    # p-values come from different (seeded) null samples: equal up to Monte-Carlo noise
    assert np.abs(both["p_value"] - both["p_value_copairs"]).max() < 0.06


def test_consistency_equals_copairs(data):
    meta, x = data
    ap, maps = phenotypic_consistency(meta, x, null_size=500, max_pairs=20_000)
    keep = (meta[schema.ROLE] != schema.NEGCON).to_numpy()
    ref = copairs_map.average_precision(meta[keep].reset_index(drop=True), x[keep], pos_sameby=[schema.JCP],
                                        pos_diffby=[], neg_sameby=[], neg_diffby=[schema.JCP], progress_bar=False)
    assert_same_ap(ap, ref)
    assert (ap["n_total_pairs"] == keep.sum() - 1).all()


def test_diffby_and_plate_restricted_rules_equal_copairs(data):
    meta, x = data
    rules = dict(pos_sameby=[schema.JCP], pos_diffby=[schema.PLATE], neg_sameby=[schema.PLATE], neg_diffby=[schema.JCP])
    ap = average_precision(meta, x, **rules)
    ref = copairs_map.average_precision(meta, x, **rules, progress_bar=False)
    assert_same_ap(ap, ref)


def ap_of_ranking(rel):
    rel = np.asarray(rel, dtype=float)
    return float((np.cumsum(rel) / np.arange(1, len(rel) + 1) * rel).sum() / rel.sum())


@pytest.mark.parametrize("d", [8, 256])
def test_constant_embedding_does_not_score_perfect(data, d):
    meta, _ = data
    # the same profile everywhere; in float32 a row gather and a matrix product give it different
    # self-similarities (0.9999999 vs 1.0000005 for d = 256), which must still tie
    x = np.tile(np.random.default_rng(d).normal(size=d), (len(meta), 1)).astype(np.float32)
    ref = copairs_activity(meta, x)
    scored = ref["n_pos_pairs"] > 0
    assert (ref.loc[scored, "average_precision"] == 1.0).all()  # the copairs artefact
    ours = average_precision(assign_reference_index(meta, f"{schema.JCP} == '{schema.DMSO}'",
                                                    reference_col=REFERENCE_INDEX), x,
                             pos_sameby=[schema.JCP, REFERENCE_INDEX], pos_diffby=[], neg_sameby=[schema.PLATE],
                             neg_diffby=[schema.JCP, REFERENCE_INDEX])
    s = ours[scored]
    chance = expected_average_precision(s["n_pos_pairs"].to_numpy(), s["n_total_pairs"].to_numpy())
    np.testing.assert_allclose(s["average_precision"], chance, rtol=1e-9)
    np.testing.assert_allclose(s["normalized_average_precision"], 0, atol=1e-9)
    assert (s["average_precision"] < 1).all()
    # the other tie rules bracket it; positives_first reproduces copairs
    first = average_precision(ours, x, [schema.JCP, REFERENCE_INDEX], [], [schema.PLATE],
                              [schema.JCP, REFERENCE_INDEX], ties="positives_first")
    last = average_precision(ours, x, [schema.JCP, REFERENCE_INDEX], [], [schema.PLATE],
                             [schema.JCP, REFERENCE_INDEX], ties="negatives_first")
    np.testing.assert_allclose(first.loc[scored, "average_precision"], 1.0)
    M, L = s["n_pos_pairs"].to_numpy(), s["n_total_pairs"].to_numpy()
    worst = [ap_of_ranking([0] * (l - m) + [1] * m) for m, l in zip(M, L)]
    np.testing.assert_allclose(last.loc[scored, "average_precision"], worst, rtol=1e-9)


def test_expected_tie_rule_is_the_mean_over_tie_orders():
    """Exact enumeration: every order of every tie block, AP averaged."""
    rng = np.random.default_rng(5)
    for _ in range(20):
        n_items = int(rng.integers(3, 8))
        sims = rng.integers(0, 3, n_items).astype(np.float64)  # heavy ties
        rel = rng.integers(0, 2, n_items)
        rel[0] = 1
        blocks = [np.flatnonzero(sims == v) for v in sorted(set(sims), reverse=True)]
        aps = [ap_of_ranking(np.concatenate([rel[list(p)] for p in perm]))
               for perm in itertools.product(*[itertools.permutations(b) for b in blocks])]
        # row 0 is the query: a positive of rows with pos == 1, a negative of the others; identical
        # candidate vectors give exactly tied cosines, decreasing with the planted value order
        meta = pd.DataFrame({"q": 0, "pos": np.r_[1, rel], "neg": np.r_[1, rel]})
        x = np.r_[[[1.0, 0.0]], np.c_[np.cos(0.3 * (2 - sims)), np.sin(0.3 * (2 - sims))]]
        ap = average_precision(meta, x, pos_sameby=["pos"], pos_diffby=[], neg_sameby=["q"], neg_diffby=["neg"])
        assert ap["average_precision"].iloc[0] == pytest.approx(np.mean(aps), rel=1e-12)


@pytest.mark.parametrize("M,L", [(1, 40), (3, 41), (5, 9), (9, 12), (4, 4)])
def test_null_average_precision_has_the_chance_mean(M, L):
    null = null_average_precision(M, L, 20000, seed=1)
    assert null.shape == (20000,) and (null > 0).all() and (null <= 1).all()
    assert null.mean() == pytest.approx(expected_average_precision(M, L), abs=4 * null.std() / np.sqrt(20000) + 1e-12)
    np.testing.assert_array_equal(null, null_average_precision(M, L, 20000, seed=1))


def test_p_values_and_bh_equal_direct_implementation(data):
    meta, x = data
    ap, maps = phenotypic_activity(meta, x, null_size=1000, seed=3)
    scored = ap[ap["n_pos_pairs"] > 0]
    for _, row in maps.sample(15, random_state=0).iterrows():
        members = scored[scored[schema.JCP] == row[schema.JCP]]
        null = np.mean([null_average_precision(m, l, 1000, seed=3)
                        for m, l in zip(members["n_pos_pairs"], members["n_total_pairs"])], axis=0)
        observed = members["average_precision"].mean()
        assert row["mean_average_precision"] == pytest.approx(observed, rel=1e-12)
        assert row["p_value"] == pytest.approx(((null >= observed - 1e-12).sum() + 1) / 1001)
    np.testing.assert_allclose(maps["corrected_p_value"], false_discovery_control(maps["p_value"], method="bh"))
    assert fraction_retrieved(maps) == pytest.approx((maps["corrected_p_value"] < 0.05).mean())


def test_benjamini_hochberg_against_scipy_and_numpy():
    rng = np.random.default_rng(8)
    p = np.concatenate([rng.uniform(size=200), rng.uniform(0, 1e-3, 20), [0.5, 0.5]])
    ref = false_discovery_control(p, method="bh")
    np.testing.assert_allclose(benjamini_hochberg(p), ref)
    # textbook NumPy: p_(i) * m / i, running minimum from the largest, capped at 1
    order = np.argsort(p)
    direct = np.empty_like(p)
    direct[order] = np.minimum(1, np.minimum.accumulate((p[order] * len(p) / np.arange(1, len(p) + 1))[::-1])[::-1])
    np.testing.assert_allclose(benjamini_hochberg(p), direct)
    with_nan = benjamini_hochberg(np.r_[p, np.nan])
    assert np.isnan(with_nan[-1]) and np.allclose(with_nan[:-1], ref)


def test_planted_activity_is_retrieved():
    """Compounds with a strong shared signal are active (corrected p < 0.05); noise compounds are not."""
    rng = np.random.default_rng(11)
    rows, feats = [], []
    for plate in range(8):
        for well in range(40):
            compound = schema.DMSO if well < 10 else f"JCP2022_{well:06d}"
            signal = np.zeros(16)
            if 10 <= well < 20:
                signal[well - 10] = 6.0  # active compounds, same shift on every plate
            rows.append({schema.PLATE: f"P{plate}", schema.JCP: compound, schema.ROLE: schema.role_of(compound)})
            feats.append(signal + rng.normal(size=16))
    meta, x = pd.DataFrame(rows), np.asarray(feats, dtype=np.float32)
    _, maps = phenotypic_activity(meta, x, null_size=2000)
    active = maps[schema.JCP].str[-6:].astype(int) < 20
    assert maps.loc[active, "below_corrected_p"].all()
    assert maps.loc[~active, "below_corrected_p"].mean() < 0.2
    assert maps.loc[active, "mean_average_precision"].min() > 0.9


def test_target_consistency_is_copairs_on_pandas_consensus_profiles(tmp_path):
    """Consistency on consensus profiles: the median of each compound's wells (pandas), then copairs with
    positives = compounds sharing a target, on random profiles with planted target directions; a compound
    with two targets counts for each, DMSO and unannotated compounds stay out."""
    from micon.eval.consistency import target_consistency

    rng = np.random.default_rng(5)
    meta, x = random_plates(900, rng, n_compounds=60, d=16)
    compounds = sorted(set(meta[schema.JCP]) - {schema.DMSO})
    target = {c: f"T{i % 7}" for i, c in enumerate(compounds)}
    target[compounds[0]] = "T1|T2"
    target[compounds[1]] = ""
    meta["Metadata_Target"] = meta[schema.JCP].map(target).fillna("")
    centres = rng.normal(size=(7, 16))
    planted = meta["Metadata_Target"].str[:2].map(lambda t: int(t[1]) if t else -1).to_numpy()
    x = x + np.where(planted[:, None] >= 0, 1.5 * centres[np.maximum(planted, 0)], 0)
    # the two-target compound ties with itself (a positive and a negative row): break ties as copairs does
    ap, maps = target_consistency(meta, x, "Metadata_Target", null_size=500, ties="positives_first")
    # the reference: pandas consensus, exploded targets, copairs
    keep = (meta[schema.ROLE] != schema.NEGCON) & (meta["Metadata_Target"] != "")
    frame = pd.concat([meta[keep].reset_index(drop=True), pd.DataFrame(x[keep.to_numpy()])], axis=1)
    cons = frame.groupby(schema.JCP, sort=False)[list(range(16))].median()
    ref_meta = pd.DataFrame({schema.JCP: cons.index, "Metadata_Target": cons.index.map(target)})
    ref_meta = ref_meta.assign(Metadata_Target=ref_meta["Metadata_Target"].str.split("|")).explode("Metadata_Target")
    ref_x = cons.loc[ref_meta[schema.JCP]].to_numpy()
    ref = copairs_map.average_precision(ref_meta.reset_index(drop=True), ref_x, pos_sameby=["Metadata_Target"],
                                        pos_diffby=[schema.JCP], neg_sameby=[],
                                        neg_diffby=["Metadata_Target", schema.JCP], progress_bar=False)
    mine = ap.set_index([schema.JCP, "Metadata_Target"]).sort_index()
    theirs = ref.set_index([schema.JCP, "Metadata_Target"]).sort_index()
    assert len(mine) == len(theirs) == len(compounds) - 1 + 1      # one unannotated out, one compound twice
    assert_same_ap(mine, theirs)
    assert set(maps["Metadata_Target"]) == {f"T{i}" for i in range(7)}
    assert maps["mean_average_precision"].mean() > 0.5         # planted targets are retrieved
