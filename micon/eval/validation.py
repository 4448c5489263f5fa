"""Held-out validation for a run in training: which wells, read once, and their score.

`select_wells` picks the validation wells from a shard set's splits (held-out batches, compounds or source,
or named plates), with their plates' DMSO wells, the wells the profile recipe normalises against, up to a
budget: compounds are taken in a seeded order, each with all its wells and the DMSO wells of plates not yet
in, until the next one would pass `max_wells`. `read_sites` decodes those wells' sites once (the training
job keeps them in memory). `score_sites` turns site embeddings into the evaluation's numbers with the
evaluation's own library code: wells as the mean of their sites, the profile recipe (micon.eval.recipes),
NSB/NSS top-1 and top-10 (micon.eval.retrieval) and mAP of phenotypic activity against same-plate DMSO
(micon.eval.map): `evaluate` on the same wells' embeddings gives the same numbers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from micon import schema

SPLITS = ("heldout_batches", "heldout_compounds", "heldout_source")
METRICS = ("nsb_top1", "nsb_top10", "nss_top1", "nss_top10", "map_activity")
WELL = [schema.PLATE, schema.WELL]


class ValidationError(ValueError):
    pass


def check_split(split: str) -> None:
    if split in SPLITS or (split.startswith("plates:") and split.removeprefix("plates:").strip(", ")):
        return
    raise ValidationError(f"val.split={split!r}: choose one of {', '.join(SPLITS)} or plates:PLATE,PLATE")


def site_table(manifest) -> pd.DataFrame:
    """Every site's metadata with its shard and its position in the shard (tar order), in manifest order."""
    from micon.data.shards import read_tar_encoded
    from micon.embeddings import META_COLUMNS

    index = manifest.root / "site_index.parquet"
    if index.is_file():
        table = pd.read_parquet(index)
        order = {s["name"]: i for i, s in enumerate(manifest.data["shards"])}
        table = table.assign(_o=table["shard"].map(order)).sort_values(["_o", "offset"], kind="stable")
        table = table.assign(position=table.groupby("shard").cumcount())
        return table[[*META_COLUMNS, "shard", "position"]].astype({c: str for c in META_COLUMNS}).reset_index(drop=True)
    rows = []
    for s in manifest.shard_paths():
        for i, (_, _, _, meta) in enumerate(read_tar_encoded(s, manifest.shard_checksums().get(Path(s).name))):
            rows.append({**{c: str(meta.get(c, "")) for c in META_COLUMNS}, "shard": Path(s).name, "position": i})
    return pd.DataFrame(rows)


def select_wells(sites: pd.DataFrame, splits: dict, split: str, max_wells: int, seed: int = 0) -> pd.DataFrame:
    """The validation wells (Metadata_Plate, Metadata_Well, role, compound), see the module's docstring."""
    check_split(split)
    wells = sites.drop_duplicates(WELL)[[*WELL, schema.SOURCE, schema.BATCH, schema.JCP, schema.ROLE]]
    treated = wells[wells[schema.ROLE] == schema.TREATED]
    if split == "heldout_compounds":
        treated = treated[treated[schema.JCP].isin(splits.get("heldout_compounds", []))]
    elif split == "heldout_batches":
        held = treated[schema.JCP].isin(splits.get("heldout_compounds", []))
        treated = treated[~held & treated[schema.BATCH].isin(splits.get("heldout_batches", []))]
    elif split == "heldout_source":
        treated = treated[treated[schema.SOURCE].isin(splits.get("heldout_sources", []))]
    else:
        plates = [p.strip() for p in split.removeprefix("plates:").split(",") if p.strip()]
        missing = sorted(set(plates) - set(wells[schema.PLATE]))
        if missing:
            raise ValidationError(f"val.split={split}: no plate {', '.join(missing[:5])} in the shard set")
        treated = treated[treated[schema.PLATE].isin(plates)]
    if treated.empty:
        raise ValidationError(f"val.split={split}: the shard set holds no treated well there (its splits: "
                              + ", ".join(f"{k} {len(v)}" for k, v in splits.items() if isinstance(v, list))
                              + "); prep with heldout_* set, or name plates with val.split=plates:A,B")
    dmso = wells[wells[schema.ROLE] == schema.NEGCON]
    rng = np.random.default_rng(seed)
    compounds = sorted(set(treated[schema.JCP]))
    chosen, plates, n = [], set(), 0
    by_compound = dict(tuple(treated.groupby(schema.JCP)))
    for c in rng.permutation(np.array(compounds, dtype=object)):
        own = by_compound[c]
        new_plates = set(own[schema.PLATE]) - plates
        cost = len(own) + int(dmso[schema.PLATE].isin(new_plates).sum())
        if n + cost > max_wells and chosen:
            break
        chosen.append(own)
        plates |= new_plates
        n += cost
    out = pd.concat([*chosen, dmso[dmso[schema.PLATE].isin(plates)]], ignore_index=True)
    return out.sort_values(WELL, kind="stable").reset_index(drop=True)


def val_sites(sites: pd.DataFrame, wells: pd.DataFrame) -> pd.DataFrame:
    """The site rows of the validation wells, in manifest order."""
    keys = set(zip(wells[schema.PLATE], wells[schema.WELL]))
    return sites[[k in keys for k in zip(sites[schema.PLATE], sites[schema.WELL])]].reset_index(drop=True)


def read_sites(manifest, rows: pd.DataFrame) -> np.ndarray:
    """uint8 sites [n, C, H, W] of `rows` (site_table rows), each shard read once and checked."""
    from micon.data.codecs import decode
    from micon.data.shards import read_tar_encoded

    channels = len(manifest.channels)
    out: list = [None] * len(rows)
    paths = {Path(p).name: p for p in manifest.shard_paths()}
    checks = manifest.shard_checksums()
    for shard, group in rows.groupby("shard", sort=False):
        want = dict(zip(group["position"].astype(int), group.index))
        for i, (_, blob, codec, _) in enumerate(read_tar_encoded(paths[shard], checks.get(shard))):
            if i in want:
                out[want[i]] = decode(blob, codec, channels)
    return np.stack(out) if out else np.zeros((0, channels, 1, 1), np.uint8)


def score_sites(meta: pd.DataFrame, emb: np.ndarray, recipe: str = "micon", null_size: int = 1000,
                **recipe_options) -> dict[str, float]:
    """Site embeddings -> {metric: value} for METRICS (see the module's docstring); NaN where no query is
    eligible (NSS in one source)."""
    from micon.eval import map as mapm
    from micon.eval.profiles import aggregate_wells
    from micon.eval.recipes import apply_recipe
    from micon.eval.retrieval import topk_hit_rate

    wells, raw = aggregate_wells(meta, np.asarray(emb, np.float32), method="mean")
    names = [f"f{i:04d}" for i in range(raw.shape[1])]
    rec = apply_recipe(recipe, wells, raw, names, **recipe_options)
    wells, prof = rec.wells, rec.prof
    topk = topk_hit_rate(wells, prof, ks=(1, 10), modes=("nsb", "nss")).set_index("k")
    out = {f"{mode}_top{k}": float(topk.loc[k, mode]) if int(topk.loc[k, f"n_queries_{mode}"]) else float("nan")
           for mode in ("nsb", "nss") for k in (1, 10)}
    roles = wells[schema.ROLE].to_numpy()
    used = np.isin(roles, [schema.TREATED, schema.POSCON, schema.NEGCON])
    _, act = mapm.phenotypic_activity(wells[used].reset_index(drop=True), prof[used], null_size=null_size)
    out["map_activity"] = float(act["mean_average_precision"].mean()) if len(act) else float("nan")
    out["n_wells"] = int(len(wells))
    return out
