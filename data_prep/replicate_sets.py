"""Replicate-set shards from plate shards: the last stage of prep, or a job of its own.

    ./launch.sh rsets SHARDS [key=value ...]          (keys and their defaults: --help)

Ray tasks index the plate shards (tar headers and JSON members only) into SHARDS/site_index.parquet,
the planner groups each training compound's wells with a same-plate DMSO site per well
(micon.data.replicate_sets), and one Ray task per output shard copies the encoded bytes by offset into
SHARDS/replicate_sets/rset-NNNNN.tar. Compounds left out (fewer than two usable wells, weight 0) are
listed in SHARDS/replicate_sets_report.csv. Restartable: a shard is renamed into place only when
whole, and a rerun with the same inputs and options keeps finished shards and writes identical bytes;
other options rebuild from scratch, saying so. SHARDS may be an object-storage URL (micon.storage): shards
are then uploaded whole and the manifest, written last, is what says the set is complete.
"""
from __future__ import annotations

import dataclasses
import io
import json
import sys
import time
from pathlib import Path

import pandas as pd

from micon import atomic, schema, storage
from micon.config import ConfigError, dump, help_or_usage, load_config
from micon.data.replicate_sets import (FORMAT_VERSION, INDEX_FILE, REPORT_FILE, RSET_DIR, ReplicateSetConfig,
                                       assign_shards, index_shard, plan_fingerprint, plan_replicate_sets, resolve,
                                       write_shard)
from micon.data.shards import Manifest, ManifestError
from micon.locks import LockHeld, run_lock
from micon.raycluster import JobError, describe_failure, init_ray


def read_weights(path: str) -> dict[str, float]:
    p = Path(path)
    try:
        table = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
    except Exception as e:
        raise ConfigError(f"weights={path}: cannot read it ({type(e).__name__}: {e}); expected a CSV or parquet "
                          f"table with columns {schema.JCP}, weight") from None
    if schema.JCP not in table.columns or "weight" not in table.columns:
        raise ConfigError(f"weights={path} needs columns {schema.JCP} and weight; it has {list(table.columns)}")
    return dict(zip(table[schema.JCP].astype(str), table["weight"].astype(float)))


def _read_json(path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def site_index(root, manifest: Manifest, ray) -> pd.DataFrame:
    """The site index of every plate shard (reused when the shard set has not changed)."""
    path, stamp_path = root / INDEX_FILE, root / (INDEX_FILE + ".json")
    stamp = [[s["name"], s["bytes"]] for s in manifest.data["shards"]]
    if _read_json(stamp_path) == stamp and path.is_file():
        return pd.read_parquet(io.BytesIO(storage.read_bytes(path)))
    task = ray.remote(num_cpus=1)(index_shard)
    refs = [task.remote(str(root / "shards" / s["name"])) for s in manifest.data["shards"]]
    index = pd.DataFrame([r for chunk in ray.get(refs) for r in chunk])
    atomic.write_parquet(path, index)
    atomic.write_json(stamp_path, stamp)
    return index


def build(root, cfg: ReplicateSetConfig, workers: int = 0, progress: bool = True) -> dict:
    """Build (or finish) the replicate-set shards of the shard set at `root`; returns their manifest."""
    from micon.progress import bar as progress_bar

    t0 = time.perf_counter()
    manifest = Manifest.load(root)
    ray = init_ray(workers)
    index = site_index(root, manifest, ray)
    if cfg.shard_mb <= 0:   # as large as the plate shards
        cfg = dataclasses.replace(cfg, shard_mb=float(manifest.data.get("shard_mb", 64.0)))
    weights = read_weights(cfg.weights) if cfg.weights else None
    fingerprint = plan_fingerprint(index, manifest.data["splits"], cfg, weights)
    out = root / RSET_DIR
    done_path = out / "manifest.json"
    done = _read_json(done_path)
    if done is not None and done.get("fingerprint") == fingerprint:
        print(f"rsets: replicate sets in {out} are up to date ({fingerprint})", flush=True)
        return done
    plan_path = out / "plan.json"
    for doc in (done, _read_json(plan_path)):     # built, or half-built, from other plate shards or options
        if doc is not None and doc.get("fingerprint") != fingerprint:
            print(f"rsets: {out} was made from other plate shards or options; rebuilding it", file=sys.stderr)
            storage.remove_tree(out)
            break
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob("*.tmp"):
        leftover.unlink()            # a killed writer's partial shard (micon.atomic's names end in .tmp too)
    samples, report = plan_replicate_sets(index, manifest.data["splits"], cfg, weights)
    shards = assign_shards(samples, index["size"].to_numpy(), cfg.seed, cfg.shard_mb * 1e6)
    names = [f"rset-{i:05d}.tar" for i in range(len(shards))]
    atomic.write_json(plan_path, {"fingerprint": fingerprint, "shards": names})
    atomic.write_csv(root / REPORT_FILE, report)
    present = {p.name for p in out.glob("rset-*.tar")}       # one listing (one request in object storage)
    todo = [i for i, n in enumerate(names) if n not in present]
    print(f"rsets: {len(samples)} replicate sets of {len({s['compound'] for s in samples})} compounds in "
          f"{len(shards)} shards, {len(shards) - len(todo)} already written, {len(todo)} to write; "
          f"{len(report)} compounds left out (see {root / REPORT_FILE})", flush=True)
    task = ray.remote(num_cpus=1, max_retries=0)(write_shard)
    pending = {task.remote(resolve(shards[i], index), root / "shards", out / names[i]): i for i in todo}
    bar = progress_bar(total=len(todo), desc="rsets shards", unit="shard", disable=not progress)
    checksums = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            i = pending.pop(ref)
            try:
                written = ray.get(ref)
            except Exception as e:   # shards already renamed into place stay; a rerun writes the rest
                raise describe_failure("rsets", f"shard {names[i]}", e, root) from None
            checksums[written["name"]] = written["checksum"]
            bar.update()
    bar.close()
    records = []
    for name, group in zip(names, shards):
        p = out / name
        records.append({"name": name, "n_samples": len(group), "bytes": p.stat().st_size,
                        # a shard an earlier, killed run finished is read once more for its checksum
                        "checksum": checksums.get(name) or storage.checksum(p),
                        "n_images": sum(len(s["t"]) + sum(c >= 0 for c in s["c"]) for s in group)})
    per_compound: dict[str, dict] = {}
    for s in samples:
        c = per_compound.setdefault(s["compound"], {"n_wells": 0, "n_sets": 0, "weight": s["weight"],
                                                    "role": s["role"]})
        c["n_sets"] += 1
        c["n_wells"] += len(s["t"]) if s["slot"] == 0 else 0
    levels = pd.Series([lv for s in samples for lv in s["level"]]).value_counts().to_dict()
    doc = {"fingerprint": fingerprint, "config": cfg.to_dict(), "format": "micon-replicate-sets",
           "version": FORMAT_VERSION,
           "shards": records, "n_samples": len(samples), "n_images": sum(r["n_images"] for r in records),
           "bytes": sum(r["bytes"] for r in records), "controls_by_level": levels,
           "compounds": per_compound, "left_out": dict(zip(report[schema.JCP], report["reason"]))}
    atomic.write_json(done_path, doc)
    plan_path.unlink(missing_ok=True)
    mb = doc["bytes"] / 1e6
    print(f"rsets: wrote {len(samples)} replicate sets ({doc['n_images']} images, {mb:.1f} MB, "
          f"{doc['bytes'] / max(doc['n_images'], 1) / 1e3:.1f} kB/image) in {len(records)} shards under {out} in "
          f"{time.perf_counter() - t0:.1f} s; controls by level {levels}", flush=True)
    return doc


def main(argv: list[str]) -> int:
    if (rc := help_or_usage(argv, __doc__, ReplicateSetConfig, positional=1)) is not None:
        return rc
    try:
        root = storage.path(argv[0])
    except ValueError as e:          # credentials in the URL (micon.storage.check_url)
        print(f"rsets: {e}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(ReplicateSetConfig, overrides=argv[1:])
        Manifest.load(root)     # a missing shard set named before the lock would make its directory
        with run_lock(root, job="rsets"):     # one writer per shard set: a second rsets or a prep is refused
            build(root, cfg)
    except LockHeld as e:
        print(e, file=sys.stderr)
        return 2
    except (ConfigError, ManifestError, JobError) as e:
        print(e if isinstance(e, JobError) else f"rsets: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    atomic.write_text(root / RSET_DIR / "rsets_config.yaml", dump(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
