"""Well aggregation, per-plate MAD normalisation and ZCA-cor whitening against pycytominer and pandas."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from micon import schema
from micon.eval.profiles import aggregate_wells, fit_spherize, mad_robustize, negcon_mask, spherize

pycytominer = pytest.importorskip("pycytominer")
from pycytominer.operations.transform import Spherize as PycytominerSpherize  # noqa: E402


def site_table(rng, n_plates=3, wells_per_plate=24, d=6):
    rows = []
    for p in range(n_plates):
        for w in range(wells_per_plate):
            jcp = schema.DMSO if w % 4 == 0 else f"JCP2022_{w:06d}"
            for s in range(int(rng.integers(1, 6))):  # uneven site counts per well
                rows.append({schema.SOURCE: "source_1", schema.PLATE: f"P{p}", schema.WELL: schema.well_name(w // 12, w % 12),
                             schema.SITE: str(s + 1), schema.JCP: jcp, schema.ROLE: schema.role_of(jcp)})
    meta = pd.DataFrame(rows).sample(frac=1.0, random_state=0).reset_index(drop=True)  # sites out of order
    feats = (rng.normal(size=(len(meta), d)) * rng.uniform(0.5, 4, d) + rng.normal(size=d)).astype(np.float32)
    return meta, feats


@pytest.mark.parametrize("method", ["mean", "median"])
def test_aggregate_wells_matches_pandas(method):
    rng = np.random.default_rng(0)
    meta, feats = site_table(rng)
    wells, x = aggregate_wells(meta, feats, method=method)
    cols = [f"f{i}" for i in range(feats.shape[1])]
    ref = pd.concat([meta, pd.DataFrame(feats.astype(np.float64), columns=cols)], axis=1)
    ref = ref.groupby([schema.SOURCE, schema.PLATE, schema.WELL], sort=False)[cols].agg(method)
    key = list(zip(wells[schema.SOURCE], wells[schema.PLATE], wells[schema.WELL]))
    np.testing.assert_allclose(x, ref.loc[key].to_numpy(), rtol=1e-6, atol=1e-6)
    assert x.dtype == np.float32 and len(wells) == 3 * 24
    assert schema.SITE not in wells.columns and {schema.JCP, schema.ROLE, "n_sites"} <= set(wells.columns)
    assert wells["n_sites"].sum() == len(meta)


def test_mad_robustize_matches_pycytominer_per_plate():
    rng = np.random.default_rng(1)
    meta, feats = site_table(rng)
    wells, x = aggregate_wells(meta, feats)
    got = mad_robustize(wells, x)
    cols = [f"f{i}" for i in range(x.shape[1])]
    frame = pd.concat([wells, pd.DataFrame(x, columns=cols)], axis=1)
    for plate, group in frame.groupby(schema.PLATE):
        ref = pycytominer.normalize(group, features=cols, meta_features=list(wells.columns),
                                    samples=f"{schema.ROLE} == '{schema.NEGCON}'", method="mad_robustize")
        np.testing.assert_allclose(got[group.index], ref[cols].to_numpy(), rtol=1e-5, atol=1e-5)
    # DMSO wells of each plate end with median 0 and (scaled) MAD 1
    neg = negcon_mask(wells)
    for plate in wells[schema.PLATE].unique():
        rows = (wells[schema.PLATE] == plate).to_numpy() & neg
        np.testing.assert_allclose(np.median(got[rows], axis=0), 0, atol=1e-5)


def test_mad_robustize_names_plates_without_dmso():
    rng = np.random.default_rng(2)
    meta, feats = site_table(rng)
    meta.loc[(meta[schema.PLATE] == "P1") & (meta[schema.ROLE] == schema.NEGCON), schema.ROLE] = schema.TREATED
    with pytest.raises(ValueError, match="P1"):
        mad_robustize(meta, feats)


@pytest.mark.parametrize("n,d,epsilon", [(200, 8, 1e-6), (12, 30, 1e-3)])
@pytest.mark.parametrize("method", ["ZCA-cor", "ZCA"])
def test_spherize_matches_pycytominer(n, d, epsilon, method):
    rng = np.random.default_rng(3)
    mix = rng.normal(size=(d, d))
    x = (rng.normal(size=(n + 50, d)) @ mix * rng.uniform(0.5, 3, d) + 2).astype(np.float64)
    fit_rows = np.arange(n)
    ref = PycytominerSpherize(method=method, epsilon=epsilon).fit(pd.DataFrame(x[fit_rows]))
    expected = ref.transform(pd.DataFrame(x)).to_numpy()
    got = spherize(x, fit_rows, epsilon=epsilon, method=method)
    np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-7 * np.abs(expected).max())


def test_spherize_whitens_the_fitting_rows():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(500, 5)) @ rng.normal(size=(5, 5))
    out = fit_spherize(x, epsilon=0.0).transform(x)
    np.testing.assert_allclose(np.cov(out, rowvar=False), np.eye(5), atol=1e-8)
    with pytest.raises(ValueError, match="zero variance"):
        fit_spherize(np.c_[x, np.ones(len(x))])


def test_plots_write_pngs(tmp_path):
    from micon.eval.plots import pca, pca_2d, plot_map_summary, plot_profiles_pca, plot_topk_curves

    rng = np.random.default_rng(6)
    meta, feats = site_table(rng, d=5)
    meta[schema.SOURCE] = np.where(meta[schema.PLATE] == "P0", "source_1", "source_2")
    wells, x = aggregate_wells(meta, feats)
    curves = pd.concat([pd.DataFrame({"method": m, "mode": mode, "k": range(1, 11), "value": np.linspace(a, a + 0.3, 10),
                                      "lo": np.linspace(a, a + 0.3, 10) - 0.05, "hi": np.linspace(a, a + 0.3, 10) + 0.05,
                                      "chance": np.linspace(0.01, 0.1, 10)})
                        for m, a in (("MICON", 0.4), ("CP", 0.2)) for mode in ("nsb", "nss")])
    summary = pd.DataFrame({"method": ["MICON", "CP"], "map_activity": [0.5, 0.3], "map_activity_lo": [0.4, -0.1],
                            "map_activity_hi": [0.6, 0.4], "map_activity_chance": [0.2, 0.2],
                            "fraction_retrieved": [0.6, 0.4]})
    paths = [plot_topk_curves(curves, tmp_path / "topk.png"), plot_map_summary(summary, tmp_path / "map.png"),
             plot_profiles_pca(wells, x, mad_robustize(wells, x), tmp_path / "pca.png")]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    # a summary without the mAP column is an error, never a silently missing panel
    with pytest.raises(ValueError, match="map_activity"):
        plot_map_summary(summary.drop(columns="map_activity"), tmp_path / "bad.png")
    # PCA scores: uncorrelated, decreasing variance, same spread as the top two eigenvalues; the explained
    # shares are those eigenvalues over the total
    scores, ratio = pca(x)
    np.testing.assert_array_equal(scores, pca_2d(x))
    cov = np.cov(scores, rowvar=False)
    eig = np.sort(np.linalg.eigvalsh(np.cov(x.astype(np.float64), rowvar=False)))[::-1]
    np.testing.assert_allclose(np.diag(cov), eig[:2], rtol=1e-6)
    np.testing.assert_allclose(ratio, eig[:2] / eig.sum(), rtol=1e-6)
    assert abs(cov[0, 1]) < 1e-8 * eig[0]


def test_robust_limits_ignore_a_few_outliers():
    from micon.eval.plots import robust_limits

    v = np.r_[np.random.default_rng(0).normal(size=500), 1e4, -1e4]
    lo, hi = robust_limits(v)
    assert -5 < lo < -2 and 2 < hi < 5


def test_well_profiles_recipe_and_plates_without_dmso():
    from micon.eval.profiles import ProfileError, informative_features, well_profiles

    rng = np.random.default_rng(7)
    meta, feats = site_table(rng, d=5)
    meta[schema.BATCH] = "b0"
    feats[:, 2] = 3.0                                   # a constant feature: no robust scale, dropped
    wells, raw, prof = well_profiles(meta, feats)
    kept = informative_features(wells, raw)
    assert raw.shape == (72, 5) and kept.tolist() == [True, True, False, True, True] and prof.shape == (72, 4)
    expected = spherize(mad_robustize(wells, raw[:, kept].astype(np.float64)), negcon_mask(wells))
    np.testing.assert_allclose(prof, expected, rtol=1e-5, atol=1e-5)
    meta.loc[(meta[schema.PLATE] == "P1") & (meta[schema.ROLE] == schema.NEGCON), schema.ROLE] = schema.TREATED
    with pytest.raises(ProfileError, match="P1"):
        well_profiles(meta, feats)
    wells_d, _, prof_d = well_profiles(meta, feats, plates_without_dmso="drop")
    assert set(wells_d[schema.PLATE]) == {"P0", "P2"} and len(prof_d) == 48
    wells_b, _, prof_b = well_profiles(meta, feats, plates_without_dmso="batch", whiten=False)
    assert len(wells_b) == 72 and np.isfinite(prof_b).all()


def test_profile_table_speaks_jump():
    from micon.eval.profiles import PERT_TYPE, profile_table

    rng = np.random.default_rng(8)
    meta, feats = site_table(rng, d=3)
    wells, x = aggregate_wells(meta, feats)
    table = profile_table(wells, x, ["Cells_AreaShape_Area", "Nuclei_Intensity_MeanIntensity_DNA", "f3"])
    assert list(table.columns[:4]) == [schema.SOURCE, schema.PLATE, schema.WELL, schema.JCP]
    assert schema.ROLE not in table.columns and set(table[PERT_TYPE]) == {"trt", "negcon"}
    assert (table.loc[wells[schema.ROLE].to_numpy() == schema.NEGCON, PERT_TYPE] == "negcon").all()
    assert "Metadata_n_sites" in table.columns and table["f3"].dtype == np.float32
    with pytest.raises(ValueError, match="Metadata_"):
        profile_table(wells, x, ["a", "Metadata_b", "c"])
    with pytest.raises(ValueError, match="3 feature names"):
        profile_table(wells, x[:, :2], ["a", "b", "c"])


def test_chance_hit_rate_matches_a_simulation_of_random_rankings():
    """1 - C(N-P, k)/C(N, k), and topk_curves' chance line, against rankings drawn at random."""
    from micon.eval.plots import topk_curves
    from micon.eval.retrieval import expected_hit_rate, topk_hit_rate

    rng = np.random.default_rng(9)
    for n, p, k in ((30, 1, 1), (30, 3, 10), (12, 11, 2), (50, 0, 5), (7, 2, 7)):
        ranks = rng.permuted(np.tile(np.arange(n), (20000, 1)), axis=1)[:, :k]   # the top k of random orders
        sim = (ranks < p).any(axis=1).mean()
        assert expected_hit_rate(n, p, k) == pytest.approx(sim, abs=0.012), (n, p, k)
    # the job's numbers: per-query candidates and positives from the retrieval, chance from them, and the
    # hit rate of pure-noise profiles (many draws) lands on it
    meta, _ = site_table(rng, n_plates=4, wells_per_plate=40)
    meta[schema.BATCH] = meta[schema.PLATE].map({"P0": "b0", "P1": "b0", "P2": "b1", "P3": "b1"})
    wells = aggregate_wells(meta, np.zeros((len(meta), 1), np.float32))[0]
    hits = []
    for draw in range(30):
        _, per_q = topk_hit_rate(wells, rng.normal(size=(len(wells), 16)), ks=(1, 5), modes=("nsb",), per_query=True)
        curves = topk_curves(per_q, ("nsb",), (1, 5), n_boot=200).set_index("k")
        hits.append(curves["value"].to_numpy())
    q = per_q[per_q["nsb_eligible"]]
    assert (q["nsb_n_candidates"] == 2 * 30).all() and (q["nsb_n_positives"] == 2).all()   # 2 other-batch plates
    np.testing.assert_allclose(curves["chance"], [expected_hit_rate(60, 2, 1), expected_hit_rate(60, 2, 5)])
    np.testing.assert_allclose(np.mean(hits, axis=0), curves["chance"], atol=0.03)
    assert ((curves["lo"] <= curves["value"]) & (curves["value"] <= curves["hi"])).all()


def test_bootstrap_ratio_and_map_intervals():
    from micon.eval.map import phenotypic_activity
    from micon.eval.plots import bootstrap_ratio, map_intervals

    rng = np.random.default_rng(10)
    v = rng.uniform(size=200)
    lo, hi = bootstrap_ratio(v, np.ones(200), n_boot=2000)
    se = v.std() / np.sqrt(200)
    assert lo == pytest.approx(v.mean() - 1.96 * se, abs=0.25 * se) and hi == pytest.approx(v.mean() + 1.96 * se,
                                                                                           abs=0.25 * se)
    meta, feats = site_table(rng, d=8)
    wells, x = aggregate_wells(meta, feats)
    ap, maps = phenotypic_activity(wells, x, null_size=200)
    out = map_intervals(ap, maps, n_boot=500)
    assert out["map_activity"] == pytest.approx(maps["mean_average_precision"].mean())
    assert 0 <= out["map_activity_lo"] <= out["map_activity"] <= out["map_activity_hi"] <= 1
    assert out["fraction_retrieved_chance"] == 0.05
    # the chance level against random rankings drawn here (AP = mean over positives of precision at their
    # rank), per well, then per compound, then over compounds; noise profiles score about that
    scored = ap[ap["n_pos_pairs"] > 0]
    sim = []
    for m_pos, n_tot in zip(scored["n_pos_pairs"], scored["n_total_pairs"]):
        rel = rng.permuted(np.tile(np.arange(n_tot) < m_pos, (4000, 1)), axis=1)
        sim.append(((np.cumsum(rel, axis=1) / np.arange(1, n_tot + 1)) * rel).sum(axis=1).mean() / m_pos)
    expected = pd.Series(sim).groupby(scored[schema.JCP].to_numpy()).mean().mean()
    assert out["map_activity_chance"] == pytest.approx(expected, abs=0.01)
    assert out["map_activity_chance"] > (scored["n_pos_pairs"] / scored["n_total_pairs"]).mean()  # few positives
    assert abs(out["map_activity"] - out["map_activity_chance"]) < 0.1


def test_l2_normalize_chunks_zero_rows_and_errors():
    from micon.eval.profiles import l2_normalize

    x = np.random.default_rng(0).normal(size=(50, 7)).astype(np.float32)
    x[3] = 0
    out = l2_normalize(x, chunk_rows=8)
    np.testing.assert_allclose(np.linalg.norm(out[np.arange(50) != 3], axis=1), 1, rtol=1e-6)
    assert (out[3] == 0).all() and out.dtype == np.float32
    x[20, 2] = np.nan
    with pytest.raises(ValueError, match="row 20"):
        l2_normalize(x, chunk_rows=8)
