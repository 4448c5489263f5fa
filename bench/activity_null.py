"""Why mAP of activity falls to the random-ranking chance after training: a DMSO null and the screen's truth.

    python bench/activity_null.py [--out runs/c200] [--seeds 0 1 ... 9] [--docs]

Part 1, a screen with no effect at all (Gaussian wells: per-plate offsets, 8 plates x 16 DMSO wells, 40
compounds on every plate): the profiling recipe's mAP of activity (copairs: replicates against same-plate
DMSO) minus the random-ranking chance, per feature count and per step of the recipe (none, per-plate MAD
against DMSO, ZCA-cor fitted on DMSO, both). Any value away from 0 is the recipe's, not the data's.

Part 2, the comparison's screen (bench/science.py's OUT, its stored embeddings; nothing is trained): per
method and seed, the held-out compounds' mAP of activity as the comparison computes it, split by the
screen's truth (active: magnitude > 0), the DMSO null (`micon.eval.activity.negcon_null`: half of each
plate's DMSO wells become pseudo-compounds of a compound's replicate count, each well on another plate, and
the profiles are fitted on the other half, so an inactive
compound and a pseudo-compound are exchangeable), each compound's mAP under that fit minus the null, and
the ROC AUC of a compound's mAP for its truth (does the score rank the active compounds first?). Held-out
compounds only: the learned methods trained on the training compounds the activity call found.
Part 3, the cost: CPU seconds of the recipe and of the null on no-effect screens of 8k to 81k wells.
Writes docs/results/ACTIVITY.md and docs/results/activity_null.png with --docs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._report import command, machine, markdown_table, write_section  # noqa: E402
from bench.comparison.plots import method_colour  # noqa: E402
from bench.comparison.scoring import t_half  # noqa: E402
from micon import schema  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("micon", "paclr", "clip", "simclr", "untrained")
SINGLE = ("cellprofiler", "oracle")
STEPS = {"none": (False, False), "MAD": (True, False), "ZCA": (False, True), "MAD + ZCA": (True, True)}


def no_effect_screen(seed: int, d: int, n_plates: int = 8, n_dmso: int = 16, n_compounds: int = 40,
                     plate_sd: float = 0.5, n_active: int = 0, shift: float = 0.0):
    """Gaussian wells: a per-plate offset, `n_dmso` DMSO wells per plate, every compound once on every
    plate; the first `n_active` compounds move by `shift` along their own direction (0: no effect at all)."""
    rng = np.random.default_rng(seed)
    rows, x = [], []
    direction = rng.normal(size=(n_compounds, d))
    for p in range(n_plates):
        offset = rng.normal(0, plate_sd, d)
        for i in range(n_dmso):
            rows.append((f"P{p}", f"D{i:02d}", schema.DMSO, schema.NEGCON))
            x.append(offset + rng.normal(size=d))
        for c in range(n_compounds):
            rows.append((f"P{p}", f"C{c:02d}", f"JCP2022_{c:06d}", schema.TREATED))
            x.append(offset + rng.normal(size=d) + (shift * direction[c] if c < n_active else 0.0))
    return pd.DataFrame(rows, columns=[schema.PLATE, schema.WELL, schema.JCP, schema.ROLE]), np.asarray(x, np.float32)


def activity_and_chance(wells: pd.DataFrame, prof: np.ndarray, null_size: int = 200) -> tuple[pd.Series, pd.Series]:
    """Per treated compound: copairs' mAP of activity, and the random ranking's expected mAP."""
    from micon.eval import map as mapm

    keep = wells[schema.ROLE].isin([schema.TREATED, schema.NEGCON]).to_numpy()
    ap, m = mapm.phenotypic_activity(wells[keep].reset_index(drop=True), prof[keep], null_size=null_size)
    m = m[m[schema.JCP] != schema.DMSO].set_index(schema.JCP)["mean_average_precision"]
    return m, mapm.chance_map(ap).reindex(m.index)


def part_no_effect(dims=(16, 32, 64, 128, 165, 256, 300, 500), seeds=range(3)) -> pd.DataFrame:
    from micon.eval.profiles import normalise_wells

    rows = []
    for d in dims:
        for step, (mad, zca) in STEPS.items():
            gaps = []
            for seed in seeds:
                wells, raw = no_effect_screen(seed, d)
                w, _, prof = normalise_wells(wells, raw, normalize=mad, whiten=zca)
                m, chance = activity_and_chance(w, prof)
                gaps.append(float((m - chance).mean()))
            rows.append(dict(features=d, step=step, gap=float(np.mean(gaps)), half=t_half(gaps)))
    return pd.DataFrame(rows)


def part_cost(sizes=((8, 40), (40, 200), (80, 1000)), d: int = 64, repeats: int = 5) -> pd.DataFrame:
    """CPU seconds of the recipe's mAP of activity (normalise + copairs' recipe) and of the DMSO null
    (`repeats` halvings, each normalised and scored again) on no-effect screens of growing size
    (plates, compounds per plate; every compound on 5 plates would be cheaper: each is on every plate here)."""
    from micon.eval.activity import negcon_null
    from micon.eval.profiles import normalise_wells

    rows = []
    for n_plates, n_compounds in sizes:
        wells, raw = no_effect_screen(0, d, n_plates=n_plates, n_compounds=n_compounds)
        t0 = time.process_time()
        w, _, prof = normalise_wells(wells, raw)
        activity_and_chance(w, prof, null_size=1000)
        recipe = time.process_time() - t0
        t0 = time.process_time()
        negcon_null(wells, raw, repeats=repeats, replicates=5, null_size=1000)
        null = time.process_time() - t0
        rows.append(dict(wells=len(wells), plates=n_plates, recipe_cpu_s=round(recipe, 2), null_cpu_s=round(null, 2),
                         null_ms_per_well=round(1000 * null / len(wells), 3), ratio=round(null / recipe, 1)))
        print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def part_screen(out: Path, seeds) -> pd.DataFrame:
    from sklearn.metrics import roc_auc_score

    from micon.embeddings import load_embeddings
    from micon.eval.activity import negcon_null
    from micon.eval.profiles import aggregate_wells, normalise_wells

    splits = json.loads((out / "shards" / "manifest.json").read_text())["splits"]
    truth = pd.read_csv(out / "screen" / "ground_truth" / "compounds.csv").set_index(schema.JCP)
    held = sorted(splits["heldout_compounds"])
    active = truth.loc[held, "magnitude"].to_numpy() > 0
    labels = [(m, m, None) for m in SINGLE] + [(f"{m}_seed{s}", m, s) for m in METHODS for s in seeds]
    rows = []
    for name, method, seed in labels:
        emb = out / "embeddings" / name
        if not (emb / "embed.json").is_file():
            continue
        t0 = time.perf_counter()
        meta, x = load_embeddings(emb)
        wells, raw = aggregate_wells(meta, np.asarray(x, np.float32))
        w, _, prof = normalise_wells(wells, raw)                    # the recipe, as the comparison scores it
        m, chance = activity_and_chance(w, prof)
        comp, null = negcon_null(wells, raw, null_size=200)         # the same recipe, fitted on half the DMSO
        split_fit = comp.set_index(schema.JCP)["mean_average_precision"]
        level = float(null["mean_average_precision"].mean())
        mh, sh = m.reindex(held).to_numpy(), split_fit.reindex(held).to_numpy()
        rows.append(dict(
            method=method, seed=seed, features=int(prof.shape[1]),
            active=float(mh[active].mean()), inactive=float(mh[~active].mean()),
            chance=float(chance.reindex(held).mean()), auc=float(roc_auc_score(active, mh)),
            null=level, active_vs_null=float(sh[active].mean() - level),
            inactive_vs_null=float(sh[~active].mean() - level)))
        print(f"{name:18s} active {rows[-1]['active']:.3f} inactive {rows[-1]['inactive']:.3f} "
              f"(chance {rows[-1]['chance']:.3f}), AUC {rows[-1]['auc']:.3f}, inactive - null "
              f"{rows[-1]['inactive_vs_null']:+.3f} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return pd.DataFrame(rows)


def summary(per_run: pd.DataFrame) -> pd.DataFrame:
    cols = ["active", "inactive", "chance", "auc", "null", "active_vs_null", "inactive_vs_null"]
    rows = []
    for method, g in per_run.groupby("method", sort=False):
        r = dict(method=method, seeds=len(g), features=int(g.features.median()))
        for c in cols:
            r[c], r[c + "_half"] = float(g[c].mean()), t_half(g[c].to_numpy())
        rows.append(r)
    return pd.DataFrame(rows)


def cell(r, c: str, signed: bool = False) -> str:
    v = f"{r[c]:+.3f}" if signed else f"{r[c]:.3f}"
    return v if not np.isfinite(r[c + "_half"]) else f"{v} ± {r[c + '_half']:.3f}"


def plot(no_effect: pd.DataFrame, summ: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(20, 4.8))
    for step, g in no_effect.groupby("step", sort=False):
        ax[0].errorbar(g.features, g.gap, yerr=g.half, marker="o", capsize=3, label=step)
    ax[0].axhline(0, color="k", ls="--", lw=1, label="no bias")
    ax[0].axvline(128, color="grey", ls=":", lw=1, label="128 DMSO wells (the fit)")
    dims = [int(d) for d in sorted(no_effect.features.unique())]
    ticks = [d for i, d in enumerate(dims) if i == 0 or d >= 1.5 * dims[i - 1]]     # no two labels overlap
    ax[0].set_xscale("log")
    ax[0].set_xticks(ticks, [str(d) for d in ticks])
    ax[0].minorticks_off()
    ax[0].set(xlabel="features", ylabel="mAP of activity - random-ranking chance",
              title="A screen with no effect: the recipe's bias")
    ax[0].legend(fontsize=8)
    x = np.arange(len(summ))
    colours = [method_colour(m) for m in summ.method]
    w = 0.38
    for a, cols, ylabel, title in (
            (ax[1], ("active", "inactive"), "mAP of activity (held-out compounds)",
             "The recipe's mAP by the screen's truth"),
            (ax[2], ("active_vs_null", "inactive_vs_null"), "mAP - DMSO null (fit on half the DMSO)",
             "Against the DMSO null")):
        for i, (c, hatch) in enumerate(zip(cols, ("", "//"))):
            a.bar(x + (i - 0.5) * w, summ[c], w, yerr=summ[c + "_half"].to_numpy(), capsize=2,
                  color=colours, hatch=hatch, edgecolor="k", lw=0.5)
        a.bar([np.nan], [np.nan], color="white", edgecolor="k", label="truly active")
        a.bar([np.nan], [np.nan], color="white", edgecolor="k", hatch="//", label="truly inactive")
        a.set(xticks=x, ylabel=ylabel, title=title)
        a.set_xticklabels(summ.method, rotation=30, ha="right")
    ax[1].axhline(float(summ.chance.mean()), color="k", ls="--", lw=1, label="random-ranking chance")
    ax[1].set_ylim(0, 1)
    ax[2].axhline(0, color="k", ls="--", lw=1, label="the null (DMSO itself)")
    for a in ax[1:3]:
        a.legend(fontsize=8)
    ax[3].bar(x, summ.auc, yerr=summ.auc_half.to_numpy(), capsize=3, color=colours, edgecolor="k", lw=0.5)
    ax[3].axhline(0.5, color="k", ls="--", lw=1, label="chance (0.5)")
    ax[3].set(xticks=x, ylim=(0, 1.05), ylabel="ROC AUC: compound mAP vs truth",
              title="Does it rank the active compounds first?")
    ax[3].set_xticklabels(summ.method, rotation=30, ha="right")
    ax[3].legend(fontsize=8, loc="lower right")
    fig.text(0.01, 0.01, "error bars: 95% t-interval over seeds (10 per learned method; none for the single "
             "cellprofiler and oracle runs); no-effect panel: over 3 screens", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/c200", help="bench/science.py's OUT (screen, shards, embeddings)")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--docs", action="store_true", help="write docs/results/ACTIVITY.md and activity_null.png")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    no_effect = part_no_effect()
    print(markdown_table(no_effect.round(3).to_dict("records")), flush=True)
    cost = part_cost()
    print(markdown_table(cost.to_dict("records")), flush=True)
    per_run = part_screen(Path(a.out).resolve(), a.seeds)
    summ = summary(per_run)
    table = pd.DataFrame({
        "method": summ.method, "seeds": summ.seeds, "features": summ.features,
        "mAP, truly active": [cell(r, "active") for _, r in summ.iterrows()],
        "mAP, truly inactive": [cell(r, "inactive") for _, r in summ.iterrows()],
        "random-ranking chance": [f"{v:.3f}" for v in summ.chance],
        "ROC AUC": [cell(r, "auc") for _, r in summ.iterrows()],
        "DMSO null": [cell(r, "null") for _, r in summ.iterrows()],
        "active - null": [cell(r, "active_vs_null", True) for _, r in summ.iterrows()],
        "inactive - null": [cell(r, "inactive_vs_null", True) for _, r in summ.iterrows()]})
    print(markdown_table(table.to_dict("records")), flush=True)
    print(f"{time.perf_counter() - t0:.0f} s", flush=True)
    if a.docs:
        res = ROOT / "docs" / "results"
        plot(no_effect, summ, res / "activity_null.png")
        pivot = no_effect.assign(v=[f"{g:+.3f}" for g in no_effect.gap]).pivot(index="features", columns="step",
                                                                                 values="v")[list(STEPS)]
        notes = (res / "ACTIVITY_NOTES.md").read_text() if (res / "ACTIVITY_NOTES.md").is_file() else ""
        (res / "ACTIVITY.md").write_text(
            "# mAP of activity: the recipe's bias and a DMSO null\n\n"
            f"Command: `{command()}` ({time.perf_counter() - t0:.0f} s; machine: {machine()}; "
            f"date {time.strftime('%Y-%m-%d')}). Plot: `activity_null.png`.\n\n" + notes +
            "## A screen with no effect at all\n\n8 plates x 16 DMSO wells (128), 40 compounds once on every "
            "plate, Gaussian wells with per-plate offsets. mAP of activity minus the random-ranking chance "
            "(mean of 3 screens), per feature count and recipe step:\n\n"
            + markdown_table(pivot.reset_index().to_dict("records")) +
            "\n\n## What the null costs\n\nCPU seconds on no-effect screens (64 features, 16 DMSO wells per "
            "plate, 1,000 null samples): the recipe's mAP of activity (normalisation and copairs' recipe) against "
            "the DMSO null as `evaluate` runs it (5 halvings, pseudo-compounds of 5 wells), each normalised and "
            "scored again. Both grow linearly with the wells (mAP of activity ranks a well's replicates among "
            "its plate's DMSO wells only).\n\n" + markdown_table(cost.to_dict("records")) +
            "\n\n## The comparison's screen, held-out compounds\n\n"
            f"{int(active_count(Path(a.out).resolve()))} of the held-out compounds are active in the screen's "
            "truth. Mean over seeds ± the 95% t-interval's half-width. `mAP` columns: the recipe as the "
            "comparison scores it (fitted on all DMSO). `DMSO null`: the pseudo-compounds' mAP with the "
            "profiles fitted on the other half of the DMSO wells; `active - null`, `inactive - null`: the "
            "compounds' mAP under that same fit minus the null (0: indistinguishable from DMSO).\n\n"
            + markdown_table(table.to_dict("records")) + "\n")
        write_section("mAP of activity's DMSO null (evaluate)",
                      "What `evaluate`'s DMSO null (5 halvings of each plate's DMSO wells, pseudo-compounds of 5 "
                      "wells, each halving normalised and scored again) costs beside the recipe's own mAP of "
                      "activity (normalisation + copairs' recipe), on no-effect screens with 64 features and 16 "
                      "DMSO wells per plate, 1,000 null samples; CPU seconds. Linear in the wells: about 4 "
                      "CPU-minutes at cpg0016's 550k wells. `activity_null=false` leaves it out. The science "
                      "behind it: docs/results/ACTIVITY.md.\n\n" + markdown_table(cost.to_dict("records")))
        print(f"wrote {res / 'ACTIVITY.md'}, {res / 'activity_null.png'} and docs/BENCHMARKS.md's section")
    return 0


def active_count(out: Path) -> int:
    splits = json.loads((out / "shards" / "manifest.json").read_text())["splits"]
    truth = pd.read_csv(out / "screen" / "ground_truth" / "compounds.csv").set_index(schema.JCP)
    return int((truth.loc[sorted(splits["heldout_compounds"]), "magnitude"] > 0).sum())


if __name__ == "__main__":
    sys.exit(main())
