"""Does MICON help? The comparison on the calibrated screen, with seeds, intervals and three splits.

    python bench/science.py [--out runs/science] [--seeds 0 1 2] [--steps 500] [--lanes 2] [--data called_active]
                            [--parts comparison ablations activity]
    python bench/science.py --curve 3000 --every 250 --methods paclr --data truth_active --label ws48 \
                            --train-args data.pair_within_source=true ...    # retrieval against step
    python bench/science.py --replot [--docs]      # redraw comparison.png (and results.json) from the stored numbers
    python bench/science.py --ladder 60 [--train-args micro_batch=16]   # diagnosis: the learnability ladder
    python bench/science.py --diagnose 300 [--preset calibrated]       # diagnosis: fit vs transfer, truth-active runs
    (on a shared CPU machine set OMP_NUM_THREADS=1: torch's threads spin on busy cores, 4-5x slower)
    ./launch.sh compare [same options]

One synthetic screen (preset `calibrated`, fixed before any method ran: micon.synth.CALIBRATION), ingested
with one held-out source, two held-out batches and 20% held-out compounds. Then, through the real jobs
(train.run under DeepSpeed, evaluate.embed under Ray), for every method and seed: train, embed; the
hand-crafted features are embedded once. Every embedding becomes well profiles exactly as `evaluate` makes
them (mean over sites, per-plate MAD against DMSO, ZCA-cor on DMSO) and is scored on three query sets:

  heldout_batches    wells of training compounds in the two held-out batches (plates never trained on)
  heldout_compounds  every well of the held-out compounds (molecules never trained on)
  heldout_source     every well in the held-out source (a microscope and lab never trained on)

against the gallery of all wells: NSB/NSS top-1 and top-10, mAP of phenotypic activity (vs same-plate
DMSO) and of replicate consistency (same compound vs other compounds; copairs' recipes, APs of the query
wells), fraction retrieved, and source kNN accuracy of the profiles (lower = less batch effect).
Intervals: 95% t-interval over seeds and a bootstrap over compounds (1,000 resamples) of the first seed.

Parts: `comparison` (micon, paclr, clip, simclr x seeds), `ablations` (MICON variants, first seed),
`activity` (a first-pass activity call on hand-crafted profiles, then MICON trained with inactive compounds
undersampled). Every stage is skipped when its output exists: a killed run resumes. Writes
OUT/results.json, OUT/*.png and, with --docs, docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from micon import atomic, schema  # noqa: E402

METHODS = ("micon", "paclr", "clip", "simclr")
SUBJECT = "micon"                        # the method the comparison asks about (--subject)
LR = {"clip": 1e-3}                      # CLIP's learnable temperature collapses at 3e-3 (seen in the comparison runs)
ABLATIONS = {                            # variant -> train overrides of the subject (first seed), run as SUBJECT_variant
    # pairs across sources first, as the replicate sets were built (the recipe pairs within a source first)
    "cross_source": ["data.pair_within_source=false"],
    "cf0": ["loss.counterfactual_weight=0"],
    "grad": ["model.detach_control=false", "model.detach_target=false"],
    "official_dmso": ["loss.dmso_positives=true"],
    "t1": ["loss.temperature=1.0"],
    # the image encoder starts from the same seed's SimCLR run (pretrained on every site, DMSO included, no labels)
    "simclr_init": ["model.init={out}/train/simclr_seed{seed}"],
}


NEEDS_RUNS = ("simclr_init",)       # ablations that start from the comparison's own runs (run those first)
STARTS_FROM = {"simclr_init": "simclr"}     # ... and the method whose run of the same seed they start from


def overrides(name: str, out: Path, seed: int) -> list[str]:
    """An ablation's train overrides for one run; `{out}` and `{seed}` in them name this comparison's OUT
    and the run's seed (e.g. the same seed's SimCLR run as the starting point), which must have finished."""
    out_ = [o.format(out=out, seed=seed) for o in ABLATIONS[name]]
    for o in out_:
        if o.startswith("model.init=") and not (Path(o.split("=", 1)[1]) / "final.json").is_file():
            raise SystemExit(f"science: {name} (seed {seed}) starts from {o.split('=', 1)[1]}, which has not "
                             f"finished: run the comparison for that seed first")
    return out_


def variant(subject: str, name: str) -> str:
    """The label of a run of the subject method with other settings (an ablation, activity-aware data)."""
    return f"{subject}_{name}"


def of_subject(label: str, subject: str) -> bool:
    return label == subject or label.startswith(variant(subject, ""))
SPLITS = ("heldout_batches", "heldout_compounds", "heldout_source")
METRICS = ("nsb_top1", "nsb_top10", "nss_top1", "nss_top10", "map_activity", "map_consistency",
           "fraction_retrieved", "source_knn", "zs_well_top1pct", "zs_compound_top1", "zs_compound_top10")


def log(msg: str) -> None:
    print(f"[science {time.strftime('%H:%M:%S')}] {msg}", flush=True)


_TIMES_LOCK = threading.Lock()


def sh(args: list[str], logfile: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "WANDB_MODE": "offline", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    logfile.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for attempt in range(3):   # a loaded machine can miss Ray's fixed 30 s node start-up: start again
        with open(logfile, "w") as fh:
            rc = subprocess.run(args, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
        if not rc or "timed out during startup" not in logfile.read_text()[-3000:]:
            break
        log(f"{logfile.stem}: Ray's node did not start in time (machine busy); try {attempt + 2} of 3")
    # each job's seconds, kept across resumed runs (OUT/stage_seconds.json): the compute the results cost
    times_path = logfile.parent.parent / "stage_seconds.json"
    with _TIMES_LOCK:       # --lanes: several stages finish at once
        times = json.loads(times_path.read_text()) if times_path.is_file() else {}
        times[logfile.stem] = round(time.perf_counter() - t0, 1)
        times_path.write_text(json.dumps(times, indent=1))
    if rc:
        raise RuntimeError(f"{' '.join(args[:4])} ... exited {rc}; see {logfile}:\n{logfile.read_text()[-1500:]}")


# --------------------------------------------------------------------------- stages

def prepare(out: Path, preset: str) -> None:
    py = sys.executable
    if not (out / "screen" / "ground_truth").is_dir():
        log(f"synthetic screen (preset={preset})")
        sh([py, "-m", "data_prep.synth", str(out / "screen"), f"preset={preset}"], out / "logs" / "synth.log")
    if not (out / "shards" / "manifest.json").is_file():
        log("ingest: shards, control bank, splits (1 held-out source, 2 held-out batches, 20% compounds)")
        sh([py, "-m", "data_prep.ingest", str(out / "screen"), str(out / "shards"), "shard_mb=2",
            "heldout_sources=1", "heldout_batches=2", "heldout_compound_fraction=0.2"], out / "logs" / "ingest.log")
    if not (out / "graphs").is_dir():
        log("compound graphs")
        sh([py, "-m", "data_prep.featurize", str(out / "screen" / "metadata" / "compound.csv.gz"), str(out / "graphs")],
           out / "logs" / "featurize.log")


TRAIN_ARGS: list[str] = []              # --train-args: appended to every training run (later keys win)
# every comparison run's settings (docs/RESULTS.md, section 4, says why): a replicate set's wells paired within
# their source first, 48 px crops of the 64 px sites, channels_last inputs (1.5x on CPU), bit-reproducible
RECIPE = ["data.pair_within_source=true", "data.augment.crop=48", "engine.channels_last=on", "deterministic=true",
          "wandb.log_every=10"]


def merged(settings: list[str]) -> list[str]:
    """`key=value` settings with each key once, where it first appears, holding its last value (as train reads them)."""
    last = {}
    for x in settings:
        last[x.split("=", 1)[0]] = x        # a dict keeps each key where it was first set
    return list(last.values())


def train_command(out: Path, ckpt: Path, method: str, seed: int, steps: int, shards: Path,
                  settings: list[str]) -> list[str]:
    """`train.run` as every run here starts it (32 examples per step, one loader worker), `settings` last."""
    # every method that pairs replicates reads the same pairs (replicate sets), whichever path data.stream=auto
    # would pick for its cost, so the comparison differs in the objective alone
    from micon.methods import get_method
    stream = "replicate_sets" if get_method(method).needs.pairs else "plates"
    return [sys.executable, "-m", "train.run", "-", f"method={method}", f"data.shards={shards}",
            f"data.graphs={out / 'graphs'}", f"out={ckpt}", f"steps={steps}", f"seed={seed}", "micro_batch=32",
            f"optim.lr={LR.get(method, 3e-3)}", "optim.warmup_steps=20", "data.num_workers=1",
            f"data.stream={stream}", "progress=false", *settings]


def train_and_embed(out: Path, name: str, method: str, seed: int, steps: int, extra: list[str],
                    shards: Path | None = None) -> Path:
    py = sys.executable
    shards = shards or out / "shards"
    emb = out / "embeddings" / name
    if (emb / "embed.json").is_file():
        return emb
    ckpt = out / "train" / name
    if not (ckpt / "final.json").is_file():
        t0 = time.perf_counter()
        sh(train_command(out, ckpt, method, seed, steps, shards, [f"ckpt_every={steps}", *RECIPE, *TRAIN_ARGS, *extra]),
           out / "logs" / f"train-{name}.log")
        log(f"trained {name} ({steps} steps) in {time.perf_counter() - t0:.0f} s")
    sh([py, "-m", "evaluate.embed", str(ckpt), str(out / "shards"), str(emb)], out / "logs" / f"embed-{name}.log")
    return emb


def embed_baseline(out: Path) -> Path:
    """The field's baseline, CellProfiler-grade features (the registered featuriser `cellprofiler`)."""
    emb = out / "embeddings" / "cellprofiler"
    if not (emb / "embed.json").is_file():
        log("CellProfiler-grade features")
        sh([sys.executable, "-m", "evaluate.embed", "cellprofiler", str(out / "shards"), str(emb)],
           out / "logs" / "embed-cellprofiler.log")
    return emb


def oracle_embedding(out: Path) -> Path:
    """The ceiling: each well's true phenotype from the screen's ground truth, embedded like a method."""
    return embed_in_process(out, f"truth:{out / 'screen'}", out / "embeddings" / "oracle", "oracle")


def zero_shot(out: Path, name: str, method: str, emb: Path) -> dict:
    """Molecule -> well retrieval on the held-out compounds for a method that predicts profiles from molecules
    (MICON's counterfactual generator from the molecule and DMSO controls, CLIP's molecule tower): the predict
    job on every compound, scored by evaluate's zero-shot scorer (top-1% of the wells, top-k compounds)."""
    from micon.methods import get_method

    if not get_method(method).predicts:
        return {}
    from evaluate.run import score_predictions

    pred = out / "predictions" / name
    if not (pred / "predict.json").is_file():
        sh([sys.executable, "-m", "evaluate.predict", str(out / "train" / name),
            str(out / "screen" / "metadata" / "compound.csv.gz"), str(pred), f"shards={out / 'shards'}",
            f"embeddings={emb}"], out / "logs" / f"predict-{name}.log")
    held = set(json.loads((out / "shards" / "manifest.json").read_text())["splits"]["heldout_compounds"])
    z = score_predictions(name, str(pred), held, 10)
    return {k: v for k, v in z.items() if k.startswith("zs_")}


def embed_in_process(out: Path, source: str, emb: Path, label: str) -> Path:
    """`evaluate.embed SOURCE OUT/shards EMB ray=false` unless EMB is finished: a checkpoint, `untrained:RUN` or
    `truth:SCREEN`, small enough that a Ray start-up would cost more than the embedding."""
    if not (emb / "embed.json").is_file():
        sh([sys.executable, "-m", "evaluate.embed", source, str(out / "shards"), str(emb), "ray=false"],
           out / "logs" / f"embed-{label}.log")
    return emb


def training_shards(out: Path, data: str, baseline_profiles=None) -> tuple[Path | None, dict | None]:
    """--data: the shards whose replicate sets the pairing methods read (None: every compound's), and the
    activity call's record where one was made (the called compounds kept, the others left out)."""
    if data == "truth_active":
        return truth_active_shards(out), None
    if data == "called_active":
        shards, rec = activity_shards(out, baseline_profiles or profiles(embed_baseline(out)), 0.0, "called_active")
        log(f"activity call: {rec}")
        return shards, dict(rec, inactive_weight=0.0)
    return None, None


# --------------------------------------------------------------------------- scoring

def profiles(emb: Path):
    from micon.embeddings import load_embeddings
    from micon.eval.profiles import well_profiles

    meta, x = load_embeddings(emb)
    return well_profiles(meta, x)    # evaluate's defaults: mean of sites, MAD + ZCA-cor against DMSO


def query_sets(wells: pd.DataFrame, splits: dict, fit: bool = False) -> dict[str, np.ndarray]:
    """The three held-out query sets; with `fit` also `training` (what training saw, to read fit beside transfer)."""
    treated = (wells[schema.ROLE] == schema.TREATED).to_numpy()
    held_c = wells[schema.JCP].isin(splits["heldout_compounds"]).to_numpy()
    sets = {
        "heldout_batches": treated & ~held_c & wells[schema.BATCH].isin(splits["heldout_batches"]).to_numpy(),
        "heldout_compounds": treated & held_c,
        "heldout_source": treated & wells[schema.SOURCE].isin(splits["heldout_sources"]).to_numpy(),
    }
    if fit:     # training compounds in training plates
        sets["training"] = (treated & ~held_c & ~wells[schema.BATCH].isin(splits["heldout_batches"]).to_numpy()
                            & ~wells[schema.SOURCE].isin(splits["heldout_sources"]).to_numpy())
    return sets


def score(wells: pd.DataFrame, raw: np.ndarray, prof: np.ndarray, splits: dict, n_boot: int = 1000,
          seed: int = 0, fit: bool = False) -> dict:
    """{split: {metric: value, metric + "_boot": (lo, hi)}} (see the module docstring; `fit`: query_sets)."""
    from micon.eval import map as mapm
    from micon.eval.calibration import knn_accuracy
    from micon.eval.retrieval import expected_hit_rate, topk_hit_rate

    out = {}
    act_ap, _ = mapm.phenotypic_activity(wells, prof, null_size=2000)
    con_ap, _ = mapm.phenotypic_consistency(wells, prof, null_size=2000)
    for split, q in query_sets(wells, splits, fit).items():
        if not q.any():
            continue
        _, per_q = topk_hit_rate(wells[q].reset_index(drop=True), prof[q], wells, prof, ks=(1, 10),
                                 modes=("nsb", "nss"), per_query=True)
        r = {}
        hits = {}
        for mode in ("nsb", "nss"):
            elig = per_q[f"{mode}_eligible"].to_numpy(bool)
            fh = per_q[f"{mode}_first_hit"].to_numpy()
            for k in (1, 10):
                h = ((fh > 0) & (fh <= k)).astype(float)
                r[f"{mode}_top{k}"] = float(h[elig].mean()) if elig.any() else float("nan")
                r[f"{mode}_top{k}_chance"] = float(expected_hit_rate(
                    per_q.loc[elig, f"{mode}_n_candidates"], per_q.loc[elig, f"{mode}_n_positives"], k).mean()) \
                    if elig.any() else float("nan")
                hits[f"{mode}_top{k}"] = pd.Series(h[elig]).groupby(per_q.loc[elig, schema.JCP].to_numpy()).mean()
        qkeys = set(zip(wells.loc[q, schema.PLATE], wells.loc[q, schema.WELL]))
        for name, ap in (("activity", act_ap), ("consistency", con_ap)):
            keep = np.array([k in qkeys for k in zip(ap[schema.PLATE], ap[schema.WELL])], dtype=bool)
            m = mapm.mean_average_precision(ap[keep], [schema.JCP], null_size=2000)
            r[f"map_{name}"] = float(m["mean_average_precision"].mean())
            r[f"map_{name}_chance"] = float(mapm.chance_map(ap[keep]).mean())   # a random ranking's, per compound
            hits[f"map_{name}"] = m.set_index(schema.JCP)["mean_average_precision"]
            if name == "activity":
                r["fraction_retrieved"] = mapm.fraction_retrieved(m)
                r["fraction_retrieved_chance"] = 0.05      # the test's level: a bound for inactive compounds
                hits["fraction_retrieved"] = (m.set_index(schema.JCP)["corrected_p_value"] < 0.05).astype(float)
        compounds = set(wells.loc[q, schema.JCP])
        on = wells[schema.JCP].isin(compounds).to_numpy() | (wells[schema.ROLE] == schema.NEGCON).to_numpy()
        r["source_knn"] = knn_accuracy(prof[on], wells.loc[on, schema.SOURCE].to_numpy())
        r["source_knn_chance"] = float(wells.loc[on, schema.SOURCE].value_counts(normalize=True).max())
        rng = np.random.default_rng(seed)
        for metric, per_c in hits.items():       # bootstrap over compounds
            v = per_c.dropna().to_numpy()
            if len(v) > 1:
                boots = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(axis=1)
                r[metric + "_boot"] = (float(np.clip(np.quantile(boots, 0.025), 0, 1)),
                                       float(np.clip(np.quantile(boots, 0.975), 0, 1)))
        r["n_queries"] = int(q.sum())
        r["n_compounds"] = len(compounds)
        out[split] = r
    return out


def summarise(runs: dict[str, dict]) -> pd.DataFrame:
    """runs: label -> score(); labels 'method' or 'method@seed'. Rows: method x split x metric with the mean
    over seeds, its 95% t-interval (unclipped: the table's numbers), the first seed's bootstrap interval
    and the chance level (NaN where the scores hold none)."""
    rows = []
    groups: dict[str, list[str]] = {}
    for label in runs:
        groups.setdefault(label.split("@")[0], []).append(label)
    for method, labels in groups.items():
        for split in SPLITS:
            for metric in METRICS:
                vals = [runs[lb][split][metric] for lb in labels if metric in runs[lb].get(split, {})]
                if not vals:
                    continue
                mean = float(np.mean(vals))
                half = t_half(vals)
                boot = runs[labels[0]][split].get(metric + "_boot", (np.nan, np.nan))
                chance = [runs[lb][split].get(metric + "_chance", np.nan) for lb in labels
                          if metric in runs[lb].get(split, {})]
                rows.append(dict(method=method, split=split, metric=metric, mean=mean, seeds=len(vals),
                                 ci_lo=mean - half, ci_hi=mean + half, boot_lo=boot[0], boot_hi=boot[1],
                                 chance=float(np.mean(chance)), values=" ".join(f"{v:.3f}" for v in vals)))
    return pd.DataFrame(rows)


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


# --------------------------------------------------------------------------- replot from stored numbers

def results_json(summary: pd.DataFrame) -> dict:
    """{split: {method: {metric: {"mean", "lo", "hi", "n"}}}}, the numbers docs/RESULTS.md shows: n seeds; lo/hi
    the 95% t-interval over seeds (one seed: its bootstrap over compounds, null where none is stored), clipped to
    the metrics' range [0, 1] (the tables print the t-interval unclipped)."""
    def clip(v) -> float | None:
        return float(min(max(float(v), 0.0), 1.0)) if pd.notna(v) and np.isfinite(float(v)) else None

    out: dict = {}
    for r in summary.itertuples(index=False):
        one = int(r.seeds) == 1
        lo, hi = (r.boot_lo, r.boot_hi) if one else (r.ci_lo, r.ci_hi)
        out.setdefault(r.split, {}).setdefault(r.method, {})[r.metric] = dict(
            mean=float(r.mean), lo=clip(lo), hi=clip(hi), n=int(r.seeds))
    return out


def summary_from_results_md(text: str) -> pd.DataFrame:
    """The comparison's numbers as docs/RESULTS.md stores them (per split a table of `mean [lo, hi]`, or
    `mean` for one seed) -> summarise()'s frame (bootstrap intervals and chance are not in the tables: NaN)."""
    import re

    seeds = re.search(r"seeds \[([0-9, ]+)\]", text)
    n_seeds = len(seeds.group(1).split(",")) if seeds else 2
    cell = re.compile(r"^\s*(-?[0-9.]+)(?:\s*\[(-?[0-9.]+),\s*(-?[0-9.]+)\])?\s*$")
    rows = []
    for split in SPLITS:
        block = re.search(rf"^### {split}\n\n(\|.*\|\n)+", text, flags=re.M)
        if not block:
            raise ValueError(f"docs/RESULTS.md has no table for {split}")
        lines = [ln for ln in block.group(0).splitlines() if ln.startswith("|")]
        header = [c.strip() for c in lines[0].strip("|").split("|")]
        for line in lines[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            for metric, value in zip(header[1:], cells[1:]):
                m = cell.match(value)
                if not m:
                    continue
                mean = float(m.group(1))
                lo, hi = (float(m.group(2)), float(m.group(3))) if m.group(2) else (np.nan, np.nan)
                rows.append(dict(method=cells[0], split=split, metric=metric, mean=mean,
                                 seeds=n_seeds if m.group(2) else 1, ci_lo=lo, ci_hi=hi, boot_lo=np.nan,
                                 boot_hi=np.nan, chance=np.nan, values=""))
    return pd.DataFrame(rows)


def design_chance(text: str) -> dict:
    """{(split, metric): chance} for the screen docs/RESULTS.md describes, computed from its design alone
    (no images): the preset's wells with the held-out source and batches it names, scored by `score` on
    random profiles (chance levels depend on the wells' layout, not on the profiles). Every compound is
    once on every plate in the calibrated presets, so which compounds were held out does not matter."""
    import re

    from micon.synth import design_screen, resolve_config

    preset = re.search(r"Preset `([A-Za-z_0-9]+)`", text).group(1)
    held = re.search(r"held out from training: source ([^,]+(?:, source_[0-9]+)*), batches (.+?), ([0-9]+) compounds",
                     text)
    screen = design_screen(resolve_config([f"preset={preset}", "seed=0"]))
    wells = screen.wells.merge(screen.plates[[schema.SOURCE, schema.BATCH, schema.PLATE]], on=[schema.SOURCE, schema.PLATE])
    roles = dict(zip(screen.compounds[schema.JCP], screen.compounds.role))
    wells = wells.assign(**{schema.ROLE: wells[schema.JCP].map(roles)})
    wells = wells[wells[schema.ROLE] != schema.EMPTY].reset_index(drop=True)
    treated = sorted(set(wells.loc[wells[schema.ROLE] == schema.TREATED, schema.JCP]))
    splits = {"heldout_sources": [x.strip() for x in held.group(1).split(",")],
              "heldout_batches": [x.strip() for x in held.group(2).split(",")],
              "heldout_compounds": treated[:int(held.group(3))]}
    noise = np.random.default_rng(0).normal(size=(len(wells), 16)).astype(np.float32)
    scores = score(wells, noise, noise, splits, n_boot=10)
    return {(split, key[:-len("_chance")]): v for split, r in scores.items() for key, v in r.items()
            if key.endswith("_chance")}


def replot(out: Path, docs: bool, subject: str) -> Path:
    """Redraw comparison.png from stored numbers, running nothing: OUT/summary.csv when the run is at hand
    (exact: bootstrap intervals and chance levels included), else docs/results/summary.csv, else the tables
    of docs/RESULTS.md (chance levels recomputed from the screen's design; one-seed rows have no interval)."""
    results_md = ROOT / "docs" / "RESULTS.md"
    for source in (out / "summary.csv", ROOT / "docs" / "results" / "summary.csv"):
        if source.is_file():
            summary = pd.read_csv(source)
            break
    else:
        source = results_md
        text = results_md.read_text()
        summary = summary_from_results_md(text)
        chance = design_chance(text)
        summary["chance"] = [chance.get((sp, m), np.nan) for sp, m in zip(summary.split, summary.metric)]
    log(f"replot from {source} ({len(summary)} rows)")
    path = (ROOT / "docs" / "results" if docs else out) / "comparison.png"
    plot(summary, path, subject)
    atomic.write_json(path.parent / "results.json", results_json(summary))
    return path


# --------------------------------------------------------------------------- activity-aware training

def activity_shards(out: Path, handcrafted_profiles, inactive_weight: float, label: str, min_share: float = 0.2,
                    top_share: float = 0.3) -> tuple[Path, dict]:
    """First-pass activity call on the baseline's profiles (mAP vs same-plate DMSO, BH-corrected; where that
    calls under `min_share` of the compounds, too few to learn a phenotype space from, the top `top_share` by
    mAP: on `calibrated` BH calls 12 of 200, precision 1.0, recall 0.15), a weights table (active 1,
    inactive `inactive_weight`), and a copy of the shards whose replicate sets use it."""
    import hashlib

    from micon.eval.activity import activity_call, weights_table

    wells, _, prof = handcrafted_profiles
    call = bh = activity_call(wells, prof)
    if bh.active.mean() < min_share:
        call = activity_call(wells, prof, top_share=top_share)
    weights = out / "activity_weights.csv"
    weights_table(call, inactive_weight).merge(call, on=schema.JCP).to_csv(weights, index=False)
    truth = pd.read_csv(out / "screen" / "ground_truth" / "compounds.csv")
    truth = truth[truth.role == schema.TREATED].set_index("Metadata_JCP2022")
    true = set(truth.index[truth.magnitude > 0])

    def recovery(c: pd.DataFrame) -> dict:
        called = set(c.loc[c.active, schema.JCP])
        return dict(called=len(called), precision=len(called & true) / max(len(called), 1),
                    recall=len(called & true) / max(len(true), 1))

    rec = dict(rule=str(call["rule"].iloc[0]), **recovery(call), bh=recovery(bh), true_active=len(true),
               n_compounds=int(len(truth)))
    dst = out / "shards_activity"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    stamp = dst / "weights.sha256"
    if not stamp.is_file() or stamp.read_text() != digest:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(out / "shards", dst, copy_function=os.link, ignore=shutil.ignore_patterns("replicate_sets"))
        sh([sys.executable, "-m", "data_prep.replicate_sets", str(dst), f"weights={weights}"],
           out / "logs" / "rsets-activity.log")
        stamp.write_text(digest)
        shutil.rmtree(out / "train" / label, ignore_errors=True)     # trained on other weights
        shutil.rmtree(out / "embeddings" / label, ignore_errors=True)
    return dst, rec


# --------------------------------------------------------------------------- report

REFERENCES = ("untrained", "oracle")     # the floor and the ceiling: rows of every table, rivals of no method


def t_half(values) -> float:
    """Half the width of the 95% t-interval of a mean over seeds (NaN for one value)."""
    from scipy import stats

    return float(stats.t.ppf(0.975, len(values) - 1) * stats.sem(values)) if len(values) > 1 else float("nan")


def interval(rows: pd.DataFrame, method: str) -> tuple[float, float]:
    """A summary row's 95% interval: the t-interval over seeds, or one seed's bootstrap over compounds."""
    r = rows.loc[method]
    return (r.ci_lo, r.ci_hi) if r.seeds > 1 else (r.boot_lo, r.boot_hi)


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


REFERENCE_COLOURS = {"cellprofiler": "#7f8c8d", "untrained": "#d5b895", "oracle": "#27ae60"}  # baseline, floor, ceiling


def method_colour(method: str, subject: str = SUBJECT) -> str:
    """A method's colour in every plot: the subject and its variants red, the references their own, others blue."""
    return "#c0392b" if of_subject(method, subject) else REFERENCE_COLOURS.get(method, "#2980b9")


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


DATA_WORDS = {"all": "every training compound",
              "truth_active": "the training compounds the screen's ground truth calls active (an upper bound)",
              "called_active": "the training compounds the first-pass activity call finds (section 3; the others "
                               "left out of the replicate sets)"}


def write_docs(out: Path, results: dict, summary: pd.DataFrame, command: str) -> Path:
    from micon.eval.calibration import ANCHORS, ANCHOR_SOURCE
    from micon.synth import CALIBRATION, PRESETS

    effects = {k: PRESETS[results["preset"]].get(k, v) for k, v in CALIBRATION.items()}   # the preset's own values
    cal = results["calibration"]
    fmt = lambda r: f"{r['mean']:.3f} [{r.ci_lo:.3f}, {r.ci_hi:.3f}]" if r.seeds > 1 else f"{r['mean']:.3f}"  # noqa: E731
    lines = [
        "# Results: does MICON help on a calibrated synthetic screen?", "",
        f"Command: `{command}`  ",
        f"Machine: {results['machine']}  ",
        f"Date: {results['date']}; compute {results['compute_min']['all']:.0f} min in all jobs (comparison "
        f"{results['compute_min']['comparison']:.0f}, ablations {results['compute_min']['ablations']:.0f}, activity "
        f"{results['compute_min']['activity']:.0f}, data preparation {results['compute_min']['prepare']:.0f}), plus "
        f"scoring", "",
        "## 1. Calibration (the CellProfiler-grade baseline only, fixed before any method ran)", "",
        f"Preset `{results['preset']}`: {results['screen']}. Effects (micon.synth.PRESETS): "
        + ", ".join(f"{k}={v}" for k, v in effects.items()) + ".", "",
        f"Anchors: {ANCHOR_SOURCE}.", "",
        "| measure | anchor band | this screen (real jobs, all wells) |", "|---|---|---|",
        *[f"| {k} | {lo if lo is not None else ''} - {hi if hi is not None else ''} | {cal[k]:.3f} |"
          for k, (lo, hi) in ANCHORS.items()],
        f"| nsb_top1 / nss_top1 | 0.085 / 0.012 | {cal['nsb_top1']:.3f} / {cal['nss_top1']:.3f} |",
        f"| source_knn_normalised (after MAD + ZCA) | - | {cal['source_knn_normalised']:.3f} |", "",
        *calibration_record(),
        "## 2. Comparison", "",
        f"Each learned method: {results['steps']} steps, 32 examples per step, seeds {results['seeds']}, from "
        f"scratch (`resnet10t`), trained on {DATA_WORDS[results.get('data', 'all')]}; settings "
        f"`{' '.join(results.get('train_args', []))}`. Mean over seeds with its 95% t-interval in brackets "
        "(bootstrap-over-compounds intervals of the first seed are in results.json). `untrained`: the first "
        "method's network of each seed as initialised; `oracle`: each well's true phenotype (the ceiling; "
        "one value, no seeds). Zero-shot columns (`zs_*`, held-out compounds only): molecule -> well retrieval "
        "from the profile a method predicts from the structure alone. Query sets: see bench/science.py.", "",
    ]
    for split in SPLITS:
        cols = [m for m in METRICS if ((summary.split == split) & (summary.metric == m)).any()]
        lines += [f"### {split}", "", "| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for method in dict.fromkeys(summary.method):
            sub = summary[(summary.method == method) & (summary.split == split)].set_index("metric")
            if len(sub):
                lines.append(f"| {method} | " + " | ".join(fmt(sub.loc[m]) if m in sub.index else "" for m in cols)
                             + " |")
        lines.append("")
    lines += ["![comparison](results/comparison.png)", ""]
    if results.get("activity"):
        a = results["activity"]
        lines += ["## 3. Activity-aware training", "",
                  f"First pass: phenotypic-activity mAP of CellProfiler-grade profiles vs same-plate DMSO (copairs' "
                  f"recipe). The BH rule (corrected p < 0.05) called {a['bh']['called']} of {a['n_compounds']} "
                  f"treated compounds (precision {a['bh']['precision']:.2f}, recall {a['bh']['recall']:.2f}); "
                  f"the call used: {a['rule']}, {a['called']} compounds, precision {a['precision']:.2f}, recall "
                  f"{a['recall']:.2f} against the screen's truth ({a['true_active']} compounds with magnitude > 0). "
                  + ("Every pairing method (MICON, PaCLR, CLIP) trains on the called compounds alone: the others "
                     "get weight 0 in the replicate sets (`./launch.sh rsets SHARDS weights=activity_weights.csv`); "
                     "SimCLR reads every site of the training plates, DMSO included."
                     if results.get("data") == "called_active" else
                     f"Inactive compounds are then used in {a['inactive_weight']:.0%} of their replicate-set samples "
                     f"(`./launch.sh rsets SHARDS weights=activity_weights.csv`). Rows "
                     f"`{variant(results['subject'], 'activity')}` in the tables (first seed)."), ""]
    diagnosis = ROOT / "docs" / "results" / "DIAGNOSIS.md"     # the diagnosis (--ladder, --diagnose), hand-kept
    if diagnosis.is_file():
        lines += [diagnosis.read_text().rstrip(), ""]
    lines += ["## Verdict (computed from the intervals above)", "", *verdict(summary, results["subject"]), ""]
    notes = ROOT / "docs" / "results" / "NOTES.md"      # the hand-written reading, kept across regenerations
    if notes.is_file():
        lines += [notes.read_text().rstrip(), ""]
    path = ROOT / "docs" / "RESULTS.md"
    path.write_text("\n".join(lines) + "\n")
    (ROOT / "docs" / "results").mkdir(exist_ok=True)
    shutil.copy(out / "comparison.png", ROOT / "docs" / "results" / "comparison.png")
    summary.to_csv(ROOT / "docs" / "results" / "summary.csv", index=False)   # what --replot redraws from
    atomic.write_json(ROOT / "docs" / "results" / "results.json", results_json(summary))
    return path


def calibration_record() -> list[str]:
    """The calibration runs of bench/calibrate.py (docs/results/CALIBRATION.md, hand-kept), as lines."""
    path = ROOT / "docs" / "results" / "CALIBRATION.md"
    return [path.read_text().rstrip(), ""] if path.is_file() else []


def screen_description(out: Path) -> str:
    import yaml
    cfg = yaml.safe_load((out / "screen" / "ground_truth" / "config.yaml").read_text())
    splits = json.loads((out / "shards" / "manifest.json").read_text())["splits"]
    return (f"{cfg['n_compounds']} compounds from RDKit's bundled sets, {cfg['replicates']} wells each (one per plate), "
            f"{cfg['n_sources']} sources x {cfg['batches_per_source']} batches x {cfg['plates_per_batch']} plate, "
            f"{cfg['dmso_wells']} DMSO wells per plate, {cfg['sites_per_well']} sites per well at "
            f"{cfg['image_size']} px; held out from training: source {', '.join(splits['heldout_sources'])}, "
            f"batches {', '.join(splits['heldout_batches'])}, {len(splits['heldout_compounds'])} compounds")


# --------------------------------------------------------------------------- diagnosis (issue 19 item 1)

def _ladder_rungs() -> list[tuple[str, dict]]:
    """From an easy screen (calibrated_small's layout, every compound active at full strength, none of the
    calibrated effects; the ordinary microscope effects stay) to calibrated_small itself, switching the
    calibrated effects on one at a time, cumulatively (each rung's synth overrides)."""
    from micon.synth import CALIBRATION as C

    off = dict(active_fraction=1.0, strong_fraction=1.0, well_noise=0.04, source_interaction=0.0,
               source_response=0.0, optics=0.0, stain_gamma=0.0, bleed=0.0, density_source=0.0, density_plate=0.0)
    steps = [("easy", {}),
             ("inactive share", dict(active_fraction=C["active_fraction"], strong_fraction=C["strong_fraction"])),
             ("well noise, source interaction", dict(well_noise=C["well_noise"],
                                                     source_interaction=C["source_interaction"],
                                                     source_response=C["source_response"])),
             ("optics, gamma/bleed, density", dict(optics=C["optics"], stain_gamma=C["stain_gamma"], bleed=C["bleed"],
                                                   density_source=C["density_source"],
                                                   density_plate=C["density_plate"]))]
    rungs, cur = [], dict(off)
    for name, extra in steps:
        cur = {**cur, **extra}
        rungs.append((name, dict(cur)))
    return rungs


def loss_curve(run: Path) -> pd.DataFrame:
    """step, loss, chance (and loss / chance) from a training run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    df = pd.DataFrame([{"step": r["step"], "loss": r["loss/loss"], "chance": r["loss/chance"]} for r in rows])
    return df.assign(ratio=df.loss / df.chance)


def tail_ratio(curve: pd.DataFrame, share: float = 0.2) -> float:
    """Mean loss / chance over the last `share` of the steps (1 = the loss of an encoder that tells nothing apart)."""
    n = max(1, int(len(curve) * share))
    return float(curve.ratio.iloc[-n:].mean())


def train_only(out: Path, name: str, method: str, seed: int, steps: int, shards: Path, extra: list[str]) -> Path:
    """A training run without embedding (its loss curve is the result), skipped when finished."""
    ckpt = out / "train" / name
    if not (ckpt / "final.json").is_file():
        t0 = time.perf_counter()
        sh([sys.executable, "-m", "train.run", "-", f"method={method}", f"data.shards={shards}", f"out={ckpt}",
            f"steps={steps}", f"seed={seed}", "micro_batch=32", f"optim.lr={LR.get(method, 3e-3)}",
            "optim.warmup_steps=20", "data.augment.crop=56", "data.num_workers=1", f"ckpt_every={steps}",
            "data.stream=replicate_sets", "progress=false", "wandb.enabled=false", *TRAIN_ARGS, *extra],
           out / "logs" / f"train-{name}.log")
        log(f"trained {name} ({steps} steps) in {time.perf_counter() - t0:.0f} s")
    return ckpt


def ladder(out: Path, steps: int, method: str = "paclr", seed: int = 0, docs: bool = False) -> dict:
    """The learnability ladder: for each rung (_ladder_rungs) a screen, its shards and a short training run of
    `method`; the result is each rung's loss against its chance level. Writes OUT/ladder.json and ladder.png."""
    py = sys.executable
    result = {}
    for i, (name, synth) in enumerate(_ladder_rungs()):
        rung = out / "ladder" / f"{i}_{''.join(ch if ch.isalnum() else '_' for ch in name)}"
        if not (rung / "screen" / "ground_truth").is_dir():
            log(f"ladder rung {i} ({name}): screen")
            sh([py, "-m", "data_prep.synth", str(rung / "screen"), "preset=calibrated_small", f"seed={seed}",
                *[f"{k}={v}" for k, v in synth.items()]], rung / "logs" / "synth.log")
        if not (rung / "shards" / "manifest.json").is_file():
            sh([py, "-m", "data_prep.ingest", str(rung / "screen"), str(rung / "shards"), "shard_mb=2",
                "heldout_compound_fraction=0"], rung / "logs" / "ingest.log")
        curve = loss_curve(train_only(rung, method, method, seed, steps, rung / "shards", []))
        result[name] = dict(synth=synth, tail_ratio=tail_ratio(curve), first_ratio=float(curve.ratio.iloc[:10].mean()),
                            chance=float(curve.chance.iloc[0]), steps=steps, method=method,
                            curve=curve[["step", "loss", "ratio"]].round(4).to_dict("list"))
        log(f"ladder rung {i} ({name}): loss / chance over the last 20% of {steps} steps {result[name]['tail_ratio']:.3f}")
        atomic.write_json(out / "ladder.json", result)
    plot_curves({k: pd.DataFrame(v["curve"]) for k, v in result.items()}, out / "ladder.png",
                f"Learnability ladder ({method}, calibrated_small layout, effects switched on cumulatively)")
    if docs:
        (ROOT / "docs" / "results").mkdir(exist_ok=True)
        shutil.copy(out / "ladder.png", ROOT / "docs" / "results" / "ladder.png")
    return result


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


def truth_active_shards(out: Path) -> Path:
    """A copy of the shards whose replicate sets hold only the compounds the screen's ground truth calls active
    (magnitude > 0; weight 0 leaves the others out): an upper bound for any activity call."""
    truth = pd.read_csv(out / "screen" / "ground_truth" / "compounds.csv")
    truth = truth[truth.role == schema.TREATED]
    weights = out / "truth_active_weights.csv"
    pd.DataFrame({schema.JCP: truth.Metadata_JCP2022, "weight": (truth.magnitude > 0).astype(float)}).to_csv(
        weights, index=False)
    dst = out / "shards_truth_active"
    if not (dst / "rsets.done").is_file():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(out / "shards", dst, copy_function=os.link, ignore=shutil.ignore_patterns("replicate_sets"))
        sh([sys.executable, "-m", "data_prep.replicate_sets", str(dst), f"weights={weights}"],
           out / "logs" / "rsets-truth-active.log")
        (dst / "rsets.done").write_text("")
    return dst


def diagnose(out: Path, steps: int, preset: str, method: str = "paclr", seed: int = 0, docs: bool = False) -> dict:
    """Does `method` fit, and does what it fits transfer? On `preset`: the untrained network (lr 0), the method
    on every compound and on the ground-truth-active compounds only; their loss against chance and NSB/NSS on
    the training compounds in training plates (`training`) beside the three held-out splits.
    Writes OUT/diagnosis.json, diagnosis_loss.png and diagnosis_retrieval.png (with --docs into docs/results/)."""
    prepare(out, preset)
    splits = json.loads((out / "shards" / "manifest.json").read_text())["splits"]
    runs = {"untrained": (f"{method}_untrained", 1, ["optim.lr=0"], None),
            method: (method, steps, [], None),
            f"{method}_truth_active": (f"{method}_truth_active", steps, [], truth_active_shards(out))}
    path = out / "diagnosis.json"
    res = json.loads(path.read_text()) if path.is_file() else {}
    for label, (name, n, extra, shards) in runs.items():
        emb = train_and_embed(out, name, method, seed, n, extra, shards)
        if label not in res:
            res[label] = dict(scores=score(*profiles(emb), splits, n_boot=500, seed=seed, fit=True), steps=n)
            if n > 1:
                c = loss_curve(out / "train" / name)
                res[label].update(tail_ratio=tail_ratio(c), first_ratio=float(c.ratio.iloc[:10].mean()),
                                  chance=float(c.chance.iloc[0]),
                                  curve=c[["step", "loss", "ratio"]].round(4).to_dict("list"))
            atomic.write_json(path, res)
        s = res[label]["scores"]
        log(f"{label}: NSB top-10 " + ", ".join(f"{k} {v['nsb_top10']:.3f}" for k, v in s.items()))
    plot_curves({k: pd.DataFrame(v["curve"]) for k, v in res.items() if "curve" in v}, out / "diagnosis_loss.png",
                f"{method} on `{preset}`: all compounds vs ground-truth-active compounds only")
    plot_fit_transfer(res, out / "diagnosis_retrieval.png", f"{method} on `{preset}`, seed {seed}")
    if docs:
        (ROOT / "docs" / "results").mkdir(exist_ok=True)
        for f in ("diagnosis_loss.png", "diagnosis_retrieval.png"):
            shutil.copy(out / f, ROOT / "docs" / "results" / f)
    return res


def learning_curve(out: Path, name: str, method: str, seed: int, steps: int, every: int, extra: list[str],
                   shards: Path | None = None, n_boot: int = 200) -> dict:
    """Retrieval against training step: train `method` (checkpoints every `every` steps, all kept) and, while it
    trains, embed each checkpoint in-process and score it on the training split (fit) and the held-out splits
    (transfer); step 0 is the same network as initialised (`untrained:RUN`). Resumable: a finished step is
    never scored again, a killed training resumes from its latest checkpoint. Writes OUT/curves/NAME.json."""
    splits = json.loads((out / "shards" / "manifest.json").read_text())["splits"]
    ckpt = out / "train" / name
    path = out / "curves" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    res = json.loads(path.read_text()) if path.is_file() else {}
    res.update(method=method, seed=seed, steps=steps, every=every, extra=[*TRAIN_ARGS, *extra],
               data=str(shards or out / "shards"))
    res.setdefault("scores", {})
    proc = None
    if not (ckpt / "final.json").is_file():
        args = train_command(out, ckpt, method, seed, steps, shards or out / "shards",
                             ["data.augment.crop=56", f"ckpt_every={every}", "keep_ckpts=0", "wandb.log_every=10",
                              *TRAIN_ARGS, *extra])
        env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "RAY_USAGE_STATS_ENABLED": "0"}
        (out / "logs").mkdir(parents=True, exist_ok=True)
        logf = open(out / "logs" / f"train-{name}.log", "a")
        proc = subprocess.Popen(args, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, env=env)
        log(f"{name}: training {method} for {steps} steps (pid {proc.pid}), scoring every {every}")

    def score_step(label: str, source: str) -> None:
        emb = embed_in_process(out, source, out / "embeddings" / name / label, f"{name}-{label}")
        s = res["scores"][label.removeprefix("step").lstrip("0") or "0"] = score(
            *profiles(emb), splits, n_boot=n_boot, seed=seed, fit=True)
        atomic.write_json(path, res)
        log(f"{name} {label}: NSB top-10 " + ", ".join(f"{k} {v['nsb_top10']:.3f}" for k, v in s.items()))

    while True:
        finished = proc is None or proc.poll() is not None
        latest = ckpt / "checkpoints" / "latest"
        if latest.is_file():
            if "0" not in res["scores"]:      # the run's network as initialised (read from its first checkpoint)
                score_step("step0", f"untrained:{ckpt}")
            last = int(latest.read_text().strip().removeprefix("step"))
            for d in sorted((ckpt / "checkpoints").glob("step*")):
                n = int(d.name.removeprefix("step"))
                if n <= last and str(n) not in res["scores"]:
                    score_step(d.name, str(d))
        if finished:
            break
        time.sleep(20)
    if proc is not None and proc.returncode:
        raise RuntimeError(f"training {name} exited {proc.returncode}; see {out / 'logs' / f'train-{name}.log'}")
    c = loss_curve(ckpt)
    res.update(chance=float(c.chance.iloc[0]), tail_ratio=tail_ratio(c),
               curve=c[["step", "loss", "ratio"]].round(4).to_dict("list"))
    atomic.write_json(path, res)
    return res


def refs(out: Path) -> dict:
    """The reference rows of the learning curves (OUT/curves/refs.json): the CellProfiler-grade baseline and the
    ground-truth oracle, embedded once and scored like every checkpoint."""
    path = out / "curves" / "refs.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    res = json.loads(path.read_text()) if path.is_file() else {}
    splits = json.loads((out / "shards" / "manifest.json").read_text())["splits"]
    for label in ("cellprofiler", "oracle"):
        if label in res:
            continue
        emb = embed_baseline(out) if label == "cellprofiler" else oracle_embedding(out)
        res[label] = score(*profiles(emb), splits, n_boot=200, fit=True)
        atomic.write_json(path, res)
        log(f"{label}: NSB top-10 " + ", ".join(f"{k} {v['nsb_top10']:.3f}" for k, v in res[label].items()))
    return res


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/science")
    ap.add_argument("--preset", default="calibrated")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--subject", default=SUBJECT, choices=METHODS,
                    help="the method the comparison asks about: its ablations, its activity-aware run, the verdict")
    ap.add_argument("--parts", nargs="+", default=["comparison", "ablations"],
                    help="comparison, ablations (the subject's variants, first seed), variants (the --variants "
                         "ablations over every seed), activity (the subject on all compounds with the uncalled ones "
                         "in --inactive-weight of their samples)")
    ap.add_argument("--variants", nargs="+", default=[], choices=list(ABLATIONS),
                    help="ablations run over every --seeds (part `variants`), e.g. simclr_init")
    ap.add_argument("--ablations", nargs="+", default=[n for n in ABLATIONS if n not in NEEDS_RUNS],
                    choices=list(ABLATIONS), help="which of the subject's variants the ablations part runs (first "
                                                  f"seed); {', '.join(NEEDS_RUNS)} only when named")
    ap.add_argument("--inactive-weight", type=float, default=0.25)
    ap.add_argument("--train-args", nargs="*", default=[],
                    help="key=value for every training run, e.g. on a GPU: model.preset=resnet50 micro_batch=256 "
                         "data.augment.crop=224 data.num_workers=8 (with --preset small --steps 20000)")
    ap.add_argument("--docs", action="store_true", help="write docs/RESULTS.md and docs/results/*.png")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw comparison.png from stored numbers (OUT/summary.csv, else docs/results/summary.csv, "
                         "else docs/RESULTS.md's tables); with --docs into docs/results/")
    ap.add_argument("--ladder", type=int, metavar="STEPS", default=0,
                    help="only the learnability ladder (diagnosis): a PaCLR run of STEPS steps per rung, its loss "
                         "against chance (OUT/ladder.json, ladder.png; with --docs docs/results/ladder.png)")
    ap.add_argument("--diagnose", type=int, metavar="STEPS", default=0,
                    help="only the diagnosis on --preset: PaCLR (STEPS steps) on every compound and on the truly "
                         "active ones, and the untrained network, scored on the training split beside the held-out "
                         "ones (OUT/diagnosis.json, diagnosis_*.png)")
    ap.add_argument("--lanes", type=int, default=1,
                    help="trainings at once, each with cores / lanes threads unless OMP_NUM_THREADS says (on a CPU "
                         "machine one lane per core: torch's threads spin-wait on busy cores)")
    ap.add_argument("--curve", type=int, metavar="STEPS", default=0,
                    help="only learning curves on --preset: each of --methods x --seeds trained for STEPS steps, every "
                         "--every-th checkpoint scored on the training and held-out splits (OUT/curves/*.json, "
                         "learning_curves.png)")
    ap.add_argument("--every", type=int, default=250, help="--curve: score a checkpoint every this many steps")
    ap.add_argument("--label", default="", help="--curve: a suffix naming the runs (their settings)")
    ap.add_argument("--data", choices=["all", "truth_active", "called_active"], default="called_active",
                    help="the training compounds of the pairing methods (comparison and --curve): replicate sets of "
                         "every compound, of the ground-truth-active ones only, or of "
                         "those the first-pass activity call (CellProfiler-grade profiles) finds")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, a.lanes))))
    if a.curve:
        TRAIN_ARGS[:] = a.train_args
        out = Path(a.out).resolve()
        prepare(out, a.preset)
        refs(out)
        shards, rec = training_shards(out, a.data)
        if rec:
            atomic.write_json(out / "curves" / "activity_call.json", rec)
        names = []
        for seed in a.seeds:
            for m in a.methods:
                name = "_".join(filter(None, [m, a.data if a.data != "all" else "", a.label, f"seed{seed}"]))
                learning_curve(out, name, m, seed, a.curve, a.every, [], shards)
                names.append(name)
        plot_learning_curves(out, names, out / f"learning_curves_{a.label or 'runs'}.png")
        return 0
    if a.ladder:
        TRAIN_ARGS[:] = a.train_args
        res = ladder(Path(a.out).resolve(), a.ladder, seed=a.seeds[0], docs=a.docs)
        for name, r in res.items():
            print(f"{name:20s} loss/chance first 10 steps {r['first_ratio']:.3f}  last 20% {r['tail_ratio']:.3f}")
        return 0
    if a.diagnose:
        TRAIN_ARGS[:] = a.train_args
        res = diagnose(Path(a.out).resolve(), a.diagnose, a.preset, seed=a.seeds[0], docs=a.docs)
        for label, r in res.items():
            print(label, {k: round(v.get("nsb_top10", float("nan")), 3) for k, v in r["scores"].items()},
                  f"loss/chance {r.get('tail_ratio', float('nan')):.3f}")
        return 0
    if a.replot:
        log(f"wrote {replot(Path(a.out).resolve(), a.docs, a.subject)}")
        return 0
    TRAIN_ARGS[:] = a.train_args
    t0 = time.perf_counter()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prepare(out, a.preset)
    splits = json.loads((out / "shards" / "manifest.json").read_text())["splits"]
    scores_path = out / "scores.json"
    scores = json.loads(scores_path.read_text()) if scores_path.is_file() else {}

    def scored(label: str, emb: Path, profiles_=None, method: str = "") -> None:
        if label not in scores:
            scores[label] = score(*(profiles_ or profiles(emb)), splits)
            scores_path.write_text(json.dumps(scores, indent=1))
            s = scores[label]["heldout_batches"]
            log(f"{label}: held-out batches NSB top-10 {s['nsb_top10']:.3f}, NSS top-10 {s['nss_top10']:.3f}")
        held = scores[label].get("heldout_compounds", {})
        if method and "zs_well_top1pct" not in held and (z := zero_shot(out, label.replace("@", "_seed"), method, emb)):
            held.update(z)
            scores_path.write_text(json.dumps(scores, indent=1))
            log(f"{label}: zero-shot on held-out compounds, top-1% of wells {z['zs_well_top1pct']:.3f} (chance "
                f"{z['zs_well_top1pct_chance']:.3f}), compound top-1 {z['zs_compound_top1']:.3f}")

    from micon.eval.calibration import levels
    hc = profiles(embed_baseline(out))
    scored("cellprofiler", out / "embeddings" / "cellprofiler", hc)
    calibration = levels(*hc)
    scored("oracle", oracle_embedding(out))
    train_shards, activity = training_shards(out, a.data, hc)     # --data: which compounds the replicate sets hold
    jobs = []
    if "comparison" in a.parts:
        jobs += [(f"{m}@{s}", m, s, []) for s in a.seeds for m in a.methods]
    if "ablations" in a.parts:
        jobs += [(variant(a.subject, name), a.subject, a.seeds[0], overrides(name, out, a.seeds[0]))
                 for name in a.ablations]
    if "variants" in a.parts:       # ablations over every seed, labelled VARIANT@SEED like the comparison's methods
        jobs += [(f"{variant(a.subject, name)}@{s}", a.subject, s, overrides(name, out, s))
                 for s in a.seeds for name in a.variants]
    # --lanes: that many trainings at once (one thread each: on a CPU machine, one lane per core); scored in order
    from concurrent.futures import ThreadPoolExecutor

    def run(i: int, job: tuple) -> Path:
        label, method, seed, extra = job
        log(f"[{i + 1}/{len(jobs)}] {label}")
        return train_and_embed(out, label.replace("@", "_seed"), method, seed, a.steps, extra, train_shards)

    with ThreadPoolExecutor(max(1, a.lanes)) as pool:
        embedded = [pool.submit(run, i, job) for i, job in enumerate(jobs)]
        for (label, method, seed, extra), fut in zip(jobs, embedded):
            name = label.replace("@", "_seed")
            scored(label, fut.result(), method=method)
            first = f"{a.methods[0]}_seed{seed}"
            if name == first:      # the floor: the same network as initialised, never updated (per seed)
                scored(f"untrained@{seed}", embed_in_process(out, f"untrained:{out / 'train' / first}",
                                                             out / "embeddings" / f"untrained_seed{seed}",
                                                             f"untrained_seed{seed}"))
    if "activity" in a.parts:
        label = variant(a.subject, "activity")
        shards, activity = activity_shards(out, hc, a.inactive_weight, label)
        activity["inactive_weight"] = a.inactive_weight
        log(f"activity call: {activity}")
        scored(label, train_and_embed(out, label, a.subject, a.seeds[0], a.steps, [], shards))
    summary = summarise(scores)
    summary.to_csv(out / "summary.csv", index=False)
    plot(summary, out / "comparison.png", a.subject)
    import platform
    times = json.loads((out / "stage_seconds.json").read_text())
    part = lambda keys: sum(v for k, v in times.items() if any(k.endswith(x) or x in k for x in keys)) / 60  # noqa: E731
    compute = dict(all=sum(times.values()) / 60,
                   comparison=part([f"-{m}_seed" for m in a.methods]),
                   ablations=part([variant(a.subject, n) for n in ABLATIONS]),
                   activity=part([variant(a.subject, "activity"), "rsets-activity"]),
                   prepare=part(["synth", "ingest", "featurize", "embed-cellprofiler"]))
    results = dict(subject=a.subject, data=a.data, train_args=merged([*RECIPE, *TRAIN_ARGS]), compute_min=compute, preset=a.preset, seeds=a.seeds, steps=a.steps, calibration=calibration, activity=activity,
                   scores=scores, date=time.strftime("%Y-%m-%d"), wall_min=(time.perf_counter() - t0) / 60,
                   machine=f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), no GPU, "
                           f"Python {platform.python_version()}",
                   screen=screen_description(out))
    atomic.write_json(out / "results.json", results, default=float)   # strict: undefined values as null
    print(summary[summary.metric.isin(["nsb_top10", "nss_top10", "map_activity", "source_knn"])].to_string(index=False))
    if a.docs:
        path = write_docs(out, results, summary, "python bench/science.py " + " ".join(argv or sys.argv[1:]))
        log(f"wrote {path}")
    log(f"done in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
