"""PNG figures of an evaluation and the intervals they show: top-k curves (NSB, NSS) with bootstrap bands
and the chance line, mAP / fraction-retrieved bars with intervals and chance levels, and a 2-D PCA of
well profiles coloured by source before and after normalisation (explained variance, robust limits).

The interval helpers are pure (frames in, frames out); the plot functions take frames and an output path
and write one PNG each: this is the only module of `micon.eval` that writes files. matplotlib's object
API with the Agg canvas: no pyplot global state, no display.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from micon import schema

__all__ = ["bootstrap_ratio", "topk_curves", "map_intervals", "pca_2d", "pca", "robust_limits",
           "plot_topk_curves", "plot_map_summary", "plot_profiles_pca"]

_LABELS = {"nr": "NR: no restriction (any other well)", "nsb": "NSB: replicates in other batches",
           "nss": "NSS: replicates in other sources", "nsp": "NSP: replicates on other plates",
           "nsl": "NSL: replicates at other well positions"}
_YLABELS = {"map_activity": "mAP, activity vs same-plate DMSO",
            "fraction_retrieved": "fraction retrieved (BH p < 0.05)",
            "map_consistency": "mAP, replicates vs other compounds",
            "map_activity_over_null": "mAP of activity - DMSO null"}
# differences from a reference (drawn from 0, which is labelled so): column -> the reference's name
SIGNED = {"map_activity_over_null": "DMSO null (a compound without effect)"}
LEVEL = 0.95


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _finite_max(values) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.max()) if v.size else 0.0


# ---------------------------------------------------------------------------------------------
# intervals
# ---------------------------------------------------------------------------------------------

def bootstrap_ratio(num: np.ndarray, den: np.ndarray, n_boot: int = 1000, seed: int = 0,
                    level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of sum(num) / sum(den) when the rows (clusters: compounds) are resampled with
    replacement. `num` is (clusters,) or (clusters, m) for m statistics resampled together; `den` is
    (clusters,). Returns (lo, hi), each of shape (m,) (or scalars); NaN with fewer than two clusters."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    flat = num.ndim == 1
    num2 = num[:, None] if flat else num
    if len(den) < 2:
        nan = np.full(num2.shape[1], np.nan)
        return (nan[0], nan[0]) if flat else (nan, nan)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(den), np.full(len(den), 1.0 / len(den)), size=n_boot).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        boots = (weights @ num2) / (weights @ den)[:, None]
    alpha = (1.0 - level) / 2
    lo, hi = np.nanquantile(boots, alpha, axis=0), np.nanquantile(boots, 1 - alpha, axis=0)
    return (lo[0], hi[0]) if flat else (lo, hi)


def topk_curves(per_query: pd.DataFrame, modes: Sequence[str] = ("nsb", "nss"), ks: Sequence[int] = range(1, 11),
                group_col: str = schema.JCP, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Top-k hit rate per mode and k with a bootstrap interval over compounds and the chance level.

    `per_query`: `topk_hit_rate(..., per_query=True)`'s second frame. Only eligible queries count (as
    in the hit rate). The interval resamples compounds (`group_col`) with replacement, a compound's
    queries together (its replicate wells are not independent). Chance: the mean over the queries of
    the hit probability of a uniformly random ranking of their candidates (`expected_hit_rate`).
    Columns: mode, k, value, lo, hi, chance, n_queries, n_compounds.
    """
    from micon.eval.retrieval import expected_hit_rate

    ks = sorted(int(k) for k in ks)
    rows = []
    for mode in modes:
        need = [f"{mode}_{c}" for c in ("eligible", "first_hit", "n_candidates", "n_positives")]
        missing = [c for c in need + [group_col] if c not in per_query.columns]
        if missing:
            raise KeyError(f"topk_curves: per-query frame lacks {missing}; pass per_query=True to topk_hit_rate")
        q = per_query[per_query[f"{mode}_eligible"].to_numpy(bool)]
        fh = q[f"{mode}_first_hit"].to_numpy()
        hits = ((fh[:, None] >= 1) & (fh[:, None] <= np.asarray(ks)[None, :])).astype(np.float64)
        codes, _ = pd.factorize(q[group_col])
        n_c = int(codes.max()) + 1 if len(codes) else 0
        per_c = np.zeros((n_c, len(ks)))
        np.add.at(per_c, codes, hits)
        n_per_c = np.bincount(codes, minlength=n_c).astype(np.float64)
        lo, hi = bootstrap_ratio(per_c, n_per_c, n_boot=n_boot, seed=seed)
        n_cand = q[f"{mode}_n_candidates"].to_numpy()
        n_pos = q[f"{mode}_n_positives"].to_numpy()
        for j, k in enumerate(ks):
            value = hits[:, j].mean() if len(q) else np.nan
            chance = expected_hit_rate(n_cand, n_pos, k).mean() if len(q) else np.nan
            rows.append(dict(mode=mode, k=k, value=value, lo=float(np.clip(lo[j], 0, 1)),
                             hi=float(np.clip(hi[j], 0, 1)), chance=float(chance), n_queries=len(q),
                             n_compounds=n_c))
    return pd.DataFrame(rows)


def map_intervals(ap: pd.DataFrame, maps: pd.DataFrame, group_col: str = schema.JCP, threshold: float = 0.05,
                  n_boot: int = 1000, seed: int = 0) -> dict:
    """mAP and fraction retrieved with bootstrap intervals over compounds and their chance levels.

    `ap`, `maps`: `phenotypic_activity`'s per-well AP frame and per-compound mAP frame. mAP's chance is
    the mean over compounds of the expected AP of a random ranking of each well's pairs (about the
    share of positives among them); the fraction retrieved's chance is the test's level, `threshold`.
    Keys: map_activity{,_lo,_hi,_chance}, fraction_retrieved{,_lo,_hi,_chance}.
    """
    from micon.eval.map import chance_map

    m = maps["mean_average_precision"].to_numpy(np.float64)
    hit = (maps["corrected_p_value"].to_numpy(np.float64) < threshold).astype(np.float64)
    ones = np.ones(len(m))
    lo, hi = bootstrap_ratio(np.c_[m, hit], ones, n_boot=n_boot, seed=seed) if len(m) else ([np.nan] * 2,) * 2
    per_group = chance_map(ap, group_col)
    chance = per_group.mean() if len(per_group) else np.nan
    clip = lambda v: float(np.clip(v, 0, 1))  # noqa: E731
    return dict(map_activity=float(m.mean()) if len(m) else np.nan, map_activity_lo=clip(lo[0]),
                map_activity_hi=clip(hi[0]), map_activity_chance=float(chance),
                fraction_retrieved=float(hit.mean()) if len(m) else np.nan, fraction_retrieved_lo=clip(lo[1]),
                fraction_retrieved_hi=clip(hi[1]), fraction_retrieved_chance=float(threshold))


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------

def plot_topk_curves(curves: pd.DataFrame, path, modes: Sequence[str] = ("nsb", "nss"),
                     method_col: str = "method") -> Path:
    """Hit rate against k, one panel per mode, one line per method with its interval band, and the
    chance level of a random ranking (dashed). `curves`: `topk_curves` frames stacked with a `method`
    column (columns mode, k, value, lo, hi, chance)."""
    need = {"mode", "k", "value", "lo", "hi", "chance"}
    if not need <= set(curves.columns):
        raise ValueError(f"plot_topk_curves: curves lack {sorted(need - set(curves.columns))}; build them with "
                         f"topk_curves")
    modes = [m for m in modes if m in set(curves["mode"])]
    if not modes:
        raise ValueError(f"plot_topk_curves: no curve of modes {list(modes)}; the frame has {sorted(set(curves['mode']))}")
    n_cols = min(2, len(modes))
    n_rows = -(-len(modes) // n_cols)
    fig = Figure(figsize=(4.8 * n_cols, 3.7 * n_rows))
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax in axes[len(modes):]:
        ax.set_visible(False)
    methods = list(dict.fromkeys(curves[method_col])) if method_col in curves.columns else [None]
    for ax, mode in zip(axes, modes):
        top = 0.0
        chances = []
        for i, method in enumerate(methods):
            rows = curves[curves["mode"] == mode]
            rows = (rows if method is None else rows[rows[method_col] == method]).sort_values("k")
            if not len(rows):
                continue
            k = rows["k"].to_numpy()
            ax.plot(k, 100 * rows["value"], marker="o", ms=3, color=f"C{i % 10}", label=str(method))
            ax.fill_between(k, 100 * np.clip(rows["lo"], 0, 1), 100 * np.clip(rows["hi"], 0, 1),
                            color=f"C{i % 10}", alpha=0.15, linewidth=0)
            chances.append(rows["chance"].to_numpy())
            top = max(top, _finite_max(rows["hi"]), _finite_max(rows["value"]))
        if chances:
            # the methods share their wells, so one chance line; methods evaluated on other wells get their own
            same = all(len(c) == len(chances[0]) and np.allclose(c, chances[0], atol=5e-3) for c in chances)
            for i, c in enumerate(chances[:1] if same else chances):
                ax.plot(k[:len(c)], 100 * c, ls="--", lw=1, color="0.3" if same else f"C{i % 10}",
                        label="chance (random ranking)" if i == 0 else None)
                top = max(top, _finite_max(c))
        ax.set_ylim(0, min(100, 100 * top * 1.15 + 1))
        ax.set_xlim(0.5, curves["k"].max() + 0.5)
        ax.set_xlabel("k (nearest wells considered)")
        ax.set_ylabel("queries with a replicate in the top k (%)")
        ax.set_title(_LABELS.get(mode, mode), fontsize=10)
        ax.grid(alpha=0.3)
    axes[len(modes) - 1].legend(fontsize=7, loc="upper left")
    fig.text(0.01, -0.02, f"bands: {LEVEL:.0%} bootstrap interval over compounds; dashed: expected hit rate of a "
                          f"random ranking of each query's candidates", fontsize=7, ha="left", va="top")
    fig.tight_layout()
    return _save(fig, path)


_TITLES = {"map_activity": "mAP of activity (replicates vs their plates' DMSO)",
           "fraction_retrieved": "fraction retrieved (compounds with BH-corrected p < 0.05)",
           "map_consistency": "mAP of consistency (replicates vs other compounds)",
           "map_activity_over_null": "mAP of activity over the DMSO null"}
# what each column's `{column}_chance` level means, as the legend says it
_CHANCE_LABELS = {"fraction_retrieved": "BH level 0.05 (what inactive compounds reach at most)"}
# a second reference level drawn per method: column -> (its column, label)
_REFERENCES = {"map_activity": ("map_activity_null", "DMSO null: what a compound without effect reaches")}


def _caption(text: str, width_in: float) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width=max(40, int(width_in * 17))))


def plot_map_summary(frame: pd.DataFrame, path, method_col: str = "method",
                     columns: Sequence[str] = ("map_activity", "fraction_retrieved")) -> Path:
    """Bar charts per method, one panel per summary column (at most two panels a row, readable where the
    report embeds them), with `{column}_lo` / `{column}_hi` as the interval (clipped to [0, 1]),
    `{column}_chance` as the chance level, and for mAP of activity each method's DMSO null when present.

    A missing summary column is an error, never a panel silently left out."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"plot_map_summary: frame lacks the summary column(s) {missing}; it has {list(frame.columns)}")
    n_cols = min(2, len(columns))
    n_rows = -(-len(columns) // n_cols)
    width = max(5.0, 0.7 * len(frame) + 2.6) * n_cols
    fig = Figure(figsize=(width, 3.9 * n_rows + 0.9))
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax in axes[len(columns):]:
        ax.set_visible(False)
    labels = frame[method_col].astype(str).tolist()
    x = np.arange(len(labels))
    for ax, col in zip(axes, columns):
        value = frame[col].to_numpy(dtype=float)
        signed = col in SIGNED           # a difference: its range is [-1, 1], its reference 0
        floor = -1.0 if signed else 0.0
        top = _finite_max(value)
        bottom = min(0.0, -_finite_max(-value)) if signed else 0.0
        yerr = None
        if f"{col}_lo" in frame.columns and f"{col}_hi" in frame.columns:
            lo = np.clip(frame[f"{col}_lo"].to_numpy(dtype=float), floor, 1)
            hi = np.clip(frame[f"{col}_hi"].to_numpy(dtype=float), floor, 1)
            yerr = np.nan_to_num(np.vstack([np.maximum(value - lo, 0), np.maximum(hi - value, 0)]))
            top = max(top, _finite_max(hi))
            bottom = min(bottom, -_finite_max(-lo)) if signed else 0.0
        ax.bar(x, value, yerr=yerr, capsize=4, color=[f"C{i % 10}" for i in range(len(labels))], alpha=0.85)
        if signed:
            ax.axhline(0, color="0.2", ls="--", lw=1.2, label=SIGNED[col])
        elif f"{col}_chance" in frame.columns:
            chance = frame[f"{col}_chance"].to_numpy(dtype=float)
            for i, c in enumerate(chance):
                if np.isfinite(c):
                    ax.hlines(c, i - 0.45, i + 0.45, colors="0.2", linestyles="--", lw=1.2,
                              label=_CHANCE_LABELS.get(col, "chance (random ranking)") if i == 0 else None)
                    top = max(top, float(c))
        ref_col, ref_label = _REFERENCES.get(col, (None, None))
        if ref_col in frame.columns:
            ref = frame[ref_col].to_numpy(dtype=float)
            for i, c in enumerate(ref):
                if np.isfinite(c):
                    ax.hlines(c, i - 0.45, i + 0.45, colors="C3", linestyles=":", lw=2.0,
                              label=ref_label if i == 0 else None)
                    top = max(top, float(c))
            if f"{col}_over_null" in frame.columns:     # the compounds under the null's own fit, beside it
                same_fit = ref + frame[f"{col}_over_null"].to_numpy(dtype=float)
                ok = np.isfinite(same_fit)
                ax.scatter(x[ok], same_fit[ok], marker="D", s=28, color="C3", edgecolors="black", linewidths=0.6,
                           zorder=5, label="compounds under the null's fit (half the DMSO)")
                top = max(top, _finite_max(same_fit))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left", framealpha=0.9)
        ceiling = value if yerr is None else value + yerr[1]
        for i, (v, c) in enumerate(zip(value, ceiling)):
            ax.text(i, (c if np.isfinite(c) else 0) + 0.01 * max(top, 0.05), f"{v:.3f}" if np.isfinite(v) else "n/a",
                    ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=9)
        span = max(top - bottom, 0.05)
        ax.set_ylim(bottom - (0.1 * span if signed and bottom < 0 else 0), min(1.0, top + 0.35 * span + 0.02))
        ax.set_ylabel(_YLABELS.get(col, col.replace("_", " ")), fontsize=9)
        ax.set_title(_TITLES.get(col, col.replace("_", " ")), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    caption = (f"Error bars: {LEVEL:.0%} bootstrap interval over compounds. Dashed: the chance level (mAP: the "
               f"expected AP of a random ranking; fraction retrieved: the test's level, 0.05)."
               + (" Dotted: each method's DMSO null, the mAP that pseudo-compounds made of half of each plate's "
                  "DMSO wells reach when the profiles are fitted on the other half; diamonds: the compounds' mAP "
                  "under that same fit. Read activity as the diamond's height over the dotted line (the fit on "
                  "DMSO moves a compound without effect away from the random-ranking chance)."
                  if "map_activity_null" in frame.columns else "")
               + (" mAP of activity over the DMSO null: the compounds' mAP minus that null (0: no better than a "
                  "compound without effect)." if any(c in SIGNED for c in columns) else ""))
    fig.tight_layout(rect=(0, 0.9 / (3.9 * n_rows + 0.9), 1, 1))
    fig.text(0.01, 0.01, _caption(caption, width), fontsize=8, ha="left", va="bottom")
    return _save(fig, path)


def pca(feats: np.ndarray, n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """First `n` principal-component scores of the centred data (NumPy SVD) and the share of the total
    variance each explains: ((rows, n), (n,)); columns past the data's rank are zero."""
    x = np.asarray(feats, dtype=np.float64)
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    scores = x @ vt[:n].T
    total = float((s ** 2).sum())
    ratio = (s[:n] ** 2) / total if total > 0 else np.zeros(min(n, len(s)))
    pad = n - scores.shape[1]
    return (np.pad(scores, ((0, 0), (0, pad))), np.pad(ratio, (0, pad))) if pad > 0 else (scores, ratio)


def pca_2d(feats: np.ndarray) -> np.ndarray:
    """First two principal-component scores (centred data, NumPy SVD); (n, 2)."""
    return pca(feats, 2)[0]


def robust_limits(values: np.ndarray, q: tuple[float, float] = (5, 95), margin: float = 0.5) -> tuple[float, float]:
    """Axis limits from the `q` percentiles widened by `margin` of their span on each side (for normal data
    about +-3.3 sd, 0.1% of points outside), so that outlying wells, even a few percent of them (whitened
    profiles are heavy-tailed), do not squash every other point; the caller counts those left outside."""
    lo, hi = np.percentile(np.asarray(values, dtype=np.float64), q)
    span = hi - lo if hi > lo else max(abs(hi), 1.0)
    return float(lo - margin * span), float(hi + margin * span)


def plot_profiles_pca(meta: pd.DataFrame, before: np.ndarray, after: np.ndarray, path,
                      color_by: str = schema.SOURCE, titles: Sequence[str] = ("before normalisation",
                                                                               "after normalisation"),
                      standardize_before: bool = True) -> Path:
    """Two PCA scatter panels of the same wells (before / after), coloured by `color_by` (the source, drawn
    in a shuffled order so that none hides the others), DMSO wells marked with a black x.

    Axis labels give each PC's share of the variance; limits are robust (`robust_limits`: the 5th-95th
    percentiles with a margin) and the title counts the wells outside them. With `standardize_before`, the raw features are
    z-scored over the wells first (raw features have different units; otherwise the largest-scaled
    feature alone would make PC1)."""
    if len(meta) != len(before) or len(meta) != len(after):
        raise ValueError(f"plot_profiles_pca: {len(meta)} metadata rows but {len(before)} / {len(after)} profiles")
    from micon.eval.profiles import negcon_mask

    groups = meta[color_by].astype(str).to_numpy()
    neg = negcon_mask(meta) if (schema.ROLE in meta.columns or schema.JCP in meta.columns) else np.zeros(len(meta), bool)
    fig = Figure(figsize=(10, 4.4))
    axes = fig.subplots(1, 2)
    raw = np.asarray(before, dtype=np.float64)
    if standardize_before:
        sd = raw.std(axis=0)
        raw = (raw - raw.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    for ax, feats, title in zip(axes, (raw, after), titles):
        xy, ratio = pca(feats, 2)
        (x0, x1), (y0, y1) = robust_limits(xy[:, 0]), robust_limits(xy[:, 1])
        outside = int(((xy[:, 0] < x0) | (xy[:, 0] > x1) | (xy[:, 1] < y0) | (xy[:, 1] > y1)).sum())
        # one scatter call in a shuffled order, so no source is drawn over all the others
        names = sorted(set(groups))
        colour = {g: f"C{i % 10}" for i, g in enumerate(names)}
        order = np.random.default_rng(0).permutation(len(xy))
        ax.scatter(xy[order, 0], xy[order, 1], s=7, alpha=0.6, c=[colour[g] for g in groups[order]], linewidths=0)
        for g in names:         # legend entries only
            ax.scatter([], [], s=7, color=colour[g], label=f"{g} ({int((groups == g).sum())})")
        if neg.any():
            ax.scatter(xy[neg, 0], xy[neg, 1], s=14, marker="x", color="black", linewidths=0.7,
                       label=f"DMSO ({int(neg.sum())})")
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_title(f"{title}\n{len(xy)} wells" + (f", {outside} outside the view (robust limits)" if outside else ""),
                     fontsize=9)
        ax.set_xlabel(f"PC1 ({100 * ratio[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * ratio[1]:.1f}% of variance)")
        ax.grid(alpha=0.2)
    axes[-1].legend(fontsize=7, markerscale=2, title=color_by.replace("Metadata_", "") + " (wells)",
                    title_fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path)
