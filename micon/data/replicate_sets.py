"""Replicate-set shards: a compound's replicate wells and a same-plate DMSO control for each, co-located.

In cpg0016 a compound's ~5 wells lie on ~5 plates, mostly in different sources, so a stream of plate
shards meets them thousands of plates apart. A replicate-set sample brings them together on purpose:

    one WebDataset sample per (compound, site slot k):  {key}.json + {key}.pack, the pack holding
        site k (cycled when a well has fewer) of each of the compound's wells, and beside each
        a DMSO site from that well's own plate (else its batch, then its source), encoded, back to back

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
import json
import os
import tarfile
import time
import zlib
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from micon import atomic, schema, storage
from micon.config import NonNegativeFloat, NonNegativeInt, PositiveInt
from micon.data.tarwriter import SampleTar

RSET_DIR = "replicate_sets"
INDEX_FILE = "site_index.parquet"
REPORT_FILE = "replicate_sets_report.csv"
META_COLUMNS = (schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL, schema.SITE, schema.JCP, schema.INCHIKEY,
                schema.SMILES, schema.ROLE)
WELL_COLUMNS = (schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL, schema.SITE)
COMPOUND_COLUMNS = (schema.JCP, schema.INCHIKEY, schema.SMILES, schema.ROLE)
PAIR_LEVELS = ("source", "batch", "plate", "well")
CONTROL_LEVELS = (("plate", schema.PLATE), ("batch", schema.BATCH), ("source", schema.SOURCE))   # nearest first
FORMAT_VERSION = 3          # 2: one `.pack` member per sample; 3: compound fields once per sample
DELAY_ENV = "MICON_RSETS_TEST_DELAY_S"


@dataclass
class ReplicateSetConfig:
    """How `prep` groups sites into replicate sets (recorded with the shards; a change rebuilds them)."""

    sites_per_well: NonNegativeInt = 0  # site slots per compound: 0 = as many as its best-imaged well has
    max_wells_per_set: PositiveInt = 16  # a compound with more wells (a positive control) is split into several sets
    include_poscon: bool = False     # positive controls get replicate sets too (then train with data.include_poscon)
    shard_mb: NonNegativeFloat = 0.0  # target replicate-set shard size (0 = the plate shards' shard_mb)
    weights: str = ""                # optional CSV/parquet: Metadata_JCP2022, weight (0 = leave the compound out)
    seed: NonNegativeInt = 0         # seed of the site, control and shard assignment

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------- site index

def index_shard(path: str | Path) -> list[dict]:
    """Site index rows of one plate shard: tar headers and the small JSON members only (image bytes are
    skipped by seeking). Each row: key, shard, offset, size, codec and the site's Metadata_* values."""
    rows: dict[str, dict] = {}
    with storage.open_read(path) as fh, tarfile.open(fileobj=fh) as tar:
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
    """(samples, report). A sample is {key, compound, role, slot, weight, t, c, level}: for each of its
    wells the index row of the treated site (t), of its DMSO control (c, -1 if none) and the control's
    level (plate, batch, source). Rows are positions in `index`, so a plan for millions of sites holds
    integers, not records (see `resolve`). The report lists every training compound left out, and why.

    Only training sites are used (held-out sources, batches and compounds of the manifest's splits are
    not). A compound with more than `max_wells_per_set` wells (a positive control on every plate) is
    split into sets of at most that many wells, so no sample grows with the number of plates."""
    idx = index.reset_index(drop=True)
    col = {c: idx[c].to_numpy() for c in (schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL, schema.JCP,
                                          schema.ROLE)}
    train = ~(np.isin(col[schema.SOURCE], splits.get("heldout_sources", []))
              | np.isin(col[schema.BATCH], splits.get("heldout_batches", [])))
    roles = [schema.TREATED] + ([schema.POSCON] if cfg.include_poscon else [])
    treated = np.flatnonzero(train & np.isin(col[schema.ROLE], roles)
                             & ~np.isin(col[schema.JCP], splits.get("heldout_compounds", [])))
    dmso = idx.iloc[np.flatnonzero(col[schema.ROLE] == schema.NEGCON)].sort_values("key")
    pools = {level: {k: g.index.to_numpy() for k, g in dmso.groupby(c, sort=False)} for level, c in CONTROL_LEVELS}

    def control(row: int, cpd: str, slot: int) -> tuple[int, str]:
        for level, c in CONTROL_LEVELS:
            cands = pools[level].get(col[c][row])
            if cands is not None and len(cands):
                return int(cands[_stable(cfg.seed, cpd, col[schema.PLATE][row], col[schema.WELL][row], slot)
                                 % len(cands)]), level
        return -1, "none"

    t = idx.iloc[treated].sort_values([schema.JCP, schema.PLATE, schema.WELL, schema.SITE, "key"])
    rows = t.index.to_numpy()
    cpd_of, plate_of, well_of = (col[c][rows] for c in (schema.JCP, schema.PLATE, schema.WELL))
    new_well = np.ones(len(rows), bool)
    new_well[1:] = (cpd_of[1:] != cpd_of[:-1]) | (plate_of[1:] != plate_of[:-1]) | (well_of[1:] != well_of[:-1])
    well_starts = np.flatnonzero(new_well)
    well_rows = np.split(rows, well_starts[1:]) if len(rows) else []
    well_cpd = cpd_of[well_starts] if len(rows) else np.array([])
    cpd_starts = np.flatnonzero(np.r_[True, well_cpd[1:] != well_cpd[:-1]]) if len(well_cpd) else np.array([], int)
    bounds = list(zip(cpd_starts, list(cpd_starts[1:]) + [len(well_cpd)]))

    samples, report = [], []
    for lo, hi in bounds:
        cpd = str(well_cpd[lo])
        wells = well_rows[lo:hi]
        w = 1.0 if weights is None else float(weights.get(cpd, 0.0))
        if len(wells) < 2:
            report.append({schema.JCP: cpd, "n_wells": len(wells), "reason": f"{len(wells)} usable well (needs 2)"})
            continue
        if w <= 0:
            report.append({schema.JCP: cpd, "n_wells": len(wells),
                           "reason": "weight 0" if weights and cpd in weights else "not in the weights table"})
            continue
        groups = [wells]
        if cfg.max_wells_per_set and len(wells) > cfg.max_wells_per_set:
            order = np.random.default_rng([cfg.seed, _stable(cpd)]).permutation(len(wells))
            n_groups = -(-len(wells) // cfg.max_wells_per_set)
            groups = [[wells[i] for i in order[g::n_groups]] for g in range(n_groups)]
        n_slots = max(len(x) for x in wells)
        if cfg.sites_per_well > 0:
            n_slots = min(n_slots, cfg.sites_per_well)
        role = str(col[schema.ROLE][wells[0][0]])
        for gi, group in enumerate(groups):
            for k in range(n_slots):
                tt = [int(sites[k % len(sites)]) for sites in group]
                cc = [control(r, cpd, k) for r in tt]
                key = f"{cpd}__s{k}" + (f"g{gi}" if len(groups) > 1 else "")
                samples.append({"key": key.replace(".", "-"), "compound": cpd, "role": role, "slot": k,
                                "weight": w, "t": tt, "c": [c for c, _ in cc], "level": [lv for _, lv in cc]})
    return samples, pd.DataFrame(report, columns=[schema.JCP, "n_wells", "reason"])


def resolve(samples: list[dict], index: pd.DataFrame) -> list[dict]:
    """Samples with row positions -> samples with their wells' index records (what `write_shard` reads)."""
    cols = ["key", "shard", "offset", "size", "codec", *META_COLUMNS]
    idx = index.reset_index(drop=True)
    needed = sorted({r for s in samples for r in s["t"] + [c for c in s["c"] if c >= 0]})
    records = dict(zip(needed, idx.loc[needed, cols].to_dict("records")))
    return [dict(s, wells=[{"t": records[t], "c": records[c] if c >= 0 else None, "level": lv}
                           for t, c, lv in zip(s["t"], s["c"], s["level"])]) for s in samples]


def assign_shards(samples: list[dict], sizes: np.ndarray, seed: int, shard_bytes: float) -> list[list[dict]]:
    """Samples shuffled by seed (a compound's slots scatter), then cut into shards of about shard_bytes.
    `sizes` are the index's member sizes (row position -> bytes)."""
    order = np.random.default_rng([seed, 7]).permutation(len(samples))
    shards, current, size = [], [], 0
    for i in order:
        s = samples[int(i)]
        current.append(s)
        size += int(sizes[s["t"]].sum()) + int(sizes[[c for c in s["c"] if c >= 0]].sum())
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
    h.update(json.dumps([FORMAT_VERSION, splits, cfg.to_dict(), sorted((weights or {}).items())], sort_keys=True,
                        default=str).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------- writing

def _sample_members(s: dict, images: dict[int, tuple[bytes, bytes | None]]) -> tuple[dict, bytes]:
    """A replicate set's `.json` document and `.pack` bytes; `images[i]` = (treated, control) encoded bytes
    of well i. Per well only what varies between wells; the compound's own fields once per sample."""
    pack, wells = bytearray(), []
    for i, e in enumerate(s["wells"]):
        treated, control = images[i]
        entry = {"meta": {c: e["t"][c] for c in WELL_COLUMNS}, "image": [len(pack), len(treated)], "control": None}
        pack += treated
        if e["c"] is not None:
            entry["control"] = {"meta": {c: e["c"][c] for c in WELL_COLUMNS}, "image": [len(pack), len(control)],
                                "level": e["level"]}
            pack += control
        wells.append(entry)
    first = s["wells"][0]["t"]
    doc = {"compound": s["compound"], "role": s["role"], "slot": s["slot"], "weight": s["weight"],
           "codec": first["codec"], "shared": {c: first[c] for c in COMPOUND_COLUMNS}, "wells": wells}
    return doc, bytes(pack)


def write_shard(samples: list[dict], plate_shards, dst) -> dict:
    """Copy the encoded site bytes of `samples` from the plate shards into one tar at `dst` (temporary
    name, then rename; tar headers carry no time or owner, so a rerun writes identical bytes).

    A sample is two members: `{key}.json` (the wells' Metadata_*, control levels, and where each image
    lies in the pack) and `{key}.pack` (the encoded images back to back: treated site i at
    wells[i].image = [offset, size], its control at wells[i].control.image). One member for all images
    keeps tar headers (512 bytes each) from costing more than small images themselves."""
    reads: dict[str, list[tuple[int, int, tuple]]] = defaultdict(list)   # plate shard -> (offset, size, id)
    for si, s in enumerate(samples):
        for i, e in enumerate(s["wells"]):
            for tag, row in (("t", e["t"]), ("c", e["c"])):
                if row is not None:
                    reads[row["shard"]].append((int(row["offset"]), int(row["size"]), (si, i, tag)))
    data: dict[tuple, bytes] = {}
    for shard, wanted in reads.items():
        with storage.open_read(plate_shards / shard) as fh:
            for offset, size, ident in sorted(wanted):
                fh.seek(offset)
                blob = fh.read(size)
                if len(blob) != size:
                    raise OSError(f"{plate_shards / shard} is truncated: a site at byte {offset} needs {size} "
                                  f"bytes, got {len(blob)}; rerun prep for its plate")
                data[ident] = blob
    n_images, size = 0, 0
    with atomic.atomic_path(dst) as tmp:
        with SampleTar(tmp) as tar:
            for si, s in enumerate(samples):
                doc, pack = _sample_members(s, {i: (data[(si, i, "t")], data.get((si, i, "c")))
                                                for i in range(len(s["wells"]))})
                tar.write({"__key__": s["key"], "json": json.dumps(doc, sort_keys=True).encode(), "pack": pack})
                n_images += len(s["wells"]) + sum(e["c"] is not None for e in s["wells"])
        if os.environ.get(DELAY_ENV):   # tests: slow each shard down so that a kill lands mid-build
            time.sleep(float(os.environ[DELAY_ENV]))
        size = tmp.stat().st_size
    return {"name": dst.name, "n_samples": len(samples), "n_images": n_images, "bytes": size,
            "checksum": tar.checksum, "compounds": sorted({s["compound"] for s in samples})}


# ----------------------------------------------------------------------------------------- pairing

def pair_score(a: dict, b: dict) -> int:
    """Higher is better: partners that differ at a coarser level first (4 = another source). Shared by
    the replicate sets' pairing and the plate-shard stream's ReplicatePairer."""
    for i, col in enumerate((schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL)):
        if a[col] != b[col]:
            return len(PAIR_LEVELS) - i
    return 0


def pair_wells(metas: list[dict], rng: np.random.Generator,
               within_source: bool = False) -> list[tuple[int, int, str]]:
    """Pairs of well indices covering every well: greedily the most different partner (another source,
    then batch, then plate), random among equals; an odd well out is paired again with its best partner.
    `within_source`: another batch of the same source first (where a source-specific phenotype is shared),
    then another source. Returns (i, j, level) with level the coarsest level at which the two differ."""
    n = len(metas)
    if n < 2:
        return []

    def rank(a: int, b: int) -> int:
        s = pair_score(metas[a], metas[b])
        return len(PAIR_LEVELS) + 1 if within_source and s == len(PAIR_LEVELS) - 1 else s

    def level(a: int, b: int) -> str:
        s = pair_score(metas[a], metas[b])
        return PAIR_LEVELS[len(PAIR_LEVELS) - s] if s else "site"

    left = list(rng.permutation(n))
    pairs = []
    while len(left) >= 2:
        i = left.pop(0)
        scores = [rank(i, j) for j in left]
        best = max(scores)
        choices = [j for j, s in zip(left, scores) if s == best]
        j = choices[int(rng.integers(len(choices)))]
        left.remove(j)
        pairs.append((int(i), int(j), level(i, j)))
    if left:
        i = left[0]
        others = [j for j in range(n) if j != i]
        j = others[int(np.argmax([rank(i, j) for j in others]))]
        pairs.append((int(i), int(j), level(i, j)))
    return pairs


# ----------------------------------------------------------------------------------------- which stream

def stream_estimates(manifest, n_slots: int, pair_buffer: int) -> dict[str, float]:
    """Images used per image read, for a method that pairs replicates but uses no controls (CLIP), on
    each path, from the manifests alone (no pixel read):

    * replicate sets: every treated image of a sample is used, its controls are read and dropped;
    * plate shards + pairing buffer: every site of the slot's shards is read (DMSO, held-out splits too);
      a treated site is used when another well of its compound reaches the same loader stream within
      `pair_buffer` sites. With a compound's w wells on w plates (shards) spread over `n_slots` streams,
      that is 1 - (1 - 1/n_slots)^(w - 1), times the share of a stream's epoch the buffer holds."""
    rs = manifest.replicate_sets
    controls = sum(rs["controls_by_level"].values())
    treated = rs["n_images"] - controls
    wells = [c["n_wells"] for c in rs["compounds"].values() if c["n_wells"] >= 2]
    w = float(np.mean(wells)) if wells else 2.0
    n_sites = max(manifest.data["n_sites"], 1)
    together = 1.0 - (1.0 - 1.0 / max(n_slots, 1)) ** (w - 1.0)
    held = min(1.0, pair_buffer / max(n_sites / max(n_slots, 1), 1.0))
    return {"replicate_sets": treated / max(rs["n_images"], 1), "plates": treated / n_sites * together * held}
