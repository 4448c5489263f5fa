"""Well profiles for evaluation: site -> well aggregation, per-plate robust MAD normalisation against
DMSO, and ZCA-cor whitening fitted on DMSO, with pycytominer's exact formulas.

Pure, vectorised NumPy (group codes + sorting, never a Python loop per well or per plate). Nothing
here reads or writes files; NaN/inf features are rejected rather than silently propagated.
"""
from __future__ import annotations

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
]

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
                  negcon: np.ndarray | None = None, epsilon: float = 1e-18) -> np.ndarray:
    """Per-plate robust MAD normalisation against DMSO: (x - median_negcon) / (1.4826 * MAD_negcon + eps).

    The same as running pycytominer `normalize(method="mad_robustize", samples="Metadata_Role ==
    'negcon'", mad_robustize_epsilon=epsilon)` on each plate separately (its RobustMAD uses
    `scipy.stats.median_abs_deviation(scale=1/1.4826)`, i.e. 1.4826 x the raw MAD, default eps 1e-18).
    `by` names the grouping (one plate by default); `negcon` overrides the DMSO rows (bool mask).
    A constant DMSO feature gives a near-zero denominator exactly as in pycytominer: remove such
    features first. Every group must hold at least one negcon row.
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
        raise ValueError(f"fit_spherize: the fitting matrix is not full rank (n = {n}, d = {d}, rank = {rank}); "
                         "check for linearly dependent features")
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
