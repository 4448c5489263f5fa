"""Evaluate site embeddings the way the field does: well profiles, per-plate robust normalisation
against DMSO, ZCA-cor whitening fitted on DMSO, NSB/NSS/NSP top-k replicate retrieval (Ray tasks
over query blocks) and copairs-style mAP; writes metrics.json, a markdown report with PNG plots,
and logs them to wandb.

    ./launch.sh evaluate out=DIR embeddings.micon=DIR embeddings.simclr=DIR ... [key=value ...]
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from micon import schema
from micon.config import ConfigError, load_config, save_config, to_dict
from micon.tables import markdown_table



def headline(max_k: int) -> tuple[str, ...]:
    """The report's columns; top-k columns are named by their k."""
    return ("nsb_top1", f"nsb_top{max_k}", "nss_top1", f"nss_top{max_k}", "map_activity", "fraction_retrieved")


class ProfileError(RuntimeError):
    pass


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


@dataclass
class EvalConfig:
    out: str = "runs/eval"           # metrics.json, report.md, plots and profiles
    embeddings: dict[str, str] = field(default_factory=dict)   # method name -> embed output directory
    aggregate: str = "mean"          # site -> well: mean | median
    normalize: bool = True           # per-plate robust MAD against DMSO
    spherize: bool = True            # ZCA-cor fitted on DMSO wells
    epsilon: float = 1e-6            # ZCA regulariser
    max_k: int = 10                  # top-k retrieval for k = 1..max_k
    compounds: str = "all"           # all | heldout (held-out compounds of the shard manifest only)
    shards: str = ""                 # manifest dir (for compounds=heldout)
    null_size: int = 10000           # random rankings in mAP's null distribution
    ray: bool = True                 # top-k over Ray tasks (same numbers as single-process)
    plates_without_dmso: str = "stop"   # stop | drop (their wells) | batch (against the batch's, else source's DMSO)
    wandb: bool = True               # log metrics and plots to wandb (offline by default)
    wandb_project: str = "micon"     # wandb project

    def validate(self) -> None:
        if not self.embeddings:
            raise ConfigError("no embeddings to evaluate: pass embeddings.NAME=DIR (one per method)")
        if self.aggregate not in ("mean", "median"):
            raise ConfigError("aggregate: mean or median")
        if self.compounds not in ("all", "heldout"):
            raise ConfigError("compounds: all or heldout")
        if self.plates_without_dmso not in ("stop", "drop", "batch"):
            raise ConfigError("plates_without_dmso: stop, drop or batch")
        if self.compounds == "heldout" and not self.shards:
            raise ConfigError("compounds=heldout needs shards=DIR (the manifest that names them)")


def well_profiles(meta: pd.DataFrame, emb: np.ndarray, cfg: EvalConfig) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """(well metadata, raw well profiles, normalised and whitened profiles)."""
    from micon.eval.profiles import aggregate_wells, negcon_mask, spherize

    check_finite(meta, emb, "site embeddings", "as embedded")
    wells, raw = aggregate_wells(meta, emb.astype(np.float32), method=cfg.aggregate)
    wells, raw, fallback = handle_plates_without_dmso(wells, raw, cfg)
    # feature selection: a feature constant across DMSO wells (a dead ReLU unit, a saturated statistic)
    # has no robust scale and cannot be whitened; drop it, as pycytominer's variance filter would
    neg = negcon_mask(wells)
    ref = raw[neg] if neg.sum() > 1 else raw
    mad = np.median(np.abs(ref - np.median(ref, axis=0)), axis=0)
    x = raw[:, (mad > 1e-8) & (ref.std(axis=0) > 1e-8)].astype(np.float64)
    if cfg.normalize:
        x = mad_robustize_with_fallback(wells, x, fallback)
    if cfg.spherize:
        x = spherize(x, negcon_mask(wells), epsilon=cfg.epsilon)
    check_finite(wells, x, "well profiles", "after " + ("MAD normalisation and " if cfg.normalize else "")
                 + ("ZCA whitening" if cfg.spherize else "feature selection"))
    return wells, raw, x.astype(np.float32)


def handle_plates_without_dmso(wells: pd.DataFrame, raw: np.ndarray, cfg: EvalConfig):
    """Plates with no DMSO well cannot be normalised per plate: stop naming them (default), drop their
    wells, or normalise them against their batch's DMSO wells (`plates_without_dmso=stop|drop|batch`)."""
    from micon.eval.profiles import negcon_mask

    has = wells.loc[negcon_mask(wells), schema.PLATE].unique()
    missing = sorted(set(wells[schema.PLATE]) - set(has))
    if not missing or not cfg.normalize:
        return wells, raw, []
    names = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
    if cfg.plates_without_dmso == "stop":
        raise ProfileError(f"{len(missing)} plate(s) have no DMSO well to normalise against: {names}. Pass "
                           f"plates_without_dmso=drop to leave their wells out, or plates_without_dmso=batch to "
                           f"normalise them against their batch's (else their source's) DMSO wells")
    if cfg.plates_without_dmso == "drop":
        keep = ~wells[schema.PLATE].isin(missing).to_numpy()
        print(f"evaluate: dropping {int((~keep).sum())} wells of {len(missing)} plate(s) without DMSO: {names}",
              file=sys.stderr)
        return wells[keep].reset_index(drop=True), raw[keep], []
    print(f"evaluate: {len(missing)} plate(s) without DMSO normalised against their batch's (else source's) DMSO: "
          f"{names}", file=sys.stderr)
    return wells, raw, missing


def mad_robustize_with_fallback(wells: pd.DataFrame, x: np.ndarray, fallback: list[str]) -> np.ndarray:
    from micon.eval.profiles import mad_robustize, negcon_mask

    if not fallback:
        return mad_robustize(wells, x)
    out = np.empty_like(x)
    own = ~wells[schema.PLATE].isin(fallback).to_numpy()
    out[own] = mad_robustize(wells[own].reset_index(drop=True), x[own])
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


def check_label(name: str, path: str) -> None:
    """A label must name the method that made the embeddings (a suffix is fine: micon_seed1)."""
    info_path = Path(path) / "embed.json"
    made_by = json.loads(info_path.read_text()).get("method") if info_path.is_file() else None
    if made_by and not name.startswith(made_by):
        from micon.methods import METHODS
        known = ", ".join([*METHODS, "handcrafted"])
        raise ProfileError(f"label {name!r} does not name the method that made {path} ({made_by}); write "
                           f"embeddings.{made_by}={path} (a suffix such as {made_by}_seed1 is fine). Methods: {known}")


def evaluate_method(name: str, path: str, cfg: EvalConfig, keep_compounds: set | None) -> dict:
    from micon.embeddings import load_embeddings
    from micon.eval import map as mapm
    from micon.eval.retrieval import topk_hit_rate, topk_hit_rate_ray

    check_label(name, path)
    meta, emb = load_embeddings(path)
    wells, raw, prof = well_profiles(meta, emb, cfg)
    if keep_compounds is not None:
        keep = (wells[schema.ROLE] == schema.NEGCON).to_numpy() | wells[schema.JCP].isin(keep_compounds).to_numpy()
        wells, raw, prof = wells[keep].reset_index(drop=True), raw[keep], prof[keep]
    fn = topk_hit_rate_ray if cfg.ray else topk_hit_rate
    topk = fn(wells, prof, ks=range(1, cfg.max_k + 1), modes=("nsb", "nss", "nsp"))
    treated = wells[schema.ROLE].isin([schema.TREATED, schema.POSCON]).to_numpy()
    act_wells = wells[treated | (wells[schema.ROLE] == schema.NEGCON).to_numpy()].reset_index(drop=True)
    act_prof = prof[treated | (wells[schema.ROLE] == schema.NEGCON).to_numpy()]
    _, act_map = mapm.phenotypic_activity(act_wells, act_prof, null_size=cfg.null_size)
    _, con_map = mapm.phenotypic_consistency(act_wells, act_prof, null_size=cfg.null_size)
    row = lambda k: topk.set_index("k").loc[k]  # noqa: E731
    k = cfg.max_k
    metrics = {
        **{f"{mode}_top1": float(row(1)[mode]) for mode in ("nsb", "nss", "nsp")},
        **{f"{mode}_top{k}": float(row(k)[mode]) for mode in ("nsb", "nss", "nsp")},
    }
    metrics |= dict(
        map_activity=float(act_map["mean_average_precision"].mean()),
        fraction_retrieved=float(mapm.fraction_retrieved(act_map)),
        map_consistency=float(con_map["mean_average_precision"].mean()),
        n_wells=int(len(wells)), n_queries_nss=int(row(1).get("n_queries_nss", 0)),
        n_queries_nsb=int(row(1).get("n_queries_nsb", 0)), dim=int(emb.shape[1]),
    )
    return dict(metrics=metrics, topk=topk.assign(method=name), map=act_map.assign(method=name),
                wells=wells, raw=raw, prof=prof)


def write_profiles(out: Path, name: str, wells: pd.DataFrame, prof: np.ndarray) -> Path:
    """The normalised, whitened well-level profiles the metrics were computed on, as the field reads
    them: Metadata_* columns then feature columns, one row per well (copairs and pycytominer read it
    without a mapping step)."""
    features = pd.DataFrame(prof.astype(np.float32), columns=[f"{name}_{i:04d}" for i in range(prof.shape[1])])
    meta = wells.reset_index(drop=True)
    meta = meta.rename(columns={c: f"Metadata_{c}" for c in meta.columns if not c.startswith("Metadata_")})
    table = pd.concat([meta, features], axis=1)
    path = out / f"profiles_{name}.parquet"
    table.to_parquet(path.with_name(path.name + ".tmp"), index=False)
    os.replace(path.with_name(path.name + ".tmp"), path)
    return path


def write_report(out: Path, results: dict, cfg: EvalConfig) -> Path:
    from micon.eval import plots

    topk = pd.concat([r["topk"] for r in results.values()], ignore_index=True)
    topk.to_csv(out / "topk.csv", index=False)
    summary = pd.DataFrame([dict(method=n, **r["metrics"]) for n, r in results.items()])
    summary.to_csv(out / "summary.csv", index=False)
    pngs = [plots.plot_topk_curves(topk, out / "topk_nsb_nss.png"),
            plots.plot_map_summary(summary, out / "map_fraction_retrieved.png")]
    for name, r in results.items():
        pngs.append(plots.plot_profiles_pca(r["wells"], r["raw"], r["prof"], out / f"profiles_pca_{name}.png",
                                            titles=(f"{name}: raw well profiles", f"{name}: normalised + whitened")))
    table = markdown_table(summary[["method", *headline(cfg.max_k)]].round(3).to_dict("records"))
    lines = ["# Replicate retrieval report", "",
             f"Well profiles ({cfg.aggregate} of sites), {'per-plate robust MAD vs DMSO, ' if cfg.normalize else ''}"
             f"{'ZCA-cor whitening fitted on DMSO (epsilon ' + str(cfg.epsilon) + '), ' if cfg.spherize else ''}"
             f"cosine similarity. NSB/NSS/NSP: share of treated query wells with a well of the same compound among "
             f"the k nearest wells, candidates from the query's own batch / source / plate removed. mAP: copairs "
             f"semantics, activity = replicate wells vs same-plate DMSO; fraction retrieved = share of compounds "
             f"with BH-corrected p < 0.05.", "", table, ""]
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in pngs]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def log_wandb(out: Path, cfg: EvalConfig, results: dict) -> None:
    import wandb

    run = wandb.init(project=cfg.wandb_project, dir=str(out), job_type="evaluate", config=to_dict(cfg),
                     mode=os.environ.get("WANDB_MODE", "offline"))
    summary = pd.DataFrame([dict(method=n, **r["metrics"]) for n, r in results.items()])
    run.log({"metrics": wandb.Table(dataframe=summary),
             **{f"{n}/{k}": v for n, r in results.items() for k, v in r["metrics"].items()},
             **{p.stem: wandb.Image(str(p)) for p in out.glob("*.png")}})
    run.finish()


def main(argv: list[str]) -> int:
    from micon.config import job_help, wants_help

    if wants_help(argv):
        print(job_help(__doc__, EvalConfig))
        return 0
    try:
        cfg = load_config(EvalConfig, overrides=argv)
    except ConfigError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    from micon.embeddings import EmbeddingError

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "eval_config.yaml")
    keep = None
    if cfg.compounds == "heldout":
        from micon.data.shards import Manifest
        keep = set(Manifest.load(cfg.shards).data["splits"]["heldout_compounds"])
    if cfg.ray:
        from micon.raycluster import init_ray
        init_ray()
    results = {}
    for name, path in cfg.embeddings.items():
        t0 = time.perf_counter()
        try:
            results[name] = evaluate_method(name, path, cfg, keep)
        except (EmbeddingError, ProfileError) as e:
            print(f"evaluate: {name}: {e}", file=sys.stderr)
            return 1
        write_profiles(out, name, results[name]["wells"], results[name]["prof"])
        m = results[name]["metrics"]
        k = cfg.max_k
        print(f"evaluate: {name}: NSB top-1 {m['nsb_top1']:.3f} top-{k} {m[f'nsb_top{k}']:.3f} | NSS top-1 "
              f"{m['nss_top1']:.3f} top-{k} {m[f'nss_top{k}']:.3f} | mAP {m['map_activity']:.3f} | retrieved "
              f"{m['fraction_retrieved']:.3f} ({m['n_wells']} wells, {time.perf_counter() - t0:.1f} s)", flush=True)
    doc = {"methods": {n: r["metrics"] for n, r in results.items()}, "config": to_dict(cfg)}
    (out / "metrics.json.tmp").write_text(json.dumps(doc, indent=1))
    os.replace(out / "metrics.json.tmp", out / "metrics.json")
    report = write_report(out, results, cfg)
    if cfg.wandb:
        log_wandb(out, cfg, results)
    table = pd.DataFrame([dict(method=n, **{k: round(r["metrics"][k], 3) for k in headline(cfg.max_k)})
                          for n, r in results.items()])
    print(table.to_string(index=False))
    print(f"evaluate: metrics {out / 'metrics.json'}, report {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
