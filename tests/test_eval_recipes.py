"""The named profile recipes (micon.eval.recipes), step by step, against independent computations on random
screens: pycytominer's normalize / frequency_threshold / correlation_threshold, scipy's rankdata, harmonypy
called directly, scikit-learn's StandardScaler and PCA."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import median_abs_deviation, norm, rankdata

from micon import schema
from micon.eval import recipes
from micon.eval.profiles import ProfileError, normalise_wells

pycytominer = pytest.importorskip("pycytominer")
harmonypy = pytest.importorskip("harmonypy")
sklearn_decomposition = pytest.importorskip("sklearn.decomposition")
from pycytominer.operations import correlation_threshold, frequency_threshold  # noqa: E402


def random_screen(seed=0, n_sources=2, plates_per_source=3, wells_per_plate=40, d=24, dmso_every=5):
    """Wells of a random screen: DMSO every `dmso_every`-th well, compounds on several plates, a source offset."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_sources):
        for p in range(plates_per_source):
            for w in range(wells_per_plate):
                jcp = schema.DMSO if w % dmso_every == 0 else f"JCP2022_{w:06d}"
                rows.append({schema.SOURCE: f"source_{s}", schema.BATCH: f"b{s}", schema.PLATE: f"S{s}P{p}",
                             schema.WELL: schema.well_name(w // 12, w % 12), schema.JCP: jcp,
                             schema.ROLE: schema.role_of(jcp)})
    wells = pd.DataFrame(rows)
    src = wells[schema.SOURCE].str[-1].astype(int).to_numpy()
    x = rng.normal(size=(len(wells), d)) * rng.uniform(0.5, 3, d) + 3 * src[:, None] + rng.normal(size=d)
    x[:, 1] = 0.97 * x[:, 0] + 0.03 * rng.normal(size=len(wells))     # a highly correlated pair
    return wells, x.astype(np.float32)


def frame(wells, x, names):
    return pd.concat([wells.reset_index(drop=True), pd.DataFrame(np.asarray(x, np.float64), columns=names)], axis=1)


def pycytominer_mad(wells, x, names):
    """pycytominer normalize(mad_robustize) against DMSO, one plate at a time."""
    f = frame(wells, x, names)
    out = np.empty((len(f), len(names)))
    for _, g in f.groupby(schema.PLATE):
        ref = pycytominer.normalize(g, features=list(names), meta_features=list(wells.columns),
                                    samples=f"{schema.ROLE} == '{schema.NEGCON}'", method="mad_robustize")
        out[g.index] = ref[list(names)].to_numpy()
    return out


def test_rank_int_is_jumps_formula_with_scipy_ranks():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 7))
    x[:, 2] = np.round(x[:, 2])             # ties, broken at random as the recipe does
    got = recipes.rank_int(x, seed=0)
    c, n = 3 / 8, len(x)
    for j in range(x.shape[1]):
        ix = np.random.default_rng(0).permutation(n)
        rank = rankdata(x[ix, j], method="ordinal")[np.argsort(ix)]
        np.testing.assert_allclose(got[:, j], norm.ppf((rank - c) / (n - 2 * c + 1)), rtol=1e-10, atol=1e-10)
    # ranks preserved, normal scores
    assert (np.argsort(got[:, 0]) == np.argsort(x[:, 0])).all()
    assert abs(got.mean()) < 1e-9 and 0.9 < got.std() < 1.0


def test_frequency_threshold_matches_pycytominer():
    rng = np.random.default_rng(4)
    n = 400
    x = rng.normal(size=(n, 8))
    x[:, 1] = (rng.random(n) < 0.02).astype(float)          # rare second value: dropped by freq_cut
    x[:, 3] = rng.integers(0, 3, n)                         # few distinct values: dropped by unique_cut
    x[:, 5] = np.where(rng.random(n) < 0.5, 1.0, 2.0)       # two common values: kept by freq, dropped by unique
    names = [f"Cells_f{j}" for j in range(8)]
    ref = set(frequency_threshold(pd.DataFrame(x, columns=names), features=names))
    got = {n_ for n_, e in zip(names, recipes.frequency_excluded(x)) if e}
    assert got == ref and {"Cells_f1", "Cells_f3", "Cells_f5"} <= got


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correlation_threshold_matches_pycytominer(seed):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(200, 5))
    mix = rng.normal(size=(5, 30)) * (rng.random((5, 30)) < 0.3)
    x = base @ mix + 0.2 * rng.normal(size=(200, 30))
    x[:, 7] = -x[:, 6]                                       # negatively correlated: kept (signed, as pycytominer)
    names = [f"Cells_f{j:02d}" for j in range(30)]
    ref = set(correlation_threshold(pd.DataFrame(x, columns=names), features=names, threshold=0.9))
    got = {n_ for n_, e in zip(names, recipes.correlation_excluded(x, 0.9)) if e}
    assert got == ref and len(got) > 0


def test_variant_features_is_jumps_rule():
    wells, x = random_screen(seed=5, d=6)
    x = x.astype(np.float64)
    neg = (wells[schema.ROLE] == schema.NEGCON).to_numpy()
    x[neg & (wells[schema.PLATE] == "S0P1").to_numpy(), 2] = 1.5   # constant DMSO on one plate: MAD 0
    x[:, 4] = 1000 + 1e-4 * np.random.default_rng(0).normal(size=len(x))  # |MAD/median| < 1e-3
    got = recipes.variant_features(wells, x)
    f = frame(wells[neg], x[neg], [f"f{j}" for j in range(6)])
    stats = f.groupby(schema.PLATE)[[f"f{j}" for j in range(6)]]
    mad, med = stats.agg(lambda v: median_abs_deviation(v)), stats.median()
    ref = ((mad != 0) & ((mad / med).abs().fillna(0) > 1e-3)).all().to_numpy()
    assert (got == ref).all() and not got[2] and not got[4] and got[0]


def test_jump_recipe_equals_pycytominer_scipy_and_harmonypy_in_turn():
    wells, x = random_screen(seed=6)
    names = [f"Cells_f{j:02d}" for j in range(x.shape[1])]
    got = recipes.apply_recipe("jump", wells, x, names)
    # the same steps with the field's own tools
    ref = pycytominer_mad(wells, x, names)
    c, n = 3 / 8, len(ref)
    ix = np.random.default_rng(0).permutation(n)
    ranks = np.column_stack([rankdata(ref[ix, j], method="ordinal")[np.argsort(ix)] for j in range(ref.shape[1])])
    ref = norm.ppf((ranks - c) / (n - 2 * c + 1))
    f = pd.DataFrame(ref, columns=names)
    drop = set(frequency_threshold(f, features=names)) | set(correlation_threshold(f, features=names))
    kept = [n_ for n_ in names if n_ not in drop]
    assert got.names == kept and "Cells_f01" not in kept or "Cells_f00" not in kept
    ho = harmonypy.run_harmony(f[kept].to_numpy(), wells[[schema.SOURCE]], schema.SOURCE, max_iter_harmony=20,
                               nclust=int(min(300, round(n / 30))), random_state=0, verbose=False)
    np.testing.assert_allclose(got.prof, np.asarray(ho.Z_corr), rtol=1e-4, atol=1e-4)
    assert [s["step"] for s in got.steps][-1] == "Harmony" and got.steps[-1]["key"] == schema.SOURCE
    # Harmony pulled the sources together: the source offset is gone from the corrected profiles
    before = np.abs(ref[wells[schema.SOURCE] == "source_0"].mean(0) - ref[wells[schema.SOURCE] == "source_1"].mean(0))
    after = np.abs(got.prof[wells[schema.SOURCE] == "source_0"].mean(0) - got.prof[wells[schema.SOURCE] == "source_1"].mean(0))
    assert after.mean() < 0.5 * before[[names.index(k) for k in kept]].mean()


def test_jump_recipe_with_one_source_says_harmony_has_nothing_to_correct():
    wells, x = random_screen(seed=7, n_sources=1)
    got = recipes.apply_recipe("jump", wells, x, [f"f{j}" for j in range(x.shape[1])])
    assert "skipped" in got.steps[-1] and "1 level" in got.steps[-1]["skipped"]


def test_morphohelm_recipe_equals_sklearn_and_pycytominer_in_turn():
    from sklearn.preprocessing import StandardScaler

    wells, x = random_screen(seed=8, d=80, wells_per_plate=60)
    names = [f"f{j:02d}" for j in range(x.shape[1])]
    got = recipes.apply_recipe("morphohelm", wells, x, names)
    assert got.prof.shape == (len(wells), 64) and got.names[0] == "PC01" and got.names[-1] == "PC64"
    scaled = np.empty(x.shape)
    for _, rows in wells.groupby(schema.PLATE).groups.items():
        scaled[rows] = StandardScaler().fit_transform(x[rows].astype(np.float64))
    pcs = sklearn_decomposition.PCA(n_components=64, svd_solver="full").fit_transform(scaled)
    ref = pycytominer_mad(wells, pcs, got.names)
    signs = np.sign((got.prof * ref).sum(axis=0))         # a component's sign is a convention
    np.testing.assert_allclose(got.prof, ref * signs, rtol=1e-3, atol=1e-3)


def test_micon_recipe_is_todays_normalise_wells():
    wells, x = random_screen(seed=9, d=10)
    got = recipes.apply_recipe("micon", wells, x, [f"f{j}" for j in range(10)])
    _, _, ref = normalise_wells(wells, x)
    np.testing.assert_allclose(got.prof, ref, rtol=1e-5, atol=1e-5)
    assert [s["step"] for s in got.steps] == ["features that vary across DMSO", "per-plate MAD against DMSO",
                                              "ZCA-cor fitted on DMSO"]


def test_recipes_refuse_plates_without_dmso_by_name():
    wells, x = random_screen(seed=10)
    wells.loc[wells[schema.PLATE] == "S1P2", schema.ROLE] = schema.TREATED
    for recipe in ("jump", "morphohelm"):
        with pytest.raises(ProfileError, match="S1P2"):
            recipes.apply_recipe(recipe, wells, x, [f"f{j}" for j in range(x.shape[1])])
