"""Named profile recipes: aggregated well profiles -> the normalised profiles every metric is computed on.

    micon       per-plate MAD against DMSO, ZCA-cor fitted on DMSO (this library's default; `normalise_wells`)
    jump        JUMP's published cpg0016 compound profiles (jump-profiling-recipe,
                profiles_var_mad_int_featselect_harmony): variant features -> per-plate MAD against DMSO ->
                rank-based inverse normal transform -> feature selection -> Harmony on the source
    morphohelm  MorphoHELM's default: per-plate centre-scale on all wells -> PCA to 64 -> per-plate MAD
                against DMSO -> no sphering

Each step is the field's formula, vectorised over wells; tests compare them with pycytominer
(`normalize`, `frequency_threshold`, `correlation_threshold`), harmonypy called directly, scipy's rankdata
and scikit-learn's PCA on random screens. `apply_recipe` returns the profiles with a JSON-able account of
every step (settings, features in and out, what was dropped) and the fitted arrays (per-plate medians and
MADs, PCA components, ...), which `evaluate` writes beside the profiles.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from micon import schema
from micon.eval.profiles import (ProfileError, check_finite, group_codes, handle_plates_without_dmso,
                                 mad_robustize_with_fallback, negcon_mask, no_informative_features, normalise_wells)

RECIPES = ("micon", "jump", "morphohelm")

# JUMP's defaults (jump-profiling-recipe): a feature is variant when, on every plate, its DMSO MAD is
# non-zero and |MAD / median| exceeds this; INT uses Blom's constant with ties broken at random (seed 0);
# feature selection drops near-constant features (pycytominer's frequency_threshold) and one of each pair
# correlated above 0.9 (pycytominer's correlation_threshold); Harmony runs 20 iterations with 300 clusters.
JUMP_MIN_COEF_VAR = 1e-3
INT_BLOM = 3.0 / 8
FREQ_CUT = 0.05
UNIQUE_CUT = 0.01
CORR_THRESHOLD = 0.9
HARMONY_ITERATIONS = 20
HARMONY_CLUSTERS = 300
HARMONY_WELLS_PER_CLUSTER = 30      # harmonypy's own default is min(N / 30, 100) clusters
MORPHOHELM_PCS = 64


@dataclass
class Profiles:
    """A recipe's output: the wells kept (same order as given, less dropped plates), their raw and
    normalised profiles, the normalised features' names, and the account of each step."""

    wells: pd.DataFrame
    raw: np.ndarray
    prof: np.ndarray
    names: list[str]
    recipe: str
    steps: list[dict] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"recipe": self.recipe, "n_features_in": int(self.raw.shape[1]), "n_features_out": len(self.names),
                "steps": self.steps}


# ---------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------

def finite_features(x: np.ndarray) -> np.ndarray:
    """Bool mask of the features with no NaN or inf in any well (JUMP's remove_nan_infs_columns)."""
    return np.isfinite(x).all(axis=0)


def plate_negcon_stats(wells: pd.DataFrame, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(plates, median, raw MAD) of each feature over each plate's DMSO wells (plates with DMSO only)."""
    from micon.eval.profiles import _group_median

    neg = negcon_mask(wells)
    plates = wells.loc[neg, schema.PLATE].to_numpy()
    names, codes = np.unique(plates, return_inverse=True)
    xn = np.asarray(x, dtype=np.float64)[neg]
    median = _group_median(xn, codes, len(names))
    mad = _group_median(np.abs(xn - median[codes]), codes, len(names))
    return names, median, mad


def variant_features(wells: pd.DataFrame, x: np.ndarray, min_coef_var: float = JUMP_MIN_COEF_VAR) -> np.ndarray:
    """JUMP's variance filter: True for features whose DMSO MAD is non-zero and whose |MAD / median|
    exceeds `min_coef_var` on every plate (a zero median counts as no variation, as in the recipe)."""
    _, median, mad = plate_negcon_stats(wells, x)
    with np.errstate(divide="ignore", invalid="ignore"):
        cv = np.abs(mad / median)
    cv[~np.isfinite(cv)] = 0.0
    return ((mad != 0) & (cv > min_coef_var)).all(axis=0)


def rank_int(x: np.ndarray, c: float = INT_BLOM, seed: int = 0) -> np.ndarray:
    """Rank-based inverse normal transform of each column over all rows: ordinal ranks with ties broken
    by one random permutation of the rows (`seed`), then Phi^-1((rank - c) / (n - 2c + 1)) (Blom's c = 3/8),
    as jump-profiling-recipe's rank_int_array(stochastic=True)."""
    from scipy.special import ndtri

    x = np.asarray(x)
    n = len(x)
    perm = np.random.default_rng(seed).permutation(n)
    order = np.argsort(x[perm], axis=0, kind="stable")
    ranks = np.empty(x.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, np.arange(1, n + 1, dtype=np.float64)[:, None], axis=0)
    out = np.empty_like(ranks)
    out[perm] = ranks
    return ndtri((out - c) / (n - 2 * c + 1))


def frequency_excluded(x: np.ndarray, freq_cut: float = FREQ_CUT, unique_cut: float = UNIQUE_CUT) -> np.ndarray:
    """pycytominer's frequency_threshold: True for features whose second most common value is rarer than
    `freq_cut` x the most common, or whose distinct values number fewer than `unique_cut` x the wells."""
    x = np.asarray(x)
    n, d = x.shape
    out = np.zeros(d, bool)
    for j in range(d):
        _, counts = np.unique(x[:, j], return_counts=True)
        top = np.sort(counts)[::-1]
        ratio = top[1] / top[0] if len(top) > 1 else 0.0
        out[j] = ratio < freq_cut or len(counts) / n < unique_cut
    return out


def correlation_excluded(x: np.ndarray, threshold: float = CORR_THRESHOLD) -> np.ndarray:
    """pycytominer's correlation_threshold: for every pair of features with Pearson correlation above
    `threshold` (signed, as pycytominer), the one with the larger sum of |correlation| to all features is
    dropped (each pair decides on its own, so a chain can lose more than one member)."""
    x = np.asarray(x, dtype=np.float64)
    d = x.shape[1]
    if d < 2:
        return np.zeros(d, bool)
    corr = np.corrcoef(x, rowvar=False)
    position = np.empty(d, int)
    position[pd.Series(np.abs(corr).sum(axis=0)).sort_values().index.to_numpy()] = np.arange(d)
    a, b = np.nonzero(np.tril(corr > threshold, k=-1))
    out = np.zeros(d, bool)
    out[np.where(position[a] > position[b], a, b)] = True
    return out


def harmony(wells: pd.DataFrame, x: np.ndarray, key: str, *, iterations: int = HARMONY_ITERATIONS,
            clusters: int | None = None, seed: int = 0) -> tuple[np.ndarray, dict]:
    """harmonypy's run_harmony on the features, corrected for `key` (a metadata column); clusters: JUMP's
    300, at most one per 30 wells (harmonypy's own rule) on small screens. Returns (corrected, account)."""
    try:
        import harmonypy
    except ImportError as e:            # pragma: no cover - launch.sh installs it
        raise ProfileError("recipe=jump needs harmonypy (pip install harmonypy)") from e
    n_clusters = int(clusters or min(HARMONY_CLUSTERS, max(2, round(len(x) / HARMONY_WELLS_PER_CLUSTER))))
    meta = pd.DataFrame({key: wells[key].astype(str).to_numpy()})
    ho = harmonypy.run_harmony(np.asarray(x, dtype=np.float64), meta, key, max_iter_harmony=iterations,
                               nclust=n_clusters, random_state=seed, verbose=False)
    z = np.asarray(ho.Z_corr, dtype=np.float64)
    if z.shape != x.shape:          # harmonypy < 2 returns features x wells
        z = z.T
    objective = list(np.asarray(ho.objective_harmony, dtype=float).ravel())
    return z, {"key": key, "batches": int(meta[key].nunique()), "clusters": n_clusters, "iterations": iterations,
               "harmony_iterations_run": len(objective), "objective_last": objective[-1] if objective else None,
               "seed": seed, "harmonypy": getattr(harmonypy, "__version__", "?")}


def center_scale_per_plate(wells: pd.DataFrame, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x - plate mean) / plate std over all of a plate's wells (population std; a constant feature on a
    plate is only centred, as scikit-learn's StandardScaler). Returns (scaled, means, stds) per plate."""
    codes = group_codes(wells, [schema.PLATE])
    n = int(codes.max()) + 1
    x = np.asarray(x, dtype=np.float64)
    counts = np.bincount(codes, minlength=n)[:, None]
    means = np.zeros((n, x.shape[1]))
    np.add.at(means, codes, x)
    means /= counts
    sq = np.zeros_like(means)
    np.add.at(sq, codes, (x - means[codes]) ** 2)
    stds = np.sqrt(sq / counts)
    stds[stds == 0] = 1.0
    return (x - means[codes]) / stds[codes], means, stds


@dataclass(frozen=True)
class PCA:
    """A fitted PCA (centred, not whitened): components as scikit-learn's (signs as its svd_flip:
    each component's largest-magnitude loading positive)."""

    mean: np.ndarray
    components: np.ndarray
    explained_variance_ratio: np.ndarray

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.components.T


def fit_pca(x: np.ndarray, n_components: int) -> PCA:
    """PCA from the d x d covariance (one pass over the wells, memory d^2: linear in the wells)."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    k = int(min(n_components, n, d))
    mean = x.mean(axis=0)
    cov = np.zeros((d, d))
    for lo in range(0, n, 65536):
        block = x[lo:lo + 65536] - mean
        cov += block.T @ block
    cov /= max(n - 1, 1)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    values, vectors = np.clip(values[order], 0, None), vectors[:, order]
    comps = vectors[:, :k].T
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    comps *= np.where(signs == 0, 1, signs)[:, None]
    total = values.sum()
    return PCA(mean=mean, components=comps, explained_variance_ratio=values[:k] / total if total > 0 else values[:k])


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------

def _mad_step(wells, x, fallback, arrays) -> np.ndarray:
    """Per-plate MAD against DMSO, its fitted medians and MADs recorded in `arrays` (as `normalise_wells`)."""
    stats: dict = {}
    out = mad_robustize_with_fallback(wells, x, fallback, stats=stats)
    arrays |= {"mad_plates": stats["groups"], "mad_median": stats["median"].astype(np.float32),
               "mad_mad": stats["mad"].astype(np.float32)}
    return out.astype(np.float64)


def apply_recipe(recipe: str, wells: pd.DataFrame, raw: np.ndarray, names: Sequence[str], *,
                 normalize: bool = True, whiten: bool = True, epsilon: float = 1e-6,
                 plates_without_dmso: str = "stop", harmony_key: str = schema.SOURCE,
                 harmony_clusters: int = 0, n_pcs: int = MORPHOHELM_PCS, seed: int = 0,
                 say: Callable[[str], None] | None = None) -> Profiles:
    """Aggregated wells (`aggregate_wells`) -> `Profiles` under `recipe` (micon | jump | morphohelm).
    Every statistic against DMSO is fitted on the rows whose role is negcon (`negcon_null` relies on it).
    `say` gets one line per step with its size and seconds."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe: one of {', '.join(RECIPES)}; got {recipe!r}")
    say = say or (lambda msg: None)
    names = list(names)
    raw = np.asarray(raw)
    if raw.shape[1] != len(names):
        raise ValueError(f"apply_recipe: {raw.shape[1]} features but {len(names)} names")
    steps: list[dict] = []
    arrays: dict[str, np.ndarray] = {}
    clock = [time.perf_counter()]

    def step(name: str, keep: np.ndarray | None = None, **info):
        nonlocal names
        if keep is not None:
            dropped = [n for n, k in zip(names, keep) if not k]
            names = [n for n, k in zip(names, keep) if k]
            info |= {"dropped": len(dropped), "dropped_features": dropped[:50]}
        now = time.perf_counter()
        steps.append({"step": name, "features": len(names), **info})
        say(f"{recipe}: {name}: {len(wells):,} wells x {len(names):,} features ({now - clock[0]:.1f} s)")
        clock[0] = now

    if recipe == "micon":       # normalise_wells is this recipe; it reports what it fitted
        wells, raw, x = normalise_wells(wells, raw, normalize=normalize, whiten=whiten, epsilon=epsilon,
                                        plates_without_dmso=plates_without_dmso, fitted=arrays)
        step("features that vary across DMSO", arrays.pop("kept"))
        fallback = arrays.pop("fallback")
        if normalize:
            step("per-plate MAD against DMSO", scale=1.4826, fallback_plates=len(fallback))
        if whiten:
            step("ZCA-cor fitted on DMSO", epsilon=epsilon, fit_wells=int(negcon_mask(wells).sum()))
        return Profiles(wells=wells, raw=raw, prof=x, names=names, recipe=recipe, steps=steps, arrays=arrays)
    wells, raw, fallback = handle_plates_without_dmso(wells, raw, plates_without_dmso)
    if recipe == "jump":
        keep = finite_features(raw)
        x = raw[:, keep].astype(np.float64)
        step("features without NaN or inf", keep)
        keep = variant_features(wells, x)
        x = x[:, keep]
        step("variant features (DMSO MAD > 0 and |MAD/median| > 1e-3 on every plate)", keep,
             min_coef_var=JUMP_MIN_COEF_VAR)
        if not len(names):
            raise no_informative_features(wells, raw, recipe,
                                          "recipe=jump: no feature varies across the DMSO wells of every plate")
        x = _mad_step(wells, x, fallback, arrays)
        step("per-plate MAD against DMSO", scale=1.4826, fallback_plates=len(fallback))
        x = rank_int(x, seed=seed)
        step("rank-based inverse normal transform", c=INT_BLOM, ties="random", seed=seed)
        keep = ~frequency_excluded(x)
        x = x[:, keep]
        step("frequency threshold", keep, freq_cut=FREQ_CUT, unique_cut=UNIQUE_CUT)
        keep = ~correlation_excluded(x)
        x = x[:, keep]
        step("correlation threshold", keep, threshold=CORR_THRESHOLD)
        n_batches = wells[harmony_key].nunique() if harmony_key in wells.columns else 0
        if n_batches > 1:
            x, info = harmony(wells, x, harmony_key, clusters=harmony_clusters or None, seed=seed)
            step("Harmony", **info)
        else:
            step("Harmony", skipped=f"{harmony_key} has {n_batches} level(s): nothing to correct", key=harmony_key)
    else:   # morphohelm
        keep = finite_features(raw) & (np.asarray(raw).std(axis=0) > 0)
        x = raw[:, keep].astype(np.float64)
        step("finite, non-constant features", keep)
        if not keep.any():
            raise no_informative_features(wells, raw, recipe)
        x, means, stds = center_scale_per_plate(wells, x)
        arrays |= {"center_scale_mean": means.astype(np.float32), "center_scale_std": stds.astype(np.float32)}
        step("per-plate centre-scale on all wells")
        pca = fit_pca(x, n_pcs)
        x = pca.transform(x)
        names = [f"PC{i + 1:02d}" for i in range(x.shape[1])]
        arrays |= {"pca_mean": pca.mean, "pca_components": pca.components.astype(np.float32),
                   "pca_explained_variance_ratio": pca.explained_variance_ratio}
        step(f"PCA to {x.shape[1]}", n_components=int(x.shape[1]), fit_wells=len(x),
             explained_variance=float(pca.explained_variance_ratio.sum()))
        x = _mad_step(wells, x, fallback, arrays)
        step("per-plate MAD against DMSO (no sphering)", scale=1.4826, fallback_plates=len(fallback))
    check_finite(wells, x, "well profiles", f"after recipe={recipe}")
    return Profiles(wells=wells, raw=raw, prof=x.astype(np.float32), names=names, recipe=recipe, steps=steps,
                    arrays=arrays)
