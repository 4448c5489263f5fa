"""Replicate-set shards: a compound's replicate wells and a same-plate DMSO control for each, co-located.

In cpg0016 a compound's ~5 wells lie on ~5 plates, mostly in different sources, so a stream of plate
shards meets them thousands of plates apart. A replicate-set sample brings them together on purpose:

    one WebDataset sample per (compound, site slot k):  {key}.json
        {key}.t{i}.{codec}   site k (cycled when a well has fewer) of the compound's well i
        {key}.c{i}.{codec}   a DMSO site from well i's own plate (else its batch, then its source)

Why a slot and not the whole compound: one example uses two wells and one site of each, so a
sample holding every site of every well would be read to use a few percent of it. One slot of every
well gives ceil(n_wells / 2) examples that between them use every image read (an odd well out is
paired again), so images used / images read stays near 1 whatever the number of compounds or plates.

The planner works on a site index (key -> plate shard, member offset and size, Metadata_*), built
from tar headers and JSON members only; writing a replicate-set shard copies encoded bytes by offset,
never decoding or re-encoding a pixel, and never holds more than one shard's samples in memory.
Pure planning and file writing here; Ray orchestration lives in data_prep/replicate_sets.py.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zlib
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from micon import schema

RSET_DIR = "replicate_sets"
INDEX_FILE = "site_index.parquet"
REPORT_FILE = "replicate_sets_report.csv"
META_COLUMNS = (schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL, schema.SITE, schema.JCP, schema.INCHIKEY,
                schema.SMILES, schema.ROLE)
PAIR_LEVELS = ("source", "batch", "plate", "well")


@dataclass
class ReplicateSetConfig:
    """How `prep` groups sites into replicate sets (recorded with the shards; a change rebuilds them)."""

    sites_per_well: int = 0          # site slots per compound: 0 = as many as its best-imaged well has
    include_poscon: bool = True      # positive controls get replicate sets too (training decides to use them)
    shard_mb: float = 0.0            # target replicate-set shard size (0 = the plate shards' shard_mb)
    weights: str = ""                # optional CSV/parquet: Metadata_JCP2022, weight (0 = leave the compound out)
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------- site index

def index_shard(path: str | Path) -> list[dict]:
    """Site index rows of one plate shard: tar headers and the small JSON members only (image bytes are
    skipped by seeking). Each row: key, shard, offset, size, codec and the site's Metadata_* values."""
    rows: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            if not m.isfile() or "." not in m.name:
                continue
            key, ext = m.name.split(".", 1)
            row = rows.setdefault(key, {"key": key, "shard": Path(path).name})
            if ext == "json":
                meta = json.loads(tar.extractfile(m).read())
                row.update({c: str(meta.get(c, "")) for c in META_COLUMNS})
            elif ext.startswith("image."):
                row.update(offset=m.offset_data, size=m.size, codec=ext.split(".", 1)[1])
    return [r for r in rows.values() if "offset" in r and schema.PLATE in r]


# ----------------------------------------------------------------------------------------- planning

def _stable(*parts) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def plan_replicate_sets(index: pd.DataFrame, splits: dict, cfg: ReplicateSetConfig,
                        weights: dict[str, float] | None = None) -> tuple[list[dict], pd.DataFrame]:
    """(samples, report). A sample: {key, compound, role, slot, weight, wells: [{t: row, c: row, level}]}
    where rows are site-index records. The report lists every training compound left out, and why.

    Only training sites are used (held-out sources, batches and compounds of the manifest's splits are
    not); controls are DMSO sites of the well's own plate, else of its batch, else of its source."""
    idx = index
    heldout = (idx[schema.SOURCE].isin(splits.get("heldout_sources", []))
               | idx[schema.BATCH].isin(splits.get("heldout_batches", [])))
    idx = idx[~heldout]
    roles = [schema.TREATED] + ([schema.POSCON] if cfg.include_poscon else [])
    treated = idx[idx[schema.ROLE].isin(roles) & ~idx[schema.JCP].isin(splits.get("heldout_compounds", []))]
    dmso = idx[idx[schema.ROLE] == schema.NEGCON].sort_values("key")
    by_plate = {p: g.to_dict("records") for p, g in dmso.groupby(schema.PLATE, sort=False)}
    by_batch = {b: g.to_dict("records") for b, g in dmso.groupby(schema.BATCH, sort=False)}
    by_source = {s: g.to_dict("records") for s, g in dmso.groupby(schema.SOURCE, sort=False)}

    def control(site: dict, cpd: str, slot: int):
        for level, table, k in (("plate", by_plate, schema.PLATE), ("batch", by_batch, schema.BATCH),
                                ("source", by_source, schema.SOURCE)):
            cands = table.get(site[k])
            if cands:
                return cands[_stable(cfg.seed, cpd, site[schema.PLATE], site[schema.WELL], slot) % len(cands)], level
        return None, "none"

    samples, report = [], []
    treated = treated.sort_values([schema.JCP, schema.PLATE, schema.WELL, schema.SITE, "key"])
    for cpd, g in treated.groupby(schema.JCP, sort=True):
        wells = [w.to_dict("records") for _, w in g.groupby([schema.PLATE, schema.WELL], sort=True)]
        w = 1.0 if weights is None else float(weights.get(cpd, 0.0))
        if len(wells) < 2:
            report.append({schema.JCP: cpd, "n_wells": len(wells), "reason": f"{len(wells)} usable well (needs 2)"})
            continue
        if w <= 0:
            report.append({schema.JCP: cpd, "n_wells": len(wells),
                           "reason": "weight 0" if weights and cpd in weights else "not in the weights table"})
            continue
        n_slots = max(len(x) for x in wells)
        if cfg.sites_per_well > 0:
            n_slots = min(n_slots, cfg.sites_per_well)
        role = wells[0][0][schema.ROLE]
        for k in range(n_slots):
            entries = []
            for sites in wells:
                t = sites[k % len(sites)]
                c, level = control(t, cpd, k)
                entries.append({"t": t, "c": c, "level": level})
            samples.append({"key": f"{cpd}__s{k}".replace(".", "-"), "compound": cpd, "role": role, "slot": k,
                            "weight": w, "wells": entries})
    return samples, pd.DataFrame(report, columns=[schema.JCP, "n_wells", "reason"])


def assign_shards(samples: list[dict], seed: int, shard_bytes: float) -> list[list[dict]]:
    """Samples shuffled by seed (a compound's slots scatter), then cut into shards of about shard_bytes."""
    order = np.random.default_rng([seed, 7]).permutation(len(samples))
    shards, current, size = [], [], 0
    for i in order:
        s = samples[int(i)]
        current.append(s)
        size += sum(e["t"]["size"] + (e["c"]["size"] if e["c"] else 0) for e in s["wells"])
        if size >= shard_bytes:
            shards.append(current)
            current, size = [], 0
    if current:
        shards.append(current)
    return shards


def plan_fingerprint(index: pd.DataFrame, splits: dict, cfg: ReplicateSetConfig, weights: dict | None) -> str:
    """Identifies what the shards are made from: the plate shards' index, the splits, the options, the weights."""
    h = hashlib.sha256()
    cols = ["key", "shard", "offset", "size", "codec", *META_COLUMNS]
    h.update(pd.util.hash_pandas_object(index[cols].sort_values("key"), index=False).values.tobytes())
    h.update(json.dumps([splits, cfg.to_dict(), sorted((weights or {}).items())], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------- writing

def _sample_json(s: dict, codec: str) -> dict:
    meta = lambda r: {c: r[c] for c in META_COLUMNS}  # noqa: E731
    return {"compound": s["compound"], "role": s["role"], "slot": s["slot"], "weight": s["weight"], "codec": codec,
            "wells": [{"meta": meta(e["t"]), "image": f"t{i}.{codec}",
                       "control": None if e["c"] is None else {"meta": meta(e["c"]), "image": f"c{i}.{codec}",
                                                               "level": e["level"]}}
                      for i, e in enumerate(s["wells"])]}


def write_shard(samples: list[dict], plate_shards: Path, dst: Path) -> dict:
    """Copy the encoded site bytes of `samples` from the plate shards into one tar at `dst` (temporary
    name, then rename; tar headers carry no time or owner, so a rerun writes identical bytes)."""
    reads: dict[str, list[tuple[int, int, str]]] = defaultdict(list)   # plate shard -> (offset, size, member)
    members: dict[str, bytes] = {}
    for s in samples:
        for i, e in enumerate(s["wells"]):
            for tag, row in (("t", e["t"]), ("c", e["c"])):
                if row is not None:
                    reads[row["shard"]].append((int(row["offset"]), int(row["size"]),
                                                f"{s['key']}.{tag}{i}.{row['codec']}"))
    for shard, wanted in reads.items():
        with open(plate_shards / shard, "rb") as fh:
            for offset, size, name in sorted(wanted):
                fh.seek(offset)
                data = fh.read(size)
                if len(data) != size:
                    raise OSError(f"{plate_shards / shard} is truncated: member {name} at byte {offset} needs {size} "
                                  f"bytes, got {len(data)}; rerun prep for its plate")
                members[name] = data
    tmp = dst.with_name(dst.name + ".tmp")
    n_images = 0
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))

        for s in samples:
            codec = s["wells"][0]["t"]["codec"]
            add(f"{s['key']}.json", json.dumps(_sample_json(s, codec), sort_keys=True).encode())
            for i, e in enumerate(s["wells"]):
                add(f"{s['key']}.t{i}.{e['t']['codec']}", members[f"{s['key']}.t{i}.{e['t']['codec']}"])
                n_images += 1
                if e["c"] is not None:
                    add(f"{s['key']}.c{i}.{e['c']['codec']}", members[f"{s['key']}.c{i}.{e['c']['codec']}"])
                    n_images += 1
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, dst)
    return {"name": dst.name, "n_samples": len(samples), "n_images": n_images, "bytes": dst.stat().st_size,
            "compounds": sorted({s["compound"] for s in samples})}


# ----------------------------------------------------------------------------------------- pairing

def pair_score(a: dict, b: dict) -> int:
    """Higher is better: partners that differ at a coarser level first (4 = another source)."""
    for i, col in enumerate((schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL)):
        if a[col] != b[col]:
            return len(PAIR_LEVELS) - i
    return 0


def pair_wells(metas: list[dict], rng: np.random.Generator) -> list[tuple[int, int, str]]:
    """Pairs of well indices covering every well: greedily the most different partner (another source,
    then batch, then plate), random among equals; an odd well out is paired again with its best partner.
    Returns (i, j, level) with level the coarsest level at which the two differ."""
    n = len(metas)
    if n < 2:
        return []
    left = list(rng.permutation(n))
    pairs = []
    while len(left) >= 2:
        i = left.pop(0)
        scores = [pair_score(metas[i], metas[j]) for j in left]
        best = max(scores)
        choices = [j for j, s in zip(left, scores) if s == best]
        j = choices[int(rng.integers(len(choices)))]
        left.remove(j)
        pairs.append((int(i), int(j), PAIR_LEVELS[len(PAIR_LEVELS) - best] if best else "site"))
    if left:
        i = left[0]
        others = [j for j in range(n) if j != i]
        scores = [pair_score(metas[i], metas[j]) for j in others]
        j = others[int(np.argmax(scores))]
        pairs.append((int(i), int(j), PAIR_LEVELS[len(PAIR_LEVELS) - max(scores)] if max(scores) else "site"))
    return pairs
