"""The verdict in plain sentences: the subject against its best rival, the untrained network and the ceiling,
a difference only where the 95% intervals part; and the gain of each run over its own starting point, paired
by seed."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .design import NEEDS_RUNS, REFERENCES, SPLITS, STARTS_FROM, SUBJECT, of_subject, variant
from .scoring import interval, t_half


def verdict(summary: pd.DataFrame, subject: str = SUBJECT,
            metrics=("nsb_top10", "nss_top10", "map_activity", "map_consistency")) -> list[str]:
    """Plain sentences: per split and metric, the subject against the best other method (learned or the
    CellProfiler-grade baseline) and against the same network untrained, with the ceiling (oracle) beside
    them; a difference only when the 95% intervals (t over seeds; bootstrap for one seed) do not overlap.
    The subject's own variants (ablations) are not its rivals. Last, which learned methods clear the untrained
    network on held-out compounds (NSB top-10)."""
    lines = []
    methods = list(dict.fromkeys(summary.method))
    rivals = [m for m in methods if not of_subject(m, subject) and m not in REFERENCES]

    def compare(sub: pd.DataFrame, a: str, b: str) -> str:
        (a_lo, a_hi), (b_lo, b_hi) = interval(sub, a), interval(sub, b)
        if a_lo > b_hi:
            return "better than"
        if a_hi < b_lo:
            return "worse than"
        return "not distinguishable from"

    for split in SPLITS:
        parts = []
        for metric in metrics:
            sub = summary[(summary.split == split) & (summary.metric == metric)].set_index("method")
            if subject not in sub.index or not rivals:
                continue
            best = sub.loc[[r for r in rivals if r in sub.index], "mean"].idxmax()
            text = (f"{metric} {sub.loc[subject, 'mean']:.3f} vs {best} {sub.loc[best, 'mean']:.3f}: "
                    f"{compare(sub, subject, best)}")
            if "untrained" in sub.index:
                text += f", vs untrained {sub.loc['untrained', 'mean']:.3f}: {compare(sub, subject, 'untrained')}"
            if "oracle" in sub.index:
                text += f" (ceiling {sub.loc['oracle', 'mean']:.3f})"
            parts.append(text)
        if parts:
            lines.append(f"- **{split}**: {subject} " + "; ".join(parts) + ".")
    sub = summary[(summary.split == "heldout_compounds") & (summary.metric == "nsb_top10")].set_index("method")
    if "untrained" in sub.index:
        u_lo, u_hi = interval(sub, "untrained")
        learned = {m: interval(sub, m) for m in sub.index
                   if m not in REFERENCES and m != "cellprofiler" and sub.loc[m, "seeds"] >= 3}
        clear = [f"{m} ({sub.loc[m, 'mean']:.3f} [{lo:.3f}, {hi:.3f}], {int(sub.loc[m, 'seeds'])} seeds)"
                 for m, (lo, hi) in learned.items() if lo > u_hi]
        lines.append(f"- **Does training pay?** On held-out compounds the untrained network's NSB top-10 is "
                     f"{sub.loc['untrained', 'mean']:.3f} [{u_lo:.3f}, {u_hi:.3f}]. Learned "
                     f"methods (3+ seeds) whose interval lies wholly above it: "
                     + (", ".join(clear) if clear else "none") + ".")
        lines.append("- **The same, paired by seed** (each run against its own starting point: every method's "
                     "image encoder starts from the same weights for a seed, a variant that starts from another "
                     "run against that run), NSB top-10 gain on each split, mean "
                     "[95% t-interval]: " + "; ".join(paired_gains(summary, subject=subject)) + ".")
    return lines


def starting_point(method: str, subject: str = SUBJECT) -> str:
    """The run a method's network starts from, seed by seed: the untrained network, or for a variant that
    starts from another method's run (NEEDS_RUNS) that method (simclr_init: simclr)."""
    for name in NEEDS_RUNS:
        if method == variant(subject, name):
            return STARTS_FROM[name]
    return "untrained"


def paired_gains(summary: pd.DataFrame, metric: str = "nsb_top10", subject: str = SUBJECT) -> list[str]:
    """Per learned method and split: the mean gain over its starting point of the same seed (the untrained
    network; for simclr_init the SimCLR run it starts from), with its 95% t-interval over seeds (the
    summary's `values` are in seed order)."""
    out = []
    for method in dict.fromkeys(summary.method):
        if method in REFERENCES or method == "cellprofiler":
            continue
        base = starting_point(method, subject)
        parts, seeds = [], 0
        for split in SPLITS:
            rows = summary[(summary.split == split) & (summary.metric == metric)].set_index("method")
            if method not in rows.index or base not in rows.index:
                continue
            a = [float(v) for v in str(rows.loc[method, "values"]).split()]
            b = [float(v) for v in str(rows.loc[base, "values"]).split()]
            d = np.subtract(a[:len(b)], b[:len(a)])
            if len(d) < 3:
                continue
            half = t_half(d)
            mark = " (above 0)" if d.mean() - half > 0 else " (below 0)" if d.mean() + half < 0 else ""
            parts.append(f"{split.removeprefix('heldout_')} {d.mean():+.3f} [{d.mean() - half:+.3f}, "
                         f"{d.mean() + half:+.3f}]{mark}")
            seeds = max(seeds, len(d))
        if parts:
            out.append(f"{method} ({seeds} seeds{'' if base == 'untrained' else ', against ' + base}): "
                       + ", ".join(parts))
    return out
