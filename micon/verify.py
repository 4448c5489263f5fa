"""Check stored outputs against the checksums recorded when they were written: plate shards, replicate
sets, control bank, graph store, embeddings, whichever a directory (or the directories under it) holds.
Local paths and object storage (s3://..., through micon.storage) alike.
Reading only: nothing is repaired or removed here; the `verify` job prints what is damaged.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from micon import integrity, schema, storage

# an artefact's root, recognised by the file its writer puts there last
MARKERS = (("manifest.json", "shard set"), ("graphs.zarr", "graph store"), ("embed.json", "embeddings"))


@dataclass
class Check:
    """One stored object: what kind, where, how many bytes, and a function returning its problem (None: whole;
    "unverified": nothing recorded to check it against)."""

    kind: str
    path: Path
    nbytes: int
    run: Callable[[], str | None]


@dataclass
class Report:
    checked: list[tuple[Check, str | None]] = field(default_factory=list)

    @property
    def damaged(self) -> list[tuple[Check, str]]:
        return [(c, p) for c, p in self.checked if p not in (None, UNVERIFIED)]

    @property
    def unverified(self) -> list[Check]:
        return [c for c, p in self.checked if p == UNVERIFIED]


UNVERIFIED = "unverified"


def _size(path) -> int:
    """Bytes of a file or object, or of everything under a directory or prefix (0 when nothing is there)."""
    if isinstance(path, storage.ObjectPath):
        fs, key = storage.filesystem(str(path))
        try:
            return int(storage.call(lambda: fs.du(key, total=True), str(path)) or 0)
        except FileNotFoundError:
            return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _zarr(path, group: bool = False):
    import zarr
    store = storage.zarr_store(path, read_only=True)
    return zarr.open_group(store, mode="r") if group else zarr.open_array(store, mode="r")


def _read_json(path) -> dict:
    return json.loads(storage.path(path).read_text())


def _compare(expected: str | None, actual_of: Callable[[str], str]) -> str | None:
    if expected is None:
        return UNVERIFIED
    actual = actual_of(expected)
    return None if actual == expected else f"checksum mismatch (recorded {expected}, found {actual})"


def _file_check(kind: str, path: Path, expected: str | None, size: int | None = None) -> Check:
    def run() -> str | None:
        if not path.is_file():
            return "missing"
        if size is not None and path.stat().st_size != size:
            return f"{path.stat().st_size} bytes, the manifest records {size} (truncated or extended)"
        return _compare(expected, lambda like: storage.checksum(path, like))
    return Check(kind, path, size if size is not None else _size(path), run)


# ----------------------------------------------------------------------------- per kind

def shard_set_checks(root: Path) -> list[Check]:
    """Plate shards, controls.parquet, every DMSO site of the control bank, and the replicate sets."""
    m = _read_json(root / "manifest.json")
    if m.get("format") == "micon-replicate-sets":       # the replicate-set directory itself
        return replicate_set_checks(root, m)
    checks = [_file_check("plate shard", root / "shards" / s["name"], s.get("checksum"), s.get("bytes"))
              for s in m.get("shards", [])]
    table_path = root / "controls.parquet"
    checks.append(_file_check("control table", table_path, m.get("checksums", {}).get("controls.parquet")))
    if table_path.is_file():
        try:
            table = pd.read_parquet(io.BytesIO(storage.read_bytes(table_path)))
        except Exception:               # reported by the control table's own check
            table = None
        if table is not None:
            for plate, rows in table.groupby(schema.PLATE, sort=True):
                checks.append(_control_plate_check(root / "control_bank.zarr", str(plate), rows))
    rs = root / "replicate_sets" / "manifest.json"
    if rs.is_file():
        checks += replicate_set_checks(rs.parent, _read_json(rs))
    return checks


def _control_plate_check(bank: Path, plate: str, rows: pd.DataFrame) -> Check:
    def run() -> str | None:
        try:
            arr = np.asarray(_zarr(bank / plate)[:])
        except Exception as e:
            return f"unreadable ({type(e).__name__}: {str(e)[:120]})"
        if "checksum" not in rows.columns or rows["checksum"].isna().any():
            return UNVERIFIED
        bad = [int(r) for r, c in zip(rows["row"], rows["checksum"])
               if r >= len(arr) or integrity.of_array(arr[r], c) != c]
        return f"DMSO sites {bad[:10]}{' ...' if len(bad) > 10 else ''} of {len(rows)} damaged" if bad else None
    return Check("control bank plate", bank / plate, _size(bank / plate), run)


def replicate_set_checks(directory: Path, m: dict) -> list[Check]:
    return [_file_check("replicate-set shard", directory / s["name"], s.get("checksum"), s.get("bytes"))
            for s in m.get("shards", [])]


def graph_store_checks(root: Path) -> list[Check]:
    from micon.chem.store import INDEX_NAME, ZARR_NAME

    try:
        recorded = dict(_zarr(root / ZARR_NAME, group=True).attrs).get("checksums")
    except Exception as e:      # the message is kept: `e` itself is unbound once the except block ends
        problem = f"unreadable ({type(e).__name__}: {str(e)[:120]})"
        return [Check("graph store", root / ZARR_NAME, _size(root / ZARR_NAME), lambda: problem)]
    recorded = recorded or {}
    checks = [_file_check("graph index", root / INDEX_NAME, recorded.get(INDEX_NAME))]
    for name in sorted(n for n in (p.name for p in (root / ZARR_NAME).iterdir() if p.is_dir())):
        def run(name=name) -> str | None:
            try:
                arr = np.asarray(_zarr(root / ZARR_NAME, group=True)[name][:])
            except Exception as e:
                return f"unreadable ({type(e).__name__}: {str(e)[:120]})"
            return _compare(recorded.get(name), lambda like: integrity.of_array(arr, like))
        checks.append(Check("graph array", root / ZARR_NAME / name, _size(root / ZARR_NAME / name), run))
    return checks


def embedding_checks(root: Path) -> list[Check]:
    from micon.embeddings import EmbeddingError, array_checksum, read_part

    info = _read_json(root / "embed.json")

    def consolidated() -> str | None:
        try:
            emb = np.asarray(_zarr(root / "embeddings.zarr")[:])
        except Exception as e:
            return f"unreadable ({type(e).__name__}: {str(e)[:120]})"
        return _compare(info.get("checksum", info.get("sha256")), lambda like: array_checksum(emb, like))

    checks = [Check("embeddings", root / "embeddings.zarr", _size(root / "embeddings.zarr"), consolidated),
              _file_check("embedding sites", root / "sites.parquet", info.get("checksums", {}).get("sites.parquet"))]
    for part in sorted((root / "parts").glob("*.npz")):
        def run(part=part) -> str | None:      # an npz is a zip: numpy checks each member's CRC-32 as it reads
            try:
                read_part(part)
            except (EmbeddingError, OSError) as e:
                return str(e).replace(f"embedding part {part} ", "")
            return None
        checks.append(Check("embedding part", part, _size(part), run))
    return checks


KINDS = {"shard set": shard_set_checks, "graph store": graph_store_checks, "embeddings": embedding_checks}


def artefact_roots(path) -> list[tuple[str, Path]]:
    """(kind, root) of every artefact at or under `path` (a local path, or an object URL or ObjectPath),
    found by its writer's last file; the insides of an artefact (shards/, parts/, zarr stores) are not searched."""
    path = storage.path(path)
    found = []
    for marker, kind in MARKERS:
        if (path / marker).exists():
            found.append((kind, path))
    if found:
        return found
    if path.is_dir():
        for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")
                          and not p.name.endswith(".zarr")):
            found += artefact_roots(sub)
    return found


def checks_under(path) -> list[Check]:
    return [c for kind, root in artefact_roots(storage.path(path)) for c in KINDS[kind](root)]
