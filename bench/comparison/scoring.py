"""Scoring an embedding as `evaluate` profiles it: the three held-out query sets, NSB/NSS top-k, mAP of
activity and consistency, source kNN, bootstrap intervals over compounds; the summary over seeds and the
numbers docs/RESULTS.md stores (and reading them back)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from micon import schema

from .design import METRICS, SPLITS


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


def t_half(values) -> float:
    """Half the width of the 95% t-interval of a mean over seeds (NaN for one value)."""
    from scipy import stats

    return float(stats.t.ppf(0.975, len(values) - 1) * stats.sem(values)) if len(values) > 1 else float("nan")


def interval(rows: pd.DataFrame, method: str) -> tuple[float, float]:
    """A summary row's 95% interval: the t-interval over seeds, or one seed's bootstrap over compounds."""
    r = rows.loc[method]
    return (r.ci_lo, r.ci_hi) if r.seeds > 1 else (r.boot_lo, r.boot_hi)
