"""Evaluate site embeddings the way the field does (a thin shell over micon.eval): well profiles,
per-plate robust normalisation against DMSO, ZCA-cor whitening fitted on DMSO, NSB/NSS/NSP top-k
replicate retrieval (Ray tasks over query blocks) and copairs-style mAP; writes per method the raw and
normalised profiles as pycytominer reads them, metrics.json (strict JSON), a markdown report with PNG
plots (intervals, chance levels), and logs them to wandb with the embeddings and checkpoints read, as
artifact use (micon.wandb_runs).

    ./launch.sh evaluate out=DIR embeddings.micon=DIR embeddings.simclr=DIR ... [key=value ...]

out= and the embedding directories may be in object storage (s3://...): the outputs are written locally and
uploaded object by object, metrics.json last.
"""
from __future__ import annotations

import io
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Annotated
from pathlib import Path

import numpy as np
import pandas as pd

from micon import atomic, schema, storage
from micon.config import ConfigError, PositiveFloat, PositiveInt, Range, load_config, save_config, to_dict
from micon.eval.profiles import ProfileError
from micon.tables import markdown_table


def headline(max_k: int, null: bool = True) -> tuple[str, ...]:
    """The report's columns; top-k columns are named by their k; `null`: with mAP of activity over the DMSO null."""
    return ("nr_top1", "nsb_top1", f"nsb_top{max_k}", "nss_top1", f"nss_top{max_k}", "nsl_top1", "map_activity",
            *(("map_activity_over_null",) if null else ()), "fraction_retrieved")


@dataclass
class EvalConfig:
    out: str = "runs/eval"           # metrics.json, report.md, plots and profiles
    embeddings: dict[str, str] = field(default_factory=dict)   # method name -> embed output directory
    predictions: dict[str, str] = field(default_factory=dict)  # label -> predict output (zero-shot scores)
    aggregate: str = "mean"          # site -> well: mean | median
    profiles: dict[str, str] = field(default_factory=dict)     # method name -> well-level profile table (parquet/CSV)
    features: dict[str, str] = field(default_factory=dict)     # method name -> its feature columns (names or globs, comma-separated)
    recipe: str = "micon"            # micon | jump | morphohelm (micon.eval.recipes)
    normalize: bool = True           # recipe=micon: per-plate robust MAD against DMSO
    spherize: bool = True            # recipe=micon: ZCA-cor fitted on DMSO wells
    epsilon: PositiveFloat = 1e-6    # ZCA regulariser
    harmony_key: str = "Metadata_Source"   # recipe=jump: the batch Harmony corrects (JUMP: the source)
    harmony_clusters: Annotated[int, Range(0, why="0: JUMP's 300")] = 0  # recipe=jump (0: 300, at most one per 30 wells)
    n_pcs: PositiveInt = 64          # recipe=morphohelm: principal components kept
    max_k: PositiveInt = 10          # top-k retrieval for k = 1..max_k
    compounds: str = "all"           # all | heldout (held-out compounds of the shard manifest only)
    shards: str = ""                 # manifest dir (for compounds=heldout)
    null_size: PositiveInt = 10000   # random rankings in mAP's null distribution
    annotation: str = ""             # a compound annotation column (e.g. Metadata_Target): consistency mAP on consensus profiles
    annotations: str = ""            # a table (parquet/CSV) of Metadata_JCP2022 + the annotation column, joined onto the wells
    well_consistency: bool = True    # mAP of each well against other compounds' wells (cost: wells^2; off at consortium size)
    activity_null: bool = True       # mAP of activity of DMSO itself (half of each plate's DMSO as pseudo-compounds)
    bootstrap: Annotated[int, Range(2, why="1000 for the report")] = 1000  # resamples of compounds for the report's intervals
    ray: bool = True                 # top-k over Ray tasks (same numbers as single-process)
    plates_without_dmso: str = "stop"   # stop | drop (their wells) | batch (against the batch's, else source's DMSO)
    wandb: bool = True               # log metrics and plots to wandb (offline by default)
    wandb_project: str = "micon"     # wandb project
    wandb_group: str = ""            # wandb group ("" = the embed or training run's group, else out's parent folder)
    wandb_name: str = ""             # wandb run name ("" = out's name)
    wandb_tags: str = ""             # comma-separated wandb tags (evaluate is always one)

    def validate(self) -> None:
        if not self.embeddings and not self.predictions and not self.profiles:
            raise ConfigError("nothing to evaluate: pass embeddings.NAME=DIR (one per method) or "
                              "profiles.NAME=FILE (a well-level table)")
        from micon.eval.recipes import RECIPES
        if self.recipe not in RECIPES:
            raise ConfigError(f"recipe: one of {', '.join(RECIPES)}")
        if both := sorted(set(self.embeddings) & set(self.profiles)):
            raise ConfigError(f"{both[0]} names both embeddings and profiles: give each method one name")
        if extra := sorted(set(self.features) - set(self.profiles)):
            raise ConfigError(f"features.{extra[0]} names no profiles.{extra[0]}=FILE")
        if self.aggregate not in ("mean", "median"):
            raise ConfigError("aggregate: mean or median")
        if self.compounds not in ("all", "heldout"):
            raise ConfigError("compounds: all or heldout")
        if self.plates_without_dmso not in ("stop", "drop", "batch"):
            raise ConfigError("plates_without_dmso: stop, drop or batch")
        if self.compounds == "heldout" and not self.shards:
            raise ConfigError("compounds=heldout needs shards=DIR (the manifest that names them)")


def check_label(name: str, path: str) -> None:
    """A label must name the method that made the embeddings (a suffix is fine: micon_seed1)."""
    info_path = storage.path(path) / "embed.json"
    made_by = json.loads(info_path.read_text()).get("method") if info_path.is_file() else None
    if made_by and not name.startswith(made_by):
        from micon.eval.featurisers import FEATURISERS
        from micon.methods import METHODS
        known = ", ".join([*METHODS, *FEATURISERS])
        raise ProfileError(f"label {name!r} does not name the method that made {path} ({made_by}); write "
                           f"embeddings.{made_by}={path} (a suffix such as {made_by}_seed1 is fine). Methods: {known}")


def _say(msg: str) -> None:
    print(f"evaluate: {msg}", flush=True)


def recipe_options(cfg: EvalConfig) -> dict:
    """`apply_recipe`'s keyword arguments from the configuration."""
    return dict(normalize=cfg.normalize, whiten=cfg.spherize, epsilon=cfg.epsilon,
                plates_without_dmso=cfg.plates_without_dmso, harmony_key=cfg.harmony_key,
                harmony_clusters=cfg.harmony_clusters, n_pcs=cfg.n_pcs)


def load_method(name: str, path: str, cfg: EvalConfig) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """A method's site (or well) rows, features and feature names: an embed output directory
    (embeddings.NAME=DIR) or a well-level profile table (profiles.NAME=FILE)."""
    if name in cfg.profiles:
        from micon.eval.profiles import read_profile_table
        return read_profile_table(path, cfg.features.get(name) or None)
    from micon.embeddings import load_embeddings, read_feature_names

    check_label(name, path)
    meta, emb = load_embeddings(path)
    return meta, emb, read_feature_names(path) or [f"{name}_{i:04d}" for i in range(emb.shape[1])]


def evaluate_method(name: str, path: str, cfg: EvalConfig, keep_compounds: set | None, say=_say) -> dict:
    """One method: well profiles under `cfg.recipe`, top-k (with per-query hits, curves with intervals and
    chance) and mAP; `say` gets one line per stage (and per recipe step) with its counts and seconds."""
    from micon.eval import map as mapm
    from micon.eval.plots import map_intervals, topk_curves
    from micon.eval.profiles import aggregate_wells, check_finite
    from micon.eval.recipes import apply_recipe
    from micon.eval.retrieval import topk_hit_rate, topk_hit_rate_ray

    t0 = time.perf_counter()
    meta, emb, names = load_method(name, path, cfg)
    if name in cfg.profiles:        # a CellProfiler table's NaN columns are dropped, as JUMP's recipe does
        finite = np.isfinite(emb).all(axis=0)
        if not finite.all():
            say(f"{name}: {int((~finite).sum())} feature(s) with NaN or inf dropped, e.g. "
                f"{[n for n, f in zip(names, finite) if not f][:3]}")
            emb, names = emb[:, finite], [n for n, f in zip(names, finite) if f]
    check_finite(meta, emb, "site embeddings" if name in cfg.embeddings else "profiles",
                 "as embedded" if name in cfg.embeddings else "as read")
    wells, raw = aggregate_wells(meta, np.asarray(emb).astype(np.float32), method=cfg.aggregate)
    say(f"{name}: {len(meta):,} {'sites' if len(meta) > len(wells) else 'rows'} -> {len(wells):,} wells x "
        f"{raw.shape[1]} features in {time.perf_counter() - t0:.1f} s; recipe={cfg.recipe}")
    rec = apply_recipe(cfg.recipe, wells, raw, names, say=lambda m: say(f"{name}: {m}"), **recipe_options(cfg))
    wells, raw, prof = rec.wells, rec.raw, rec.prof
    if keep_compounds is not None:
        keep = (wells[schema.ROLE] == schema.NEGCON).to_numpy() | wells[schema.JCP].isin(keep_compounds).to_numpy()
        wells, raw, prof = wells[keep].reset_index(drop=True), raw[keep], prof[keep]
    say(f"{name}: profiles: {len(wells):,} wells x {prof.shape[1]} features (recipe={cfg.recipe}) in "
        f"{time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    fn = topk_hit_rate_ray if cfg.ray else topk_hit_rate
    ks = range(1, cfg.max_k + 1)
    topk, per_query = fn(wells, prof, ks=ks, modes=STRINGENCIES, per_query=True, progress=True)
    curves = topk_curves(per_query, STRINGENCIES, ks, n_boot=cfg.bootstrap)
    say(f"{name}: top-k: {len(per_query):,} query wells against {len(wells):,} wells, k <= {cfg.max_k}, "
        f"{cfg.bootstrap} bootstrap resamples, in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    roles = wells[schema.ROLE].to_numpy()
    used = np.isin(roles, [schema.TREATED, schema.POSCON, schema.NEGCON])
    act_wells, act_prof = wells[used].reset_index(drop=True), prof[used]
    act_ap, act_map = mapm.phenotypic_activity(act_wells, act_prof, null_size=cfg.null_size, progress=True)
    consistency = {"map_consistency": float("nan")}
    if cfg.well_consistency:
        _, con_map = mapm.phenotypic_consistency(act_wells, act_prof, null_size=cfg.null_size, progress=True)
        consistency["map_consistency"] = float(con_map["mean_average_precision"].mean())
    if cfg.annotation:
        consistency |= annotation_consistency(name, act_wells, act_prof, cfg, say)
    say(f"{name}: mAP: {len(act_map):,} compounds (activity, against their plates' DMSO)"
        + (f", {len(con_map):,} (well consistency)" if cfg.well_consistency else "")
        + (f", {consistency.get('n_annotations', 0):,} annotations (consistency on consensus profiles)"
           if cfg.annotation else "") + f", null size {cfg.null_size:,}, in {time.perf_counter() - t0:.1f} s")
    null = activity_null(name, wells, raw, cfg, len(rec.names), say, names) if cfg.activity_null else {}
    null_reason = null.pop("null_reason", "")

    point = curves.set_index(["mode", "k"])
    metrics = {}
    for mode in STRINGENCIES:
        for k in (1, cfg.max_k):
            r = point.loc[(mode, k)]
            metrics |= {f"{mode}_top{k}": float(r["value"]), f"{mode}_top{k}_lo": float(r["lo"]),
                        f"{mode}_top{k}_hi": float(r["hi"]), f"{mode}_top{k}_chance": float(r["chance"])}
    metrics |= map_intervals(act_ap, act_map, n_boot=cfg.bootstrap)
    metrics |= consistency
    metrics |= dict(
        n_wells=int(len(wells)), **{f"n_queries_{mode}": int(topk[f"n_queries_{mode}"].iloc[0]) for mode in STRINGENCIES},
        dim=int(emb.shape[1]), n_features_kept=len(rec.names),
        n_negcon_wells=int((roles == schema.NEGCON).sum()), **null,
    )
    return dict(metrics=metrics, topk=topk.assign(method=name), curves=curves.assign(method=name),
                map=act_map.assign(method=name), wells=wells, raw=raw, prof=prof, recipe=rec, null_reason=null_reason,
                raw_names=list(names), kept_names=list(rec.names))


# replicate retrieval's stringencies (micon.eval.retrieval.MODES): no restriction, not same batch / source / plate,
# not same layout position (MorphoHELM's NR, NSB, NSS, NSL; NSP the MICON paper's)
STRINGENCIES = ("nr", "nsb", "nss", "nsp", "nsl")
# ZCA fitted on fewer DMSO wells than this per feature biases mAP of activity (docs/results/ACTIVITY.md)
WELLS_PER_FEATURE = 4
NULL_REPEATS = 5        # random halvings of the DMSO wells averaged in the DMSO null


def activity_null(name: str, wells: pd.DataFrame, raw: np.ndarray, cfg: EvalConfig, n_features: int, say=_say,
                  names: list[str] | None = None) -> dict:
    """mAP of activity's DMSO null (micon.eval.activity.negcon_null, the evaluation's own recipe) as metrics;
    says, with a warning, when the screen has too few DMSO wells per feature to read mAP against chance."""
    from micon.eval.activity import negcon_null, null_summary

    names = names or [f"f{i:04d}" for i in range(raw.shape[1])]
    t0 = time.perf_counter()
    try:
        compounds, null = negcon_null(wells, raw, repeats=NULL_REPEATS, null_size=cfg.null_size,
                                      normalise=lambda w, r: recipe_profiles(cfg, w, r, names))
    except ValueError as e:         # too few DMSO wells for one pseudo-compound, or to refit on: no null, n/a
        say(f"{name}: no DMSO null for mAP of activity: {e}")
        return dict(map_activity_null=float("nan"), map_activity_over_null=float("nan"), null_reason=str(e))
    out = null_summary(compounds, null, n_boot=cfg.bootstrap)
    n_neg = int((wells[schema.ROLE] == schema.NEGCON).sum())
    say(f"{name}: DMSO null: {out['n_null_compounds']} pseudo-compounds from half of each plate's DMSO "
        f"({NULL_REPEATS} random halvings) reach mAP of activity "
        f"{out['map_activity_null']:.3f}; compounds under the same fit {out['map_activity_over_null']:+.3f} "
        f"above it, in {time.perf_counter() - t0:.1f} s")
    if cfg.recipe == "micon" and cfg.spherize and n_neg < WELLS_PER_FEATURE * n_features:
        say(f"{name}: warning: ZCA is fitted on {n_neg:,} DMSO wells for {n_features:,} features (fewer than "
            f"{WELLS_PER_FEATURE} per feature): a compound without effect does not reach mAP of activity's "
            f"random-ranking chance here but the DMSO null; read map_activity_over_null, not map_activity "
            f"against chance (docs/results/ACTIVITY.md)")
    return out


def annotation_consistency(name: str, wells: pd.DataFrame, prof: np.ndarray, cfg: EvalConfig, say=_say) -> dict:
    """Consistency mAP on consensus profiles (micon.eval.consistency.target_consistency) by `cfg.annotation`, from
    the wells' own column or the `cfg.annotations` table: `map_target_consistency`, `n_annotations`."""
    from micon.eval.consistency import target_consistency

    col = cfg.annotation
    if cfg.annotations:
        from micon.eval.profiles import read_annotations
        table = read_annotations(cfg.annotations, col)
        wells = wells.drop(columns=[col], errors="ignore").merge(table, on=schema.JCP, how="left")
    if col not in wells.columns or not wells[col].notna().any():
        say(f"{name}: no {col} annotation on any well: no consistency on consensus profiles (pass annotations=FILE)")
        return dict(map_target_consistency=float("nan"), n_annotations=0)
    _, tmap = target_consistency(wells, prof, col, null_size=cfg.null_size)
    return dict(map_target_consistency=float(tmap["mean_average_precision"].mean()) if len(tmap) else float("nan"),
                n_annotations=int(len(tmap)))


def recipe_profiles(cfg: EvalConfig, wells: pd.DataFrame, raw: np.ndarray, names: list[str]):
    """(wells, raw, normalised profiles) under the configured recipe: what `negcon_null` refits."""
    from micon.eval.recipes import apply_recipe

    rec = apply_recipe(cfg.recipe, wells, raw, names, **recipe_options(cfg))
    return rec.wells, rec.raw, rec.prof


def score_predictions(name: str, path: str, keep_compounds: set | None, max_k: int) -> dict:
    """Zero-shot scores of a predict output (OUT/predicted_profiles.parquet against OUT/well_profiles.parquet,
    the treated wells in the same space): molecule -> well retrieval among `keep_compounds` (the held-out
    compounds; all when None), micon.eval.zeroshot."""
    from micon.eval.zeroshot import zero_shot_retrieval

    files = [storage.path(path) / "predicted_profiles.parquet", storage.path(path) / "well_profiles.parquet"]
    for f in files:
        if not f.is_file():
            raise ProfileError(f"predictions.{name}: no {f}; run ./launch.sh predict CKPT COMPOUNDS {path} "
                               f"shards=SHARDS embeddings=DIR (embeddings= writes the wells)")
    pred, wells = (pd.read_parquet(io.BytesIO(storage.read_bytes(f))) for f in files)
    wells = wells[wells[schema.ROLE] == schema.TREATED]
    if keep_compounds is not None:
        pred, wells = pred[pred[schema.JCP].isin(keep_compounds)], wells[wells[schema.JCP].isin(keep_compounds)]
    feats = [c for c in pred.columns if not c.startswith("Metadata_")]
    metrics, _ = zero_shot_retrieval(pred[schema.JCP].to_numpy(), pred[feats].to_numpy(), wells[schema.JCP].to_numpy(),
                                     wells[feats].to_numpy(), ks=sorted({1, 5, max_k}))
    return metrics


def write_profiles(out: Path, name: str, result: dict) -> tuple[Path, Path]:
    """Two tables per method, as the field reads them (pycytominer, copairs: no mapping step):
    `profiles_{name}_raw.parquet`, the well averages before normalisation (every feature), and
    `profiles_{name}.parquet`, the normalised profiles the metrics were computed on (under the recipe, whose
    account is the file's `micon.recipe` key-value metadata; every fitted parameter is in `recipe_{name}.npz`;
    recipe=micon keeps the features that vary across DMSO, after per-plate MAD and ZCA-cor). Metadata as JUMP spells it, the role as
    `Metadata_pert_type` (trt / negcon / poscon). Feature columns keep the featuriser's names (embed.json
    `feature_names`, e.g. CellProfiler's) or are `{name}_{i:04d}`. In the normalised file each column keeps
    its input feature's name although whitening mixes features, as pycytominer's Spherize does: column j
    is the whitened variable paired with input feature j, and ZCA-cor is the whitening that keeps those
    pairs most alike (it maximises the sum over j of corr(whitened j, input j), Kessy et al. 2018); it is
    not feature j itself."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from micon import atomic
    from micon.eval.profiles import profile_table

    rec = result["recipe"]
    summary = json.dumps(strict_json(rec.summary())).encode()
    paths = []
    for suffix, feats, names in (("_raw", result["raw"], result["raw_names"]), ("", result["prof"], result["kept_names"])):
        path = out / f"profiles_{name}{suffix}.parquet"
        table = pa.Table.from_pandas(profile_table(result["wells"], feats, names), preserve_index=False)
        if not suffix:      # the recipe travels with the profiles it made
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"micon.recipe": summary})
        with atomic.atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        paths.append(path)
    # every fitted parameter (per-plate medians and MADs, the whitening or PCA), beside the profiles
    with atomic.atomic_path(out / f"recipe_{name}.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, features_in=np.asarray(result["raw_names"], dtype=str),
                                features_out=np.asarray(result["kept_names"], dtype=str), **rec.arrays)
    return paths[0], paths[1]


def strict_json(value):
    """NaN and inf (an undefined metric: NSS with one source) become null, so that the file is strict JSON."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _cell(m: dict, key: str) -> str:
    v, lo, hi = m.get(key), m.get(f"{key}_lo"), m.get(f"{key}_hi")
    if v is None or not np.isfinite(v):
        return "n/a"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None and np.isfinite(lo) and np.isfinite(hi) else f"{v:.3f}"


def zero_shot_section(zero_shot: dict, cfg: EvalConfig) -> str:
    """The report's zero-shot table (empty when no predictions were scored)."""
    if not zero_shot:
        return ""
    cols = ["zs_well_top1pct", "zs_well_top1", f"zs_well_top{cfg.max_k}", "zs_compound_top1",
            f"zs_compound_top{cfg.max_k}"]
    rows = [{"predictions": n, **{c.removeprefix("zs_"): f"{z[c]:.3f} (chance {z[c + '_chance']:.3f})" for c in cols},
             "queries": z["n_queries"], "wells": z["n_wells"]} for n, z in zero_shot.items()]
    where = "the held-out compounds of " + cfg.shards if cfg.shards else "every compound"
    return "\n".join(["## Zero-shot retrieval (molecule -> well)", "",
                      f"Profiles predicted from each compound's structure alone (./launch.sh predict) rank the treated "
                      f"wells of {where} (cosine, in the method's prediction space); a query hits when a well of its "
                      f"compound is within the first 1% (top1pct, as CLOOME and MolPhenix report) or k wells, or its "
                      f"compound's mean well profile within the first k compounds.", "", markdown_table(rows), ""])


def write_report(out: Path, results: dict, cfg: EvalConfig, zero_shot: dict | None = None) -> Path:
    from micon.eval import plots

    pd.concat([r["topk"] for r in results.values()], ignore_index=True).to_csv(out / "topk.csv", index=False)
    curves = pd.concat([r["curves"] for r in results.values()], ignore_index=True)
    curves.to_csv(out / "topk_curves.csv", index=False)
    summary = pd.DataFrame([dict(method=n, **r["metrics"]) for n, r in results.items()])
    summary.to_csv(out / "summary.csv", index=False)
    pngs = [plots.plot_topk_curves(curves, out / "topk_curves.png", modes=("nr", "nsb", "nss", "nsl")),
            plots.plot_map_summary(summary, out / "map_fraction_retrieved.png",
                                   columns=("map_activity", "fraction_retrieved")
                                   + (("map_activity_over_null",) if cfg.activity_null else ()))]
    for name, r in results.items():
        pngs.append(plots.plot_profiles_pca(r["wells"], r["raw"], r["prof"], out / f"profiles_pca_{name}.png",
                                            titles=(f"{name}: raw well profiles (features z-scored)",
                                                    f"{name}: normalised (recipe={cfg.recipe})")))
    k = cfg.max_k
    cols = headline(k, cfg.activity_null)
    rows = [{"method": n, **{c: _cell(r["metrics"], c) for c in cols}} for n, r in results.items()]
    chance = [{"method": n, **{c: _cell(r["metrics"], f"{c}_chance") for c in cols}}
              for n, r in results.items()]
    if all({k_: v for k_, v in row.items() if k_ != "method"} == {k_: v for k_, v in chance[0].items() if k_ != "method"}
           for row in chance):      # the methods share their wells: one chance row for all
        chance = [{"method": "every method", **{c: v for c, v in chance[0].items() if c != "method"}}]
    recipe = {"micon": (f"{'per-plate robust MAD vs DMSO, ' if cfg.normalize else ''}"
                        f"{'ZCA-cor whitening fitted on DMSO (epsilon ' + str(cfg.epsilon) + '), ' if cfg.spherize else ''}"),
              "jump": ("JUMP's recipe (variant features, per-plate MAD vs DMSO, rank-based inverse normal transform, "
                       f"feature selection, Harmony on {cfg.harmony_key}), "),
              "morphohelm": (f"MorphoHELM's recipe (per-plate centre-scale, PCA to {cfg.n_pcs}, per-plate MAD vs "
                             "DMSO, no sphering), ")}[cfg.recipe]
    lines = ["# Replicate retrieval report", "",
             f"Well profiles ({cfg.aggregate} of sites), recipe={cfg.recipe}: {recipe}cosine similarity. Top-k: "
             f"share of treated query wells with a well of the same compound among the k nearest wells (MorphoHELM's "
             f"Recall@k): NR with no restriction; NSB / NSS / NSP with candidates from the query's own batch / source "
             f"/ plate removed; NSL with candidates at the query's well position removed. mAP: copairs semantics, "
             f"activity = replicate wells vs their plates' DMSO; fraction retrieved = share of compounds with "
             f"BH-corrected p < 0.05. In brackets: 95% bootstrap interval over compounds ({cfg.bootstrap} "
             f"resamples); n/a: undefined (e.g. NSS with a single source).", "", markdown_table(rows), ""]
    lines += coincident_stringencies(results)
    lines += ["Chance (a random ranking of each query's candidates; fraction retrieved: the test's level; mAP over "
              "the DMSO null: 0, what a compound without effect reaches):", "", markdown_table(chance), ""]
    if cfg.activity_null:
        lines += [null_section(results, whitened=cfg.recipe == "micon" and cfg.spherize), ""]
    lines += ["Profiles: `profiles_{method}_raw.parquet` (well averages) and `profiles_{method}.parquet` (normalised), "
             "Metadata_* as JUMP spells them, role in `Metadata_pert_type`.", ""]
    if zero_shot:
        lines += [zero_shot_section(zero_shot, cfg)]
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in pngs]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def coincident_stringencies(results: dict) -> list[str]:
    """Report lines for stringencies that exclude the same candidates here (NSP = NSB when every batch
    has one plate), so a reader does not take two equal columns for two findings."""
    lines = []
    for a, b, why in (("nsp", "nsb", "every batch holds one plate, so the two exclude the same candidates"),
                      ("nsb", "nss", "every source holds one batch, so the two exclude the same candidates"),
                      ("nsl", "nr", "removing the candidates at the query's well position changes no result")):
        same = [n for n, r in results.items()
                if r["metrics"].get(f"n_queries_{a}") == r["metrics"].get(f"n_queries_{b}")
                and np.allclose(r["curves"].query("mode == @a")["value"], r["curves"].query("mode == @b")["value"],
                                equal_nan=True)]
        if same and len(same) == len(results):
            lines += [f"{a.upper()} equals {b.upper()} on this screen for every method: {why}.", ""]
    return lines


def null_section(results: dict, whitened: bool = True) -> str:
    """The report's paragraph on mAP of activity's DMSO null, with its table; `whitened`: the recipe fits a
    whitening on DMSO (recipe=micon with spherize), where few DMSO wells per feature are flagged."""
    rows = []
    for n, r in results.items():
        m = r["metrics"]
        per = m["n_negcon_wells"] / max(m["n_features_kept"], 1)
        rows.append({"method": n, "map_activity_null": _cell(m, "map_activity_null"),
                     "map_activity_over_null": _cell(m, "map_activity_over_null"),
                     "DMSO wells per feature": f"{per:.1f}" + (" (few)" if whitened and per < WELLS_PER_FEATURE else ""),
                     **({"why n/a": r["null_reason"]} if r.get("null_reason") else {})})
    return ("mAP of activity against DMSO itself: half of each plate's DMSO wells become pseudo-compounds and the "
            "profiles are fitted on the other half; `map_activity_null` is what those pseudo-compounds reach (a "
            "compound without effect reaches the same), `map_activity_over_null` the compounds' mAP under that fit "
            "minus it, with its bootstrap interval. With fewer than "
            f"{WELLS_PER_FEATURE} DMSO wells per feature the recipe's own fit moves a compound without effect away "
            "from the random-ranking chance, by an amount that depends on the features: compare methods on "
            "`map_activity_over_null` there (docs/results/ACTIVITY.md).\n\n" + markdown_table(rows))


def log_wandb(out: Path, cfg: EvalConfig, results: dict) -> None:
    """The evaluate run (micon.wandb_runs: named, grouped, job_type evaluate): metrics, plots, and the embeddings
    and checkpoints read, as artifact use."""
    import wandb

    from micon import wandb_runs

    run = wandb_runs.open_run("evaluate", cfg.out, project=cfg.wandb_project, name=cfg.wandb_name,
                              group=cfg.wandb_group, tags=cfg.wandb_tags, config=to_dict(cfg), wandb_dir=out,
                              upstream=wandb_runs.upstream_of(cfg.embeddings.values()))
    try:
        wandb_runs.use_embeddings(run, cfg.embeddings.values())
    except Exception as e:      # a checkpoint removed since: the scores still go to wandb
        print(f"evaluate: {wandb_runs.warning('the embeddings and checkpoints read', e)}", file=sys.stderr)
    summary = pd.DataFrame([dict(method=n, **r["metrics"]) for n, r in results.items()])
    run.log({"metrics": wandb.Table(dataframe=summary),
             **{f"{n}/{k}": v for n, r in results.items() for k, v in r["metrics"].items()},
             **{p.stem: wandb.Image(str(p)) for p in out.glob("*.png")}})
    run.finish()


def main(argv: list[str]) -> int:
    from micon.config import help_or_usage

    if (rc := help_or_usage(argv, __doc__, EvalConfig)) is not None:
        return rc
    try:
        cfg = load_config(EvalConfig, overrides=argv)
    except ConfigError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    import logging

    from micon.embeddings import EmbeddingError

    logging.basicConfig(format="evaluate: %(message)s", level=logging.WARNING, stream=sys.stderr)
    final = storage.path(cfg.out)     # in object storage: written to a local staging directory, uploaded at the end
    out = final if isinstance(final, Path) else atomic.temp_path(final)
    out.mkdir(parents=True, exist_ok=True)
    if out != final:        # a failed run leaves no staging directory behind either
        import atexit
        atexit.register(shutil.rmtree, out, True)
    save_config(cfg, out / "eval_config.yaml")
    keep = None
    if cfg.compounds == "heldout":
        from micon.data.shards import Manifest
        keep = set(Manifest.load(cfg.shards).data["splits"]["heldout_compounds"])
    if cfg.ray:
        from micon.raycluster import JobError, init_ray
        try:
            init_ray()
        except JobError as e:
            print(f"evaluate: {e}", file=sys.stderr)
            return 1
    results = {}
    t_all = time.perf_counter()
    methods = {**cfg.embeddings, **cfg.profiles}
    for i, (name, path) in enumerate(methods.items()):
        t0 = time.perf_counter()
        _say(f"method {i + 1}/{len(methods)}: {name} ({path})")
        try:
            results[name] = evaluate_method(name, path, cfg, keep)
        except (EmbeddingError, ProfileError) as e:
            print(f"evaluate: {name}: {e}", file=sys.stderr)
            return 1
        write_profiles(out, name, results[name])
        m = results[name]["metrics"]
        k = cfg.max_k
        _say(f"{name}: NR top-1 {m['nr_top1']:.3f} | NSB top-1 {m['nsb_top1']:.3f} top-{k} {m[f'nsb_top{k}']:.3f} | NSS top-1 "
             f"{m['nss_top1']:.3f} top-{k} {m[f'nss_top{k}']:.3f} | NSL top-1 {m['nsl_top1']:.3f} | mAP "
             f"{m['map_activity']:.3f}"
             + ((f" ({m['map_activity_over_null']:+.3f} over the DMSO null)" if np.isfinite(m["map_activity_over_null"])
                 else f" (no DMSO null: {results[name]['null_reason'] or 'undefined'})")
                if "map_activity_over_null" in m else "")
             + " | retrieved "
             f"{m['fraction_retrieved']:.3f} ({m['n_wells']} wells, {time.perf_counter() - t0:.1f} s; "
             f"{time.perf_counter() - t_all:.0f} s so far)")
    zero_shot = {}
    if cfg.predictions:
        from micon.data.shards import Manifest
        held = set(Manifest.load(cfg.shards).data["splits"]["heldout_compounds"]) if cfg.shards else None
        for name, path in cfg.predictions.items():
            try:
                zero_shot[name] = score_predictions(name, path, held, cfg.max_k)
            except (ProfileError, KeyError, ValueError) as e:
                print(f"evaluate: predictions.{name}: {e}", file=sys.stderr)
                return 1
            z = zero_shot[name]
            _say(f"{name}: zero-shot, {z['n_queries']} {'held-out ' if held is not None else ''}compounds against "
                 f"{z['n_wells']} wells: top-1% {z['zs_well_top1pct']:.3f} (chance {z['zs_well_top1pct_chance']:.3f}), "
                 f"compound top-1 {z['zs_compound_top1']:.3f} (chance {z['zs_compound_top1_chance']:.3f})")
    doc = strict_json({"methods": {n: r["metrics"] for n, r in results.items()}, "zero_shot": zero_shot,
                       "recipe": cfg.recipe,
                       "recipes": {n: {**r["recipe"].summary(), "fitted": f"recipe_{n}.npz"} for n, r in results.items()},
                       "config": to_dict(cfg)})
    atomic.write_json(out / "metrics.json", doc, indent=1, allow_nan=False)
    t0 = time.perf_counter()
    report = write_report(out, results, cfg, zero_shot) if results else None
    if report is None:
        report = out / "report.md"
        report.write_text(zero_shot_section(zero_shot, cfg))
    _say(f"report: {len(list(out.glob('*.png')))} plots in {time.perf_counter() - t0:.1f} s")
    if cfg.wandb and results:
        log_wandb(out, cfg, results)
    if results:
        table = pd.DataFrame([dict(method=n, **{k: round(r["metrics"][k], 3)
                                                for k in headline(cfg.max_k, cfg.activity_null)})
                              for n, r in results.items()])
        print(table.to_string(index=False))
    if out != final:        # every object whole, metrics.json last (an earlier run's first removed)
        (final / "metrics.json").unlink(missing_ok=True)
        storage.put_tree(out, final, last=("metrics.json",))
        shutil.rmtree(out, ignore_errors=True)
        report = final / report.name
    print(f"evaluate: metrics {final / 'metrics.json'}, report {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
