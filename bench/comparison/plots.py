"""The comparison's pictures: bars per method, metric and split; loss against chance; retrieval against
training step; fit beside transfer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .design import SPLITS, SUBJECT, of_subject


YLABELS = {"nsb_top1": "NSB top-1 hit rate", "nsb_top10": "NSB top-10 hit rate", "nss_top1": "NSS top-1 hit rate",
           "nss_top10": "NSS top-10 hit rate", "map_activity": "mAP, activity vs DMSO",
           "map_consistency": "mAP, vs other compounds", "fraction_retrieved": "fraction retrieved",
           "source_knn": "source kNN accuracy\n(lower = less batch effect)"}


def plot(summary: pd.DataFrame, path: Path, subject: str = SUBJECT,
         metrics=("nsb_top10", "nss_top10", "map_activity", "source_knn")) -> None:
    """One bar per method, per metric (rows) and split (columns): the mean over seeds with its 95%
    t-interval (one seed: the bootstrap over compounds, when stored), clipped to the metric's range
    [0, 1], and the chance level (dashed) where the summary has one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    methods = list(dict.fromkeys(summary.method))
    fig, axes = plt.subplots(len(metrics), len(SPLITS), figsize=(4.4 * len(SPLITS), 2.9 * len(metrics)),
                             squeeze=False)
    colour = lambda m: method_colour(m, subject)  # noqa: E731
    no_interval = False
    for i, metric in enumerate(metrics):
        for j, split in enumerate(SPLITS):
            ax = axes[i, j]
            sub = summary[(summary.metric == metric) & (summary.split == split)].set_index("method")
            sub = sub.reindex([m for m in methods if m in sub.index])
            mean = sub["mean"].to_numpy(float)
            one = sub.seeds.to_numpy() == 1     # one seed: its bootstrap-over-compounds interval instead
            lo = np.clip(np.where(one, sub.boot_lo, sub.ci_lo).astype(float), 0, 1)
            hi = np.clip(np.where(one, sub.boot_hi, sub.ci_hi).astype(float), 0, 1)
            missing = ~(np.isfinite(lo) & np.isfinite(hi))
            no_interval |= bool(missing.any())
            x = np.arange(len(sub))
            ax.bar(x, mean, color=[colour(m) for m in sub.index], hatch=[".." if gone else None for gone in missing],
                   edgecolor="white", linewidth=0, alpha=0.85)
            has = ~missing
            ax.errorbar(x[has], mean[has], yerr=np.vstack([np.maximum(mean - lo, 0), np.maximum(hi - mean, 0)])[:, has],
                        fmt="none", ecolor="black", capsize=3, lw=1)
            top = float(np.nanmax(np.r_[mean, hi[has], 0]))
            if "chance" in sub.columns and np.isfinite(sub["chance"].to_numpy(float)).any():
                c = float(np.nanmean(sub["chance"].to_numpy(float)))
                ax.axhline(c, color="0.15", ls="--", lw=1)
                top = max(top, c)
            ax.set_ylim(0, min(1.04, 1.15 * top + 0.005) if top > 0 else 1.0)   # room for a cap at 1
            ax.set_xticks(x, sub.index, rotation=30, ha="right", fontsize=7)
            ax.set_title(f"{metric} - {split}", fontsize=9)
            ax.set_ylabel(YLABELS.get(metric, metric), fontsize=8)
            ax.set_xlabel("method", fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
            ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color="#c0392b", label=f"{subject} and its variants"), Patch(color="#2980b9", label="other learned"),
               Patch(color="#7f8c8d", label="CellProfiler-grade"),
               *[Patch(color=colour(m), label=lab) for m, lab in (("untrained", "untrained (the floor)"),
                                                               ("oracle", "oracle (the ceiling)")) if m in methods],
               plt.Line2D([], [], color="0.15", ls="--", lw=1, label="chance (random ranking; source kNN: largest source)")]
    if no_interval:
        handles.append(Patch(facecolor="#7f8c8d", hatch="..", edgecolor="white", label="one seed, no interval stored"))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 4), fontsize=8, bbox_to_anchor=(0.5, 0.975),
               frameon=False)
    fig.suptitle("Calibrated screen: mean over seeds with 95% t-interval (one seed: bootstrap over compounds"
                 + ("; hatched: none stored" if no_interval else "") + "), clipped to [0, 1]", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


REFERENCE_COLOURS = {"cellprofiler": "#7f8c8d", "untrained": "#d5b895", "oracle": "#27ae60"}  # baseline, floor, ceiling


def method_colour(method: str, subject: str = SUBJECT) -> str:
    """A method's colour in every plot: the subject and its variants red, the references their own, others blue."""
    return "#c0392b" if of_subject(method, subject) else REFERENCE_COLOURS.get(method, "#2980b9")


def plot_curves(curves: dict[str, pd.DataFrame], path: Path, title: str, window: int = 15) -> None:
    """Loss / chance against step (a running mean over `window` steps, raw values faint), one line per run;
    1 = chance (dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.4))
    for i, (name, c) in enumerate(curves.items()):
        col = plt.cm.tab10(i % 10)
        ax.plot(c.step, c.ratio, color=col, alpha=0.15, lw=0.8)
        ax.plot(c.step, c.ratio.rolling(window, min_periods=1).mean(), color=col, lw=1.6, label=name)
    ax.axhline(1.0, color="0.15", ls="--", lw=1, label="chance (an encoder that tells nothing apart)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss / chance-level loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_learning_curves(out: Path, names: list[str], path: Path, metric: str = "nsb_top10",
                         refs: tuple[str, ...] = ("cellprofiler", "oracle")) -> None:
    """`metric` against step per query set, one line per run (OUT/curves/NAME.json) with its bootstrap band;
    the same network untrained is step 0; reference rows (OUT/curves/refs.json) and chance are horizontal."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = ["training", *SPLITS]
    runs = {n: json.loads((out / "curves" / f"{n}.json").read_text()) for n in names}
    ref_path = out / "curves" / "refs.json"
    ref = json.loads(ref_path.read_text()) if ref_path.is_file() else {}
    fig, axes = plt.subplots(1, len(splits) + 1, figsize=(4.2 * (len(splits) + 1), 3.8))
    for ax, split in zip(axes, splits):
        for i, (n, r) in enumerate(runs.items()):
            steps = sorted(int(s) for s in r["scores"])
            pts = [r["scores"][str(s)].get(split, {}) for s in steps]
            m = np.array([p.get(metric, np.nan) for p in pts], float)
            lo = np.array([p.get(metric + "_boot", (np.nan, np.nan))[0] for p in pts], float)
            hi = np.array([p.get(metric + "_boot", (np.nan, np.nan))[1] for p in pts], float)
            col = plt.cm.tab10(i % 10)
            ax.plot(steps, m, "o-", color=col, ms=3, lw=1.3, label=n)
            ax.fill_between(steps, lo, hi, color=col, alpha=0.15)
        for j, rn in enumerate(refs):
            v = ref.get(rn, {}).get(split, {}).get(metric)
            if v is not None:
                ax.axhline(v, color=("0.3", "tab:purple", "tab:brown")[j % 3], lw=1.2, ls="-.", label=rn)
        ch = [r["scores"][s].get(split, {}).get(metric + "_chance") for r in runs.values() for s in r["scores"]]
        ch = [c for c in ch if c is not None]
        if ch:
            ax.axhline(float(np.mean(ch)), color="0.15", ls="--", lw=1, label="chance")
        ax.set_title(split, fontsize=9)
        ax.set_xlabel("optimizer step (0 = untrained)", fontsize=8)
        ax.set_ylabel(YLABELS.get(metric, metric), fontsize=8)
        ax.set_ylim(0, None)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    for i, (n, r) in enumerate(runs.items()):
        if "curve" in r:
            c = pd.DataFrame(r["curve"])
            ax.plot(c.step, c.ratio.rolling(25, min_periods=1).mean(), color=plt.cm.tab10(i % 10), lw=1.3, label=n)
    ax.axhline(1.0, color="0.15", ls="--", lw=1)
    ax.set_title("training loss / chance (running mean of 25 logs)", fontsize=9)
    ax.set_xlabel("optimizer step", fontsize=8)
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    ax.legend(handles, labels, fontsize=7, loc="upper right", bbox_to_anchor=(1.0, 0.95))
    fig.suptitle(f"{metric} against training step; bands: 95% bootstrap over compounds", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fit_transfer(res: dict, path: Path, title: str, metrics=("nsb_top10", "nss_top10")) -> None:
    """NSB/NSS top-10 per run on the training split (fit) and the held-out splits (transfer), with the bootstrap
    interval over compounds and the chance level (dashed tick)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = ["training", *SPLITS]
    labels = list(res)
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 3.8), squeeze=False)
    width = 0.8 / len(labels)
    for ax, metric in zip(axes[0], metrics):
        for i, lb in enumerate(labels):
            sc = res[lb]["scores"]
            x = np.arange(len(splits)) + (i - (len(labels) - 1) / 2) * width
            m = np.array([sc.get(s, {}).get(metric, np.nan) for s in splits], float)
            lo = np.array([sc.get(s, {}).get(metric + "_boot", (np.nan, np.nan))[0] for s in splits], float)
            hi = np.array([sc.get(s, {}).get(metric + "_boot", (np.nan, np.nan))[1] for s in splits], float)
            ax.bar(x, m, width, label=lb, color=plt.cm.tab10(i))
            ax.errorbar(x, m, yerr=np.vstack([np.clip(m - lo, 0, None), np.clip(hi - m, 0, None)]), fmt="none",
                        ecolor="black", capsize=2, lw=0.8)
            ch = np.array([sc.get(s, {}).get(metric + "_chance", np.nan) for s in splits], float)
            ax.hlines(ch, x - width / 2, x + width / 2, colors="0.15", linestyles="--", lw=1)
        ax.set_xticks(np.arange(len(splits)), splits, fontsize=8)
        ax.set_ylabel(YLABELS.get(metric, metric), fontsize=8)
        ax.set_xlabel("query set (training = training compounds in training plates)", fontsize=8)
        ax.set_ylim(0, None)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"{metric}; bars 95% bootstrap over compounds; dashed: chance", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
