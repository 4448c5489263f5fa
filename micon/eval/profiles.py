"""Well profiles for evaluation: site -> well aggregation, per-plate robust MAD normalisation against
DMSO, ZCA-cor whitening fitted on DMSO (pycytominer's exact formulas), the whole recipe
(`well_profiles`), and the table the field's tools read (`profile_table`: JUMP's Metadata_* names,
`Metadata_pert_type` trt/negcon/poscon).

Pure, vectorised NumPy (group codes + sorting, never a Python loop per well or per plate). Nothing
here reads or writes files; NaN/inf features are rejected rather than silently propagated.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import pandas as pd

from micon import schema

__all__ = [
    "group_codes",
    "aggregate_wells",
    "negcon_mask",
    "mad_robustize",
    "Spherize",
    "fit_spherize",
    "spherize",
    "l2_normalize",
    "WELL_KEYS",
    "ProfileError",
    "check_finite",
    "informative_features",
    "handle_plates_without_dmso",
    "mad_robustize_with_fallback",
    "well_profiles",
    "PERT_TYPE",
    "PERT_TYPES",
    "profile_table",
    "read_profile_table",
    "read_annotations",
]

log = logging.getLogger(__name__)

# A well is identified by (source, plate, well): plate names alone are unique in cpg0016, but the
# source makes the key safe for any other screen.
WELL_KEYS = (schema.SOURCE, schema.PLATE, schema.WELL)
# pycytominer's RobustMAD scales the MAD by 1.4826 (scipy median_abs_deviation(scale=1/1.4826)).
MAD_NORMAL_SCALE = 1.4826


def _check_features(meta: pd.DataFrame, feats: np.ndarray, what: str) -> np.ndarray:
    feats = np.asarray(feats)
    if feats.ndim != 2:
        raise ValueError(f"{what}: features must be a 2-D array (rows x features), got shape {feats.shape}")
    if len(meta) != len(feats):
        raise ValueError(f"{what}: metadata has {len(meta)} rows but the feature matrix has {len(feats)}; "
                         "they must describe the same rows in the same order")
    if not np.isfinite(feats).all():
        bad = int(np.flatnonzero(~np.isfinite(feats).all(axis=1))[0])
        raise ValueError(f"{what}: feature row {bad} ({meta.iloc[bad].to_dict()}) holds NaN or inf; "
                         "drop or impute such rows before evaluation")
    return feats


def _require(meta: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in meta.columns]
    if missing:
        raise KeyError(f"{what}: metadata lacks column(s) {missing}; it has {list(meta.columns)}")


def group_codes(meta: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """Integer code per row of the combination of `columns` (0..n_groups-1, in order of first appearance)."""
    columns = list(columns)
    if not columns:
        return np.zeros(len(meta), dtype=np.int64)
    _require(meta, columns, "group_codes")
    if meta[columns].isna().any(axis=None):
        col = next(c for c in columns if meta[c].isna().any())
        raise ValueError(f"metadata column {col!r} has missing values in rows "
                         f"{np.flatnonzero(meta[col].isna().to_numpy())[:5].tolist()}; fill or drop them")
    return meta.groupby(columns, sort=False, observed=True).ngroup().to_numpy(np.int64)


def _sorted_groups(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stable order of rows by code, the start offset of each code's run and each run's size."""
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes)
    starts = np.zeros_like(sizes)
    np.cumsum(sizes[:-1], out=starts[1:])
    return order, starts, sizes


def _group_median(values: np.ndarray, codes: np.ndarray, n_groups: int, max_bytes: int = 256 << 20) -> np.ndarray:
    """Median of `values` rows per code, vectorised: groups of equal size are stacked into a
    (groups, size, features) block and reduced with np.median (median of an even count = mean of the
    two middle values, as pandas and NumPy do)."""
    order, starts, sizes = _sorted_groups(codes)
    out = np.full((n_groups, values.shape[1]), np.nan, dtype=np.float64)
    if values.shape[1] == 0:        # no features (all dropped as constant): nothing to reduce
        return out
    for size in np.unique(sizes[sizes > 0]):
        groups = np.flatnonzero(sizes == size)
        step = max(1, max_bytes // int(size * values.shape[1] * 8))
        for lo in range(0, len(groups), step):
            g = groups[lo:lo + step]
            rows = order[starts[g][:, None] + np.arange(size)[None, :]]
            out[g] = np.median(values[rows].astype(np.float64, copy=False), axis=1)
    return out


def aggregate_wells(meta: pd.DataFrame, feats: np.ndarray, by: Sequence[str] = WELL_KEYS,
                    method: Literal["mean", "median"] = "mean") -> tuple[pd.DataFrame, np.ndarray]:
    """Site rows -> one row per well (per combination of `by`), mean or median of the features.

    The well table keeps every metadata column that is constant within each well (so
    `Metadata_Site` and the like are dropped), adds `n_sites`, and lists wells in order of their first
    site. Features are accumulated in float64 and returned in the input's float dtype (float32 for
    integer input).
    """
    feats = _check_features(meta, feats, "aggregate_wells")
    codes = group_codes(meta, by)
    n_wells = int(codes.max()) + 1 if len(codes) else 0
    order, starts, sizes = _sorted_groups(codes)
    if method == "mean":
        sums = np.add.reduceat(feats[order].astype(np.float64, copy=False), starts, axis=0) if n_wells else \
            np.zeros((0, feats.shape[1]))
        well_feats = sums / sizes[:, None]
    elif method == "median":
        well_feats = _group_median(feats, codes, n_wells)
    else:
        raise ValueError(f"aggregate_wells: method must be 'mean' or 'median', got {method!r}")
    out_dtype = feats.dtype if np.issubdtype(feats.dtype, np.floating) else np.float32

    first = order[starts]
    keep = []
    for col in meta.columns:
        values = pd.factorize(meta[col], use_na_sentinel=False)[0]
        if (values[order] == np.repeat(values[first], sizes)).all():
            keep.append(col)
    well_meta = meta.iloc[first][keep].reset_index(drop=True)
    well_meta["n_sites"] = sizes
    return well_meta, well_feats.astype(out_dtype)


def negcon_mask(meta: pd.DataFrame) -> np.ndarray:
    """True for negative-control (DMSO) rows: the role column when present, else the JCP2022 id."""
    if schema.ROLE in meta.columns:
        return (meta[schema.ROLE] == schema.NEGCON).to_numpy()
    _require(meta, [schema.JCP], "negcon_mask")
    return (meta[schema.JCP] == schema.DMSO).to_numpy()


def mad_robustize(meta: pd.DataFrame, feats: np.ndarray, by: Sequence[str] = (schema.PLATE,),
                  negcon: np.ndarray | None = None, epsilon: float = 1e-18, stats: dict | None = None) -> np.ndarray:
    """Per-plate robust MAD normalisation against DMSO: (x - median_negcon) / (1.4826 * MAD_negcon + eps).

    The same as running pycytominer `normalize(method="mad_robustize", samples="Metadata_Role ==
    'negcon'", mad_robustize_epsilon=epsilon)` on each plate separately (its RobustMAD uses
    `scipy.stats.median_abs_deviation(scale=1/1.4826)`, i.e. 1.4826 x the raw MAD, default eps 1e-18).
    `by` names the grouping (one plate by default); `negcon` overrides the DMSO rows (bool mask).
    A constant DMSO feature gives a near-zero denominator exactly as in pycytominer: remove such
    features first. Every group must hold at least one negcon row. `stats`, when given, receives what was
    fitted: `groups` (each group's first `by` value), `median` and the raw `mad` (groups x features).
    """
    feats = _check_features(meta, feats, "mad_robustize")
    negcon = negcon_mask(meta) if negcon is None else np.asarray(negcon, dtype=bool)
    codes = group_codes(meta, by)
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    ctrl_counts = np.bincount(codes[negcon], minlength=n_groups)
    if (ctrl_counts == 0).any():
        g = np.flatnonzero(ctrl_counts == 0)
        rows = [int(np.flatnonzero(codes == i)[0]) for i in g[:5]]
        names = [meta.iloc[r][list(by)].to_dict() for r in rows]
        raise ValueError(f"mad_robustize: {len(g)} group(s) of {list(by)} have no negcon (DMSO) rows, e.g. "
                         f"{names}; drop those plates or normalise them against another reference")
    x = feats.astype(np.float64, copy=False)
    median = _group_median(x[negcon], codes[negcon], n_groups)
    mad = _group_median(np.abs(x[negcon] - median[codes[negcon]]), codes[negcon], n_groups)
    out = (x - median[codes]) / (MAD_NORMAL_SCALE * mad[codes] + epsilon)
    if stats is not None:
        first = np.full(n_groups, -1, dtype=np.int64)
        first[codes[::-1]] = np.arange(len(codes))[::-1]
        stats |= {"groups": meta[list(by)[0]].to_numpy()[first].astype(str), "median": median, "mad": mad}
    out_dtype = feats.dtype if np.issubdtype(feats.dtype, np.floating) else np.float32
    return out.astype(out_dtype)


@dataclass(frozen=True)
class Spherize:
    """A fitted sphering (whitening) transform: x -> ((x - mean) / scale) @ W."""

    mean: np.ndarray
    scale: np.ndarray
    W: np.ndarray
    method: str
    epsilon: float

    def transform(self, feats: np.ndarray) -> np.ndarray:
        feats = np.asarray(feats)
        out = ((feats.astype(np.float64, copy=False) - self.mean) / self.scale) @ self.W
        return out.astype(feats.dtype if np.issubdtype(feats.dtype, np.floating) else np.float32)


def fit_spherize(feats: np.ndarray, epsilon: float = 1e-6,
                 method: Literal["ZCA-cor", "ZCA", "PCA-cor", "PCA"] = "ZCA-cor") -> Spherize:
    """Fit pycytominer's `Spherize(method=..., epsilon=..., center=True)` on `feats` (usually the DMSO wells).

    Conventions copied from pycytominer 1.7.1 (operations/transform.py): "-cor" methods standardise
    with StandardScaler (mean, population std with ddof=0) and refuse zero-variance features; the
    SVD is taken of the centred/standardised matrix; singular values beyond the rank (n <= d) are
    filled with the last non-zero one; epsilon is added to the *singular values* (not eigenvalues);
    W = V diag(sqrt(n-1) / (s + eps)) [V^T for ZCA]. PCA variants rotate into component space.
    """
    if method not in ("ZCA-cor", "ZCA", "PCA-cor", "PCA"):
        raise ValueError(f"fit_spherize: method must be one of ZCA-cor, ZCA, PCA-cor, PCA; got {method!r}")
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"fit_spherize: need a 2-D matrix with at least 2 rows, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("fit_spherize: the fitting matrix holds NaN or inf")
    n, d = x.shape
    mean = x.mean(axis=0)
    if method.endswith("-cor"):
        var = x.var(axis=0)
        if (var == 0).any():
            raise ValueError(f"fit_spherize: features {np.flatnonzero(var == 0)[:10].tolist()} have zero "
                             "variance in the fitting rows (divide by zero); remove low-variance features first")
        scale = np.sqrt(var)
    else:
        scale = np.ones(d)
    xt = (x - mean) / scale
    # Vt is the same with or without full matrices when n >= d; avoid the n x n U otherwise.
    _, sigma, vt = np.linalg.svd(xt, full_matrices=n < d)
    tol = (sigma.max() if sigma.size else 0.0) * max(n, d) * np.finfo(np.float64).eps
    rank = int((sigma > tol).sum())
    if not (rank == d or rank == n - 1):
        why = (f"{n} fitting wells for {d} features, and after per-plate MAD a plate's DMSO wells span one "
               f"dimension fewer than their count (a plate with a single DMSO well adds nothing): too few DMSO wells "
               f"to whiten; evaluate with spherize=false, or recipe=morphohelm" if n <= d else
               "check for linearly dependent features")
        raise ValueError(f"fit_spherize: the fitting matrix is not full rank (n = {n}, d = {d}, rank = {rank}): {why}")
    if n <= d:
        sigma = np.concatenate([sigma[:rank], np.repeat(sigma[rank - 1], d - rank)])
    sigma = sigma + epsilon
    W = (vt / sigma[:, None]).T * np.sqrt(n - 1)
    if method.startswith("ZCA"):
        W = W @ vt
    return Spherize(mean=mean, scale=scale, W=W, method=method, epsilon=epsilon)


def spherize(feats: np.ndarray, fit_rows: np.ndarray, epsilon: float = 1e-6,
             method: Literal["ZCA-cor", "ZCA", "PCA-cor", "PCA"] = "ZCA-cor") -> np.ndarray:
    """Whiten all rows of `feats` with a transform fitted on `fit_rows` (bool mask or indices, e.g. DMSO)."""
    feats = np.asarray(feats)
    return fit_spherize(feats[fit_rows], epsilon=epsilon, method=method).transform(feats)


def l2_normalize(feats: np.ndarray, dtype=np.float32, chunk_rows: int = 16384) -> np.ndarray:
    """Rows scaled to unit length (cosine similarity = dot product), norms taken in float64.

    Works through row chunks so the float64 copy never exceeds `chunk_rows` rows. An all-zero row
    stays zero (cosine 0 to everything rather than NaN); NaN/inf rows are rejected by number.
    """
    feats = np.asarray(feats)
    out = np.empty(feats.shape, dtype=dtype)
    for lo in range(0, len(feats), chunk_rows):
        x = feats[lo:lo + chunk_rows].astype(np.float64)
        if not np.isfinite(x).all():
            bad = lo + int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
            raise ValueError(f"feature row {bad} holds NaN or inf; drop or impute it before evaluation")
        out[lo:lo + chunk_rows] = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    return out


# ---------------------------------------------------------------------------------------------
# the evaluation recipe: sites -> normalised well profiles
# ---------------------------------------------------------------------------------------------

class ProfileError(RuntimeError):
    """Well profiles cannot be built as asked (non-finite values, plates without DMSO)."""


def check_finite(meta: pd.DataFrame, x: np.ndarray, what: str, stage: str) -> None:
    """Fail, naming plates and wells, instead of turning NaN or inf into numbers."""
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        where = meta.loc[bad, [schema.PLATE, schema.WELL]]
        plates = where[schema.PLATE].value_counts()
        raise ProfileError(f"{int(bad.sum())} of {len(x)} {what} are not finite {stage} (plates: "
                           + ", ".join(f"{p} ({n} wells)" for p, n in plates.head(5).items())
                           + f"{' ...' if len(plates) > 5 else ''}; first well {where.iloc[0].tolist()}). Check those "
                           f"plates' embeddings (a diverged checkpoint gives NaN), or evaluate with normalize=false "
                           f"spherize=false to see the raw profiles")


def informative_features(wells: pd.DataFrame, raw: np.ndarray, tol: float = 1e-8) -> np.ndarray:
    """Bool mask of the features that vary across the DMSO wells (all wells when there is at most one).

    A feature constant across DMSO (a dead ReLU unit, a saturated statistic) has no robust scale and
    cannot be whitened; `well_profiles` drops it, as pycytominer's variance filter would.
    """
    neg = negcon_mask(wells)
    ref = np.asarray(raw)[neg] if neg.sum() > 1 else np.asarray(raw)
    mad = np.median(np.abs(ref - np.median(ref, axis=0)), axis=0)
    return (mad > tol) & (ref.std(axis=0) > tol)


def no_informative_features(wells: pd.DataFrame, raw: np.ndarray, recipe: str = "micon",
                            otherwise: str = "") -> ProfileError:
    """The error for profiles with no feature left to rank wells by: a collapsed encoder (every value the same
    everywhere), else `otherwise` (default: features that vary somewhere but never across the DMSO wells)."""
    raw = np.asarray(raw)
    n, neg = raw.shape[1], negcon_mask(wells)
    finite = raw[:, np.isfinite(raw).all(axis=0)]
    if raw.size == 0 or (finite.size and finite.shape[1] == n and np.ptp(finite, axis=0).max() <= 1e-8):
        value = f" (every value is {raw.flat[0]:g})" if raw.size and np.all(raw == raw.flat[0]) else ""
        return ProfileError(
            f"all {n} features are constant over all {len(raw):,} wells{value}: the embeddings carry no information, "
            f"as a collapsed encoder's do (every image mapped to one point), so retrieval could only score chance. "
            f"Check the run that made them (its loss, its learning rate, the checkpoint given to embed) and embed again")
    return ProfileError(otherwise or
        f"none of the {n} features varies across the {int(neg.sum()):,} DMSO wells, so recipe={recipe} has nothing to "
        f"normalise against DMSO: the encoder maps every DMSO image to one point. Check the run that made them, or "
        f"evaluate another recipe")


def handle_plates_without_dmso(wells: pd.DataFrame, raw: np.ndarray, policy: str = "stop",
                               normalize: bool = True) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """Plates with no DMSO well cannot be normalised per plate: stop naming them (`policy="stop"`), drop
    their wells ("drop"), or normalise them against their batch's, else their source's, DMSO wells
    ("batch"). Returns (wells, raw, plates to normalise against their batch)."""
    if policy not in ("stop", "drop", "batch"):
        raise ValueError(f"plates_without_dmso: stop, drop or batch, got {policy!r}")
    has = wells.loc[negcon_mask(wells), schema.PLATE].unique()
    missing = sorted(set(wells[schema.PLATE]) - set(has))
    if not missing or not normalize:
        return wells, raw, []
    names = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
    if policy == "stop":
        raise ProfileError(f"{len(missing)} plate(s) have no DMSO well to normalise against: {names}. Pass "
                           f"plates_without_dmso=drop to leave their wells out, or plates_without_dmso=batch to "
                           f"normalise them against their batch's (else their source's) DMSO wells")
    if policy == "drop":
        keep = ~wells[schema.PLATE].isin(missing).to_numpy()
        log.warning("dropping %d wells of %d plate(s) without DMSO: %s", int((~keep).sum()), len(missing), names)
        return wells[keep].reset_index(drop=True), raw[keep], []
    log.warning("%d plate(s) without DMSO normalised against their batch's (else source's) DMSO: %s",
                len(missing), names)
    return wells, raw, missing


def mad_robustize_with_fallback(wells: pd.DataFrame, x: np.ndarray, fallback: Sequence[str],
                                stats: dict | None = None) -> np.ndarray:
    """`mad_robustize` per plate; the plates in `fallback` (no DMSO of their own) against the DMSO wells
    of their batch, else of their source. `stats`: the plates with DMSO of their own (`mad_robustize`)."""
    if not len(fallback):
        return mad_robustize(wells, x, stats=stats)
    out = np.empty_like(x)
    own = ~wells[schema.PLATE].isin(fallback).to_numpy()
    out[own] = mad_robustize(wells[own].reset_index(drop=True), x[own], stats=stats)
    neg = negcon_mask(wells)
    for plate, rows in wells[~own].groupby(schema.PLATE).groups.items():
        first = wells.loc[rows[0]]
        ref = np.array([], int)
        for col in (schema.BATCH, schema.SOURCE):       # the batch's DMSO wells, else the source's
            ref = np.flatnonzero(neg & (wells[col] == first[col]).to_numpy())
            if len(ref):
                break
        if len(ref) == 0:
            raise ProfileError(f"plate {plate}: neither its batch nor its source has a DMSO well; use "
                               f"plates_without_dmso=drop")
        idx = np.r_[ref, np.asarray(list(rows))]
        sub = wells.iloc[idx].reset_index(drop=True).assign(**{schema.PLATE: "batch"})
        out[np.asarray(list(rows))] = mad_robustize(sub, x[idx], negcon=np.r_[np.ones(len(ref), bool),
                                                                                np.zeros(len(rows), bool)])[len(ref):]
    return out


def well_profiles(meta: pd.DataFrame, emb: np.ndarray, *, aggregate: Literal["mean", "median"] = "mean",
                  normalize: bool = True, whiten: bool = True, epsilon: float = 1e-6,
                  plates_without_dmso: str = "stop") -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Site rows -> (well metadata, raw well profiles, normalised profiles), the evaluation's recipe.

    Raw: the `aggregate` of each well's sites, every feature. Normalised: the features that vary across
    DMSO (`informative_features(wells, raw)`, same order), per-plate robust MAD against DMSO
    (`normalize`) and ZCA-cor fitted on the DMSO wells (`whiten`), float32. Plates without DMSO follow
    `plates_without_dmso` (stop | drop | batch, see `handle_plates_without_dmso`).
    """
    check_finite(meta, emb, "site embeddings", "as embedded")
    wells, raw = aggregate_wells(meta, np.asarray(emb).astype(np.float32), method=aggregate)
    return normalise_wells(wells, raw, normalize=normalize, whiten=whiten, epsilon=epsilon,
                           plates_without_dmso=plates_without_dmso)


def normalise_wells(wells: pd.DataFrame, raw: np.ndarray, *, normalize: bool = True, whiten: bool = True,
                    epsilon: float = 1e-6, plates_without_dmso: str = "stop", fitted: dict | None = None
                    ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Well rows -> (well metadata, raw, normalised profiles): `well_profiles` after its aggregation (the
    `micon` recipe of micon.eval.recipes).

    Every statistic (the per-plate median and MAD, the whitening) is fitted on the rows whose role is
    negcon, so relabelling wells changes what is fitted (`micon.eval.activity.negcon_null` relies on it).
    `fitted`, when given, receives the kept-feature mask (`kept`), the plates normalised against their
    batch (`fallback`), the per-plate DMSO medians and MADs (`mad_plates`, `mad_median`, `mad_mad`) and the
    whitening (`zca_mean`, `zca_scale`, `zca_W`).
    """
    wells, raw, fallback = handle_plates_without_dmso(wells, raw, plates_without_dmso, normalize)
    kept = informative_features(wells, raw)
    if not kept.any():
        raise no_informative_features(wells, raw)
    x = raw[:, kept].astype(np.float64)
    record = fitted if fitted is not None else {}
    record |= {"kept": kept, "fallback": list(fallback)}
    if normalize:
        stats = {} if fitted is not None else None
        x = mad_robustize_with_fallback(wells, x, fallback, stats=stats)
        if stats:
            record |= {"mad_plates": stats["groups"], "mad_median": stats["median"].astype(np.float32),
                       "mad_mad": stats["mad"].astype(np.float32)}
    if whiten:
        sph = fit_spherize(x[negcon_mask(wells)], epsilon=epsilon)
        x = sph.transform(x)
        record |= {"zca_mean": sph.mean, "zca_scale": sph.scale, "zca_W": sph.W.astype(np.float32)}
    check_finite(wells, x, "well profiles", "after " + ("MAD normalisation and " if normalize else "")
                 + ("ZCA whitening" if whiten else "feature selection"))
    return wells, raw, x.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# the table the field's tools read
# ---------------------------------------------------------------------------------------------

# JUMP's profiling recipe names the role column Metadata_pert_type (trt / negcon / poscon); the library
# keeps its own role column (schema.ROLE) and maps here, at the boundary, once.
PERT_TYPE = "Metadata_pert_type"
PERT_TYPES = {schema.TREATED: "trt", schema.NEGCON: "negcon", schema.POSCON: "poscon", schema.EMPTY: "empty"}
# leading metadata columns, in JUMP's order; any other metadata follows
_JUMP_ORDER = (schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL, schema.JCP, schema.INCHIKEY, schema.SMILES,
               PERT_TYPE)


def profile_table(wells: pd.DataFrame, feats: np.ndarray, names: Sequence[str]) -> pd.DataFrame:
    """Well metadata + features as pycytominer and copairs read them: `Metadata_*` columns first (JUMP's
    names, the role as `Metadata_pert_type` = trt/negcon/poscon, other columns prefixed `Metadata_`),
    then one float32 column per feature named by `names`."""
    feats = np.asarray(feats)
    names = list(names)
    if feats.ndim != 2 or feats.shape != (len(wells), len(names)):
        raise ValueError(f"profile_table: {len(wells)} wells and {len(names)} feature names, but features of shape "
                         f"{feats.shape}")
    bad = [n for n in names if not isinstance(n, str) or n.startswith("Metadata_")]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"profile_table: feature names must be distinct strings not starting with Metadata_; "
                         f"got {bad[:3] or pd.Series(names)[pd.Series(names).duplicated()].tolist()[:3]}")
    meta = wells.reset_index(drop=True)
    meta = meta.rename(columns={c: f"Metadata_{c}" for c in meta.columns if not c.startswith("Metadata_")})
    if schema.ROLE in meta.columns:
        unknown = sorted(set(meta[schema.ROLE].astype(str)) - set(PERT_TYPES))
        if unknown:
            raise ValueError(f"profile_table: role(s) {unknown} in {schema.ROLE} have no Metadata_pert_type; "
                             f"known: {list(PERT_TYPES)}")
        meta = meta.drop(columns=[schema.ROLE]).assign(**{PERT_TYPE: meta[schema.ROLE].map(PERT_TYPES).to_numpy()})
    first = [c for c in _JUMP_ORDER if c in meta.columns]
    meta = meta[first + [c for c in meta.columns if c not in first]]
    return pd.concat([meta, pd.DataFrame(feats.astype(np.float32), columns=names)], axis=1)


# ---------------------------------------------------------------------------------------------
# a user's own profiles
# ---------------------------------------------------------------------------------------------

# what a profile table must carry to be scored (NSB needs the batch, NSS the source, NSL the well)
TABLE_REQUIRED = (schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL, schema.JCP)
# pycytominer's infer_cp_features: CellProfiler's compartments
CP_PREFIXES = ("Cells_", "Nuclei_", "Cytoplasm_")


def read_profile_table(path: str, features: str | None = None) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """A well-level profile table (parquet, or CSV, .csv.gz; local or s3://) with JUMP's `Metadata_*`
    columns, such as pycytominer writes -> (metadata with the library's role column, float32 features,
    feature names). Features: `features`, comma-separated names or globs (`Cells_*,Nuclei_*`), else
    pycytominer's inference (columns starting Cells_, Nuclei_ or Cytoplasm_), else every numeric column
    not named Metadata_*. The role comes from `Metadata_Role`, else `Metadata_pert_type`
    (trt / negcon / poscon), else the JCP2022 id (DMSO is negcon)."""
    import fnmatch
    import io

    from micon import storage

    p = storage.path(path)
    if not p.is_file():
        raise ProfileError(f"profiles: {p} does not exist (a well-level parquet or CSV with Metadata_* columns)")
    data = storage.read_bytes(p)
    name = str(p).lower()
    try:
        table = pd.read_csv(io.BytesIO(data), compression="infer" if not name.endswith(".gz") else "gzip") \
            if ".csv" in name else pd.read_parquet(io.BytesIO(data))
    except Exception as e:      # noqa: BLE001 - a file of the wrong kind: say which
        raise ProfileError(f"profiles: cannot read {p} as {'CSV' if '.csv' in name else 'parquet'}: {e}") from None
    missing = [c for c in TABLE_REQUIRED if c not in table.columns]
    if missing:
        raise ProfileError(f"profiles: {p} lacks {', '.join(missing)} (JUMP's metadata names; NSB needs "
                           f"{schema.BATCH}, NSS {schema.SOURCE}, NSL {schema.WELL})")
    meta_cols = [c for c in table.columns if str(c).startswith("Metadata_")]
    if features:
        patterns = [f.strip() for f in str(features).split(",") if f.strip()]
        names = [c for c in table.columns if c not in meta_cols and any(fnmatch.fnmatchcase(str(c), f) for f in patterns)]
        how = f"features={features}"
    else:
        names = [c for c in table.columns if str(c).startswith(CP_PREFIXES)]
        how = "CellProfiler's compartments (Cells_, Nuclei_, Cytoplasm_)"
        if not names:
            names = [c for c in table.columns if c not in meta_cols and pd.api.types.is_numeric_dtype(table[c])]
            how = "every numeric column not named Metadata_*"
    if not names:
        raise ProfileError(f"profiles: no feature columns in {p} by {how}; name them with features.NAME=...")
    bad = [c for c in names if not pd.api.types.is_numeric_dtype(table[c])]
    if bad:
        raise ProfileError(f"profiles: feature column(s) {bad[:3]} of {p} are not numeric")
    meta = table[meta_cols].copy()
    for col in TABLE_REQUIRED:
        meta[col] = meta[col].astype(str)
    if schema.ROLE not in meta.columns:
        if PERT_TYPE in meta.columns:
            roles = {v: k for k, v in PERT_TYPES.items()}
            meta[schema.ROLE] = meta[PERT_TYPE].map(roles).fillna(schema.TREATED)
        else:
            meta[schema.ROLE] = meta[schema.JCP].map(schema.role_of)
    # the role is written back as Metadata_pert_type, and wells are recounted (n_sites) on aggregation
    meta = meta.drop(columns=[c for c in (PERT_TYPE, "Metadata_n_sites") if c in meta.columns])
    if not (meta[schema.ROLE] == schema.NEGCON).any():
        raise ProfileError(f"profiles: {p} has no negative-control (DMSO, {schema.DMSO}) well to normalise against")
    log.info("profiles %s: %d rows x %d features by %s", p, len(table), len(names), how)
    return meta.reset_index(drop=True), table[names].to_numpy(np.float32), [str(c) for c in names]


def read_annotations(path: str, column: str) -> pd.DataFrame:
    """A compound annotation table (parquet or CSV; local or s3://): Metadata_JCP2022 and `column` (e.g. a
    target; several per compound joined by '|'), one row per compound."""
    import io

    from micon import storage

    p = storage.path(path)
    if not p.is_file():
        raise ProfileError(f"annotations: {p} does not exist (a table of {schema.JCP} and {column})")
    data = io.BytesIO(storage.read_bytes(p))
    table = pd.read_csv(data) if ".csv" in str(p).lower() else pd.read_parquet(data)
    missing = [c for c in (schema.JCP, column) if c not in table.columns]
    if missing:
        raise ProfileError(f"annotations: {p} lacks {', '.join(missing)}; it has {list(table.columns)[:8]}")
    table = table[[schema.JCP, column]].dropna()
    dup = table[schema.JCP].duplicated()
    if dup.any():       # several rows per compound: join them as one multi-annotation
        table = table.groupby(schema.JCP, as_index=False)[column].agg(lambda v: "|".join(sorted(set(map(str, v)))))
    return table.astype({schema.JCP: str})
