"""PNG figures of an evaluation: top-k curves (NSB, NSS), mAP / fraction-retrieved bars per method, and a
2-D PCA of well profiles coloured by source before and after normalisation.

Each function takes frames (or arrays) and an output path and writes one PNG; this is the only module
of `micon.eval` that writes files. It uses matplotlib's object API with the Agg canvas, so it never
touches pyplot's global state or needs a display.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from micon import schema

__all__ = ["pca_2d", "plot_topk_curves", "plot_map_summary", "plot_profiles_pca"]

_LABELS = {"nsb": "NSB (other batch)", "nss": "NSS (other source)", "nsp": "NSP (other plate)"}


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def pca_2d(feats: np.ndarray) -> np.ndarray:
    """First two principal-component scores (centred data, NumPy SVD); (n, 2)."""
    x = np.asarray(feats, dtype=np.float64)
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    scores = x @ vt[:2].T
    return np.pad(scores, ((0, 0), (0, 2 - scores.shape[1]))) if scores.shape[1] < 2 else scores


def plot_topk_curves(frame: pd.DataFrame, path, metrics: Sequence[str] = ("nsb", "nss"),
                     method_col: str = "method") -> Path:
    """Hit rate against k, one panel per metric, one line per method.

    `frame`: `topk_hit_rate` outputs stacked with a `method` column (columns k, nsb, nss, ...).
    """
    metrics = [m for m in metrics if m in frame.columns]
    if not metrics:
        raise ValueError(f"plot_topk_curves: frame has none of the metric columns; it has {list(frame.columns)}")
    fig = Figure(figsize=(4.2 * len(metrics), 3.6))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    methods = frame[method_col].unique() if method_col in frame.columns else [None]
    for ax, metric in zip(axes, metrics):
        for method in methods:
            rows = frame if method is None else frame[frame[method_col] == method]
            rows = rows.sort_values("k")
            ax.plot(rows["k"], 100 * rows[metric], marker="o", ms=3, label=str(method))
        ax.set_xlabel("k")
        ax.set_ylabel("top-k hit rate (%)")
        ax.set_title(_LABELS.get(metric, metric))
        ax.grid(alpha=0.3)
    if methods[0] is not None:
        axes[-1].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_map_summary(frame: pd.DataFrame, path, method_col: str = "method",
                     columns: Sequence[str] = ("mean_average_precision", "fraction_retrieved")) -> Path:
    """Bar charts per method: one panel per summary column (e.g. mean mAP and fraction retrieved)."""
    columns = [c for c in columns if c in frame.columns]
    if not columns:
        raise ValueError(f"plot_map_summary: frame lacks the summary columns; it has {list(frame.columns)}")
    fig = Figure(figsize=(4.2 * len(columns), 3.6))
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    labels = frame[method_col].astype(str).tolist()
    for ax, col in zip(axes, columns):
        ax.bar(labels, frame[col].to_numpy(), color=[f"C{i}" for i in range(len(labels))])
        ax.set_title(col.replace("_", " "))
        ax.set_ylim(0, max(1.0, float(np.nanmax(frame[col].to_numpy(dtype=float), initial=0))))
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_profiles_pca(meta: pd.DataFrame, before: np.ndarray, after: np.ndarray, path,
                      color_by: str = schema.SOURCE, titles: Sequence[str] = ("before normalisation",
                                                                               "after normalisation")) -> Path:
    """Two PCA scatter panels of the same wells (before / after), coloured by `color_by` (the source)."""
    if len(meta) != len(before) or len(meta) != len(after):
        raise ValueError(f"plot_profiles_pca: {len(meta)} metadata rows but {len(before)} / {len(after)} profiles")
    groups = meta[color_by].astype(str).to_numpy()
    fig = Figure(figsize=(9, 4))
    axes = fig.subplots(1, 2)
    for ax, feats, title in zip(axes, (before, after), titles):
        xy = pca_2d(feats)
        for i, g in enumerate(sorted(set(groups))):
            sel = groups == g
            ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.6, color=f"C{i % 10}", label=g)
        ax.set_title(title)
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
    axes[-1].legend(fontsize=7, markerscale=2, title=color_by.replace("Metadata_", ""))
    fig.tight_layout()
    return _save(fig, path)
