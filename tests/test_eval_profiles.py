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
    from micon.eval.plots import pca_2d, plot_map_summary, plot_profiles_pca, plot_topk_curves

    rng = np.random.default_rng(6)
    meta, feats = site_table(rng, d=5)
    meta[schema.SOURCE] = np.where(meta[schema.PLATE] == "P0", "source_1", "source_2")
    wells, x = aggregate_wells(meta, feats)
    curves = pd.concat([pd.DataFrame({"method": m, "k": range(1, 11), "nsb": np.linspace(a, a + 0.3, 10),
                                      "nss": np.linspace(a / 2, a, 10)}) for m, a in (("MICON", 0.4), ("CP", 0.2))])
    summary = pd.DataFrame({"method": ["MICON", "CP"], "mean_average_precision": [0.5, 0.3],
                            "fraction_retrieved": [0.6, 0.4]})
    paths = [plot_topk_curves(curves, tmp_path / "topk.png"), plot_map_summary(summary, tmp_path / "map.png"),
             plot_profiles_pca(wells, x, mad_robustize(wells, x), tmp_path / "pca.png")]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    # PCA scores: uncorrelated, decreasing variance, same spread as the top two eigenvalues
    scores = pca_2d(x)
    cov = np.cov(scores, rowvar=False)
    eig = np.sort(np.linalg.eigvalsh(np.cov(x.astype(np.float64), rowvar=False)))[::-1]
    np.testing.assert_allclose(np.diag(cov), eig[:2], rtol=1e-6)
    assert abs(cov[0, 1]) < 1e-8 * eig[0]


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
