"""Ray job: JUMP compound table -> RDKit graphs + Morgan fingerprints in a graph store.

    ./launch.sh featurize COMPOUNDS OUT [key=value ...]   (keys and their defaults: --help)

COMPOUNDS is metadata/compound.csv.gz (Metadata_JCP2022, Metadata_InChIKey, Metadata_InChI,
Metadata_SMILES; .csv, .csv.gz or .parquet) or a shard manifest.json with a "compounds" list.
One Ray task per chunk of compounds writes OUT/parts/part-NNNNN-<digest>.npz atomically; a rerun
skips parts that exist, so a killed job resumes where it stopped. The parts are then consolidated
into OUT/graphs.zarr + OUT/index.parquet (built aside, then renamed in) and OUT/featurize.json marks
the store complete. Compounds that cannot be featurised get status "error" and a reason in the index.
OUT (and COMPOUNDS) may be in object storage (s3://bucket/prefix, any fsspec URL): parts are uploaded
whole, the store is built locally and uploaded, and the marker is written last.
Ray runs locally (workers CPUs) unless RAY_ADDRESS names a running cluster.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, ClassVar

import numpy as np
import pandas as pd

from micon import atomic, schema, storage
from micon.chem.compound import FeaturizeOptions, featurize_chunk
from micon.chem.compound_table import plan_items, read_compounds  # noqa: F401  (the job reads the table here)
from micon.chem.standardize import DEFAULT_MAX_ATOMS
from micon.chem.store import (INDEX_COLUMNS, INDEX_NAME, OK, STORE_FORMAT, ZARR_NAME, RaggedGraphs,
                              write_store)
from micon.config import (ConfigError, NonNegativeInt, PositiveInt, Range, describe, help_or_usage, load_config,
                          to_dict)
from micon.locks import LockHeld, run_lock
from micon.raycluster import JobError, describe_failure, init_ray

MARKER = "featurize.json"
PARTS = "parts"
# Seconds each chunk task sleeps before working; only the kill-and-resume test sets it.
DELAY_ENV = "MICON_FEATURIZE_TEST_DELAY_S"


@dataclasses.dataclass
class FeaturizeConfig:
    radius: PositiveInt = 2  # Morgan fingerprint radius
    n_bits: Annotated[int, Range(8)] = 2048  # Morgan fingerprint length in bits (a multiple of 8)
    tautomers: bool = False  # canonicalise tautomers before featurising
    max_atoms: PositiveInt = DEFAULT_MAX_ATOMS  # heavier molecules get status error
    chunk_size: PositiveInt = 1000  # compounds per Ray task and per part file
    workers: NonNegativeInt = 0      # Ray CPUs for a local cluster; 0 = every core of this machine (as prep, embed)
    ALIASES: ClassVar[dict] = {"num_workers": "workers"}    # the old key, still read
    seed: NonNegativeInt = 0  # order in which compounds are dealt into chunks; the store itself is sorted by id

    def validate(self) -> None:
        if self.n_bits % 8:
            raise ConfigError(f"n_bits={self.n_bits}: must be a positive multiple of 8 (fingerprints are bit-packed)")

    def options(self) -> FeaturizeOptions:
        return FeaturizeOptions(self.radius, self.n_bits, self.tautomers, self.max_atoms)


# --------------------------------------------------------------------------- input

def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_chunks(items, cfg: FeaturizeConfig) -> list[tuple[str, list]]:
    """Deal items into chunks (order shuffled by seed, so big molecules spread out); each chunk is named
    by a digest of its content and the featurisation options, so a part on disk is reused only for
    exactly the same work."""
    order = np.random.default_rng(cfg.seed).permutation(len(items))
    opts = cfg.options().as_dict()
    chunks = []
    for i, start in enumerate(range(0, len(items), cfg.chunk_size)):
        chunk = [items[j] for j in order[start:start + cfg.chunk_size]]
        key = digest([STORE_FORMAT, opts, [(c, k, [dataclasses.astuple(s) for s in ss]) for c, k, ss in chunk]])
        chunks.append((f"part-{i:05d}-{key}.npz", chunk))
    return chunks


# --------------------------------------------------------------------------- parts (Ray tasks)

def write_part(path, columns: dict, graphs: RaggedGraphs) -> None:
    """npz written under a temporary name, then renamed (or uploaded whole): a part is always complete."""
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{f"col_{k}": v for k, v in columns.items()}, **graphs.arrays())


def read_part(path) -> tuple[dict, RaggedGraphs]:
    with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as z:
        columns = {k[4:]: z[k] for k in z.files if k.startswith("col_")}
        graphs = RaggedGraphs(**{k: z[k] for k in z.files if not k.startswith("col_")})
    return columns, graphs


def run_chunk(items, opts: FeaturizeOptions, path: str) -> dict:
    """The Ray task: featurise one chunk and write its part. Returns counts for the progress bar."""
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    if delay:
        time.sleep(delay)
    cpu0 = time.process_time()
    columns, graphs = featurize_chunk(items, opts)
    write_part(storage.path(path), columns, graphs)
    return {"compounds": len(items), "failed": int((columns["status"] != OK).sum()),
            "cpu_s": time.process_time() - cpu0}


def run_chunks_with_ray(pending: list[tuple[Path, list]], cfg: FeaturizeConfig) -> dict[str, float]:
    """Run the chunk tasks; returns seconds spent starting Ray, featurising and stopping Ray."""
    import ray
    from micon.progress import bar as progress_bar

    t0 = time.perf_counter()
    init_ray(cfg.workers, object_store_mb=200)
    t1 = time.perf_counter()
    try:
        task = ray.remote(num_cpus=1, max_retries=2)(run_chunk)
        opts = cfg.options()
        chunk_of = {task.remote(items, opts, str(path)): path for path, items in pending}
        refs = list(chunk_of)
        failed, cpu = 0, 0.0
        with progress_bar(total=sum(len(items) for _, items in pending), unit="cpd", desc="featurize",
                  mininterval=1.0, file=sys.stderr) as bar:
            while refs:
                done, refs = ray.wait(refs, num_returns=1)
                try:
                    counts = ray.get(done[0])
                except Exception as e:   # finished chunks stay; a rerun redoes only the missing ones
                    path = chunk_of[done[0]]
                    log_dir = path.parent.parent if isinstance(path, Path) else None    # no log file in a bucket
                    raise describe_failure("featurize", f"chunk {path.name}", e, log_dir) from None
                failed += counts["failed"]
                cpu += counts["cpu_s"]
                bar.update(counts["compounds"])
                bar.set_postfix(failed=failed, refresh=False)
        t2 = time.perf_counter()
    finally:
        ray.shutdown()
    # chunk cpu: CPU seconds the tasks used, summed; compare with the chunks' wall time for parallel efficiency
    return {"ray_start": t1 - t0, "chunks": t2 - t1, "chunk_cpu": cpu, "ray_stop": time.perf_counter() - t2}


# --------------------------------------------------------------------------- consolidation

def consolidate(out, part_paths: list, cfg: FeaturizeConfig, input_digest: str) -> pd.DataFrame:
    """Parts -> graphs.zarr + index.parquet, sorted by compound id, built in a temporary directory
    and renamed into place (in object storage: built locally, then uploaded over the old store's objects).
    Removes the completion marker first; the caller writes it last."""
    cols, graphs = [], []
    for p in part_paths:
        c, g = read_part(p)
        cols.append(c)
        graphs.append(g)
    for c in cols:   # parts written before structures were flagged
        c.setdefault("flags", np.full(len(c["status"]), "", dtype=str))
    index = pd.DataFrame({k: np.concatenate([c[k] for c in cols]) for k in cols[0]}) if cols else \
        pd.DataFrame({k: pd.Series(dtype=str) for k in INDEX_COLUMNS[:5]})
    all_graphs = RaggedGraphs.concat(graphs) if graphs else RaggedGraphs.from_encoded([], [], cfg.n_bits)
    order = np.argsort(index[schema.JCP].to_numpy(), kind="stable")
    index = index.iloc[order].reset_index(drop=True)
    all_graphs = all_graphs.take(order)
    index["n_atoms"] = np.diff(all_graphs.atom_offsets)
    index["n_bonds"] = np.diff(all_graphs.bond_offsets)
    index = index[list(INDEX_COLUMNS)]

    remote = isinstance(out, storage.ObjectPath)
    tmp = atomic.temp_path(out / "consolidate") if remote else out / f".tmp-consolidate-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_store(tmp, index, all_graphs, radius=cfg.radius, n_bits=cfg.n_bits,
                extra_attrs={"input_digest": input_digest})
    (out / MARKER).unlink(missing_ok=True)
    if remote:      # no rename in object storage: the old store goes, the new one is uploaded object by object
        for name in (ZARR_NAME, INDEX_NAME):
            storage.remove_tree(out / name)
        storage.put_tree(tmp / ZARR_NAME, out / ZARR_NAME)
        storage.put_file(tmp / INDEX_NAME, out / INDEX_NAME)
        shutil.rmtree(tmp)
        return index
    for name in (ZARR_NAME, INDEX_NAME):
        old = out / name
        if old.is_dir():
            trash = out / f".trash-{name}-{os.getpid()}"
            os.replace(old, trash)
            shutil.rmtree(trash)
        os.replace(tmp / name, old)
    tmp.rmdir()
    return index


def write_json(path: Path, obj) -> None:
    atomic.write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_marker(out) -> dict | None:
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return marker if (out / ZARR_NAME).is_dir() and (out / INDEX_NAME).is_file() else None


def summary_line(counts: dict, out: Path, seconds: float, cfg: FeaturizeConfig, extra: str = "") -> str:
    return (f"featurize: {counts['compounds']} compounds -> {counts['ok']} graphs, {counts['failed']} failed "
            f"(reasons in {out / INDEX_NAME}); {extra}{seconds:.1f} s "
            f"[radius={cfg.radius} n_bits={cfg.n_bits} tautomers={cfg.tautomers} max_atoms={cfg.max_atoms}]")


def run(compounds, out, cfg: FeaturizeConfig) -> dict:
    t0 = time.time()
    compounds, out = storage.path(compounds), storage.path(out)
    table = read_compounds(compounds)
    items, problems = plan_items(table)
    for p in problems[:5]:
        print(f"featurize: {compounds}: {p}", file=sys.stderr)
    chunks = plan_chunks(items, cfg)
    input_digest = digest([STORE_FORMAT, cfg.options().as_dict(), sorted(name for name, _ in chunks)])

    out.mkdir(parents=True, exist_ok=True)
    marker = read_marker(out)
    if marker is not None and marker.get("input_digest") == input_digest:
        print(summary_line(marker["counts"], out, time.time() - t0, cfg, "up to date, nothing to do; "))
        return marker["counts"]

    parts_dir = out / PARTS
    parts_dir.mkdir(exist_ok=True)
    atomic.remove_leftovers(parts_dir)  # half-written by a killed run
    paths = [parts_dir / name for name, _ in chunks]
    pending = [(p, items_) for p, (_, items_) in zip(paths, chunks) if not p.exists()]
    print(f"featurize: {len(items)} compounds from {compounds} in {len(chunks)} chunks "
          f"({len(chunks) - len(pending)} already done); config {describe(cfg)}", file=sys.stderr)
    phases = run_chunks_with_ray(pending, cfg) if pending else {}
    t_consolidate = time.perf_counter()

    counts = {"compounds": len(items), "chunks": len(chunks), "chunks_run": len(pending)}
    marker = {"input_digest": input_digest, "compounds_table": str(compounds), "config": to_dict(cfg)}
    index = consolidate(out, paths, cfg, input_digest)
    phases["consolidate"] = time.perf_counter() - t_consolidate
    failed = index[index.status != OK]
    counts.update(ok=int(len(index) - len(failed)), failed=int(len(failed)))
    write_json(out / MARKER, {**marker, "counts": counts})
    keep = {p.name for p in paths}
    stale = [p for p in parts_dir.glob("part-*.npz") if p.name not in keep]
    for p in stale:  # parts of another input or config: never valid for this store again
        p.unlink()

    if len(failed):
        print(f"featurize: {len(failed)} of {len(index)} compounds have no graph, for example:")
        for r in failed.head(5).itertuples(index=False):
            print(f"  {r.Metadata_JCP2022}: {r.reason}")
    flagged = index[(index.status == OK) & (index["flags"] != "")]
    if len(flagged):
        print(f"featurize: {len(flagged)} compounds are metal-containing or inorganic, kept whole and flagged in "
              f"{out / INDEX_NAME} (column flags), for example: " + ", ".join(
                  f"{r.Metadata_JCP2022} ({r.flags})" for r in flagged.head(3).itertuples(index=False)))
    timing = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in phases.items())
    print(summary_line(counts, out, time.time() - t0, cfg,
                       f"{len(pending)} of {len(chunks)} chunks featurised, {len(chunks) - len(pending)} reused; "
                       f"{timing}; total "))
    return {**counts, "seconds": phases}


def main(argv: list[str]) -> int:
    if (rc := help_or_usage(argv, __doc__, FeaturizeConfig, positional=2)) is not None:
        return rc
    try:
        cfg = load_config(FeaturizeConfig, overrides=argv[2:])
        with run_lock(argv[1], job="featurize"):    # one featurize per OUT: a second is refused, naming the first
            counts = run(argv[0], argv[1], cfg)
    except LockHeld as e:
        print(e, file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"featurize: {e}", file=sys.stderr)
        return 2
    except JobError as e:
        print(e, file=sys.stderr)
        return 1
    if not counts.get("ok"):
        # a store with no graph cannot train anything: say so with a non-zero exit, not a quiet 0
        print(f"featurize: no compound of {argv[0]} could be featurised ({counts.get('failed', 0)} failed; reasons in "
              f"{storage.path(argv[1]) / INDEX_NAME}); check the SMILES column", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
