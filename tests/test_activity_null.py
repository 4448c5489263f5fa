"""The DMSO null of the mAP of activity (micon.eval.activity.negcon_null) on random screens.

Under the profiling recipe an inactive compound's mAP of activity is not at the random-ranking chance:
the DMSO wells it is ranked against are the ones the profiles were fitted on. The null's pseudo-compounds
(held-back DMSO wells) must reach what compounds without effect reach under the same fit, and compounds
with an effect must stand above them."""
import numpy as np
import pandas as pd
import pytest

from bench.activity_null import no_effect_screen
from micon import schema
from micon.eval import map as mapm
from micon.eval.activity import NULL_PREFIX, negcon_null, pseudo_compounds
from micon.eval.profiles import normalise_wells


def screen(seed: int, d: int = 96, **kw):
    """Gaussian wells: a per-plate offset, 16 DMSO wells on each of 8 plates, every compound once on every
    plate; `n_active` compounds moved by `shift` (bench/activity_null.py's screen, part 1)."""
    return no_effect_screen(seed, d, **kw)


def recipe_map_and_chance(wells, raw):
    w, _, prof = normalise_wells(wells, raw)
    ap, m = mapm.phenotypic_activity(w, prof, null_size=100)
    scored = ap[ap["n_pos_pairs"] > 0]
    chance = mapm.expected_average_precision(scored["n_pos_pairs"].to_numpy(), scored["n_total_pairs"].to_numpy())
    return m.loc[m[schema.JCP] != schema.DMSO, "mean_average_precision"].mean(), chance.mean()


def test_without_any_effect_compounds_reach_the_null_and_not_the_random_ranking_chance():
    gaps, nulls, biases = [], [], []
    for seed in range(6):
        wells, raw = screen(seed)
        recipe, chance = recipe_map_and_chance(wells, raw)
        biases.append(recipe - chance)
        compounds, null = negcon_null(wells, raw, seed=seed, null_size=100)
        gaps.append(compounds["mean_average_precision"].mean() - null["mean_average_precision"].mean())
        nulls.append(null["mean_average_precision"].mean())
    # the recipe's own reading of a screen with no effect at all: well above the random-ranking chance
    assert np.mean(biases) > 0.04, biases
    # the null is what compounds without effect reach: equal on average over screens
    assert abs(np.mean(gaps)) < 0.03, gaps
    assert np.std(nulls) < 0.06


def test_compounds_with_an_effect_stand_above_the_null_and_those_without_do_not():
    wells, raw = screen(0, n_active=20, shift=0.6)
    compounds, null = negcon_null(wells, raw, seed=0, null_size=100)
    s = compounds.set_index(schema.JCP)["mean_average_precision"]
    active = s.index.isin([f"JCP2022_{c:06d}" for c in range(20)])
    level = null["mean_average_precision"].mean()
    assert s[active].mean() > level + 0.2
    assert abs(s[~active].mean() - level) < 0.08


def test_pseudo_compounds_are_a_share_of_each_plates_dmso_grouped_like_replicates():
    wells, raw = screen(3, d=8, n_dmso=7)
    wells.loc[wells.index[7:9], schema.ROLE] = schema.POSCON         # other roles are left alone
    out = pseudo_compounds(wells, share=0.5, seed=1)
    assert out.drop(columns=[schema.JCP, schema.ROLE]).equals(wells.drop(columns=[schema.JCP, schema.ROLE]))
    pseudo = out[out[schema.JCP].str.startswith(NULL_PREFIX)]
    # a compound has 8 wells (one per plate): floor(0.5 * 7) = 3 draws per plate make 3 pseudo-compounds of 8
    assert sorted(set(pseudo[schema.JCP])) == [f"{NULL_PREFIX}{i:04d}" for i in range(3)]
    assert (pseudo.groupby(schema.JCP)[schema.PLATE].nunique() == 8).all()
    assert (pseudo.groupby(schema.JCP).size() == 8).all()
    assert (pseudo[schema.ROLE] == schema.TREATED).all()
    assert (out.groupby(schema.PLATE)[schema.ROLE].apply(lambda r: (r == schema.NEGCON).sum()) == 4).all()
    untouched = ~wells[schema.ROLE].eq(schema.NEGCON)
    assert out[untouched].equals(wells[untouched])
    # groups of 3 on 3 plates: per draw, 8 plates make 2 groups and 2 wells that stay DMSO
    three = pseudo_compounds(wells, share=0.5, seed=1, replicates=3)
    p3 = three[three[schema.JCP].str.startswith(NULL_PREFIX)]
    assert p3[schema.JCP].nunique() == 6 and (p3.groupby(schema.JCP)[schema.PLATE].nunique() == 3).all()
    assert (three[schema.ROLE] == schema.NEGCON).sum() == 8 * 7 - 6 * 3
    # without a role column, DMSO is told by its id and the others count as treated
    bare = pseudo_compounds(wells.drop(columns=[schema.ROLE]), share=0.5, seed=1)
    assert bare[schema.JCP].tolist() == out[schema.JCP].tolist()
    assert (bare[schema.ROLE] == schema.NEGCON).sum() == 32
    with pytest.raises(ValueError, match="share"):
        pseudo_compounds(wells, share=1.0)
    one = ~wells[schema.ROLE].eq(schema.NEGCON).to_numpy() | (wells[schema.WELL] == "D00").to_numpy()
    with pytest.raises(ValueError, match="too few DMSO wells for one pseudo-compound of 8 wells"):
        negcon_null(wells[one].reset_index(drop=True), raw[one])


def test_pseudo_compounds_at_cpg0016_scale_have_a_compounds_replicate_structure():
    """Metadata only, cpg0016's shape: 1,876 plates with 16 DMSO wells each and 116k compounds of 5 wells
    on 5 different plates. Pseudo-compounds must look like compounds (5 wells on 5 plates), not like one
    well on every plate (1,876 'replicates')."""
    rng = np.random.default_rng(0)
    n_plates, n_dmso, n_compounds, reps = 1876, 16, 116_000, 5
    plate = np.r_[np.repeat(np.arange(n_plates), n_dmso),
                  np.concatenate([rng.choice(n_plates, reps, replace=False) for _ in range(n_compounds)])]
    jcp = np.r_[np.full(n_plates * n_dmso, schema.DMSO, dtype=object),
                np.repeat([f"JCP2022_{c:06d}" for c in range(n_compounds)], reps)]
    wells = pd.DataFrame({schema.PLATE: plate, schema.JCP: jcp})
    wells[schema.ROLE] = np.where(wells[schema.JCP] == schema.DMSO, schema.NEGCON, schema.TREATED)
    out = pseudo_compounds(wells, seed=0)
    pseudo = out[out[schema.JCP].str.startswith(NULL_PREFIX)]
    per = pseudo.groupby(schema.JCP)[schema.PLATE]
    assert (per.size() == reps).all() and (per.nunique() == reps).all()
    assert per.ngroups == 8 * (n_plates // reps)           # 8 draws per plate, 375 groups of 5 per draw
    assert (out.groupby(schema.PLATE)[schema.ROLE].apply(lambda r: (r == schema.NEGCON).sum()) >= 8).all()
