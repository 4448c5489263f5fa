"""The on-disk format of site embeddings, shared by the embedding job (writer) and evaluation (reader).

    OUT/parts/{shard}.npz      one shard's rows: `embeddings` [n, dim] float32 + `meta` (JSON records)
    OUT/embeddings.zarr        [sites, dim] float32, the parts concatenated in manifest order
    OUT/sites.parquet          Metadata_* columns, one row per site, same order
    OUT/embed.json             what made them (checkpoint, shard set, sizes); written last

OUT may be in object storage (s3://bucket/prefix): each object is uploaded whole and embed.json last.
Errors name the file and how to repair it. No model code here.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from micon import atomic, integrity, schema, storage

META_COLUMNS = [schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL, schema.SITE, schema.JCP, schema.INCHIKEY,
                schema.SMILES, schema.ROLE]


class EmbeddingError(RuntimeError):
    pass


def part_path(out, shard: str):
    return storage.path(out) / "parts" / (storage.path(shard).name + ".npz")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with storage.open_read(path) as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def identity_key(identity: dict) -> str:
    """A short key of what made a set of embeddings (model, shard set, preprocessing)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def describe_identity(identity: dict) -> str:
    m = identity.get("model", {})
    what = (f"{m.get('method')} checkpoint {m.get('path')} (step {m.get('step')}, sha256 {m.get('sha256', '')[:12]})"
            if "sha256" in m and "featuriser" not in m else f"{m.get('featuriser', 'unknown')} features")
    return f"{what} of shards {identity.get('shards', {}).get('path')} (manifest {identity.get('shards', {}).get('sha256', '')[:12]})"


def identity_difference(old: dict, new: dict) -> str:
    """Which of model, shard set and preprocessing differ, in words."""
    parts = []
    om, nm = old.get("model", {}), new.get("model", {})
    if {k: om.get(k) for k in ("sha256", "featuriser")} != {k: nm.get(k) for k in ("sha256", "featuriser")}:
        parts.append("another model")
    if old.get("shards", {}).get("sha256") != new.get("shards", {}).get("sha256"):
        parts.append("another shard set")
    if om.get("preprocessing") != nm.get("preprocessing"):
        parts.append("other preprocessing")
    return ", ".join(parts) or "other settings"


def write_part(path: Path, embeddings: np.ndarray, rows: list[dict], identity: str = "") -> None:
    """One shard's embeddings and metadata rows, written under a temporary name and renamed. The npz (a zip)
    records a CRC-32 of each member, which numpy's reader checks: a damaged part fails in read_part."""
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as fh:   # a full disk leaves no half-written part
        np.savez(fh, embeddings=embeddings.astype(np.float32), meta=np.array(json.dumps(rows)),
                 identity=np.array(identity))


def read_part(path: Path, expected_rows: int | None = None,
              identity: str | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """One shard's part, checked; raises EmbeddingError naming the file when it is unusable or was made
    by something else than `identity` (a key from `identity_key`)."""
    try:
        with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as z:
            emb = z["embeddings"]
            meta = pd.DataFrame(json.loads(str(z["meta"])))
            made_by = str(z["identity"]) if "identity" in z.files else ""
    except FileNotFoundError:
        raise EmbeddingError(f"embedding part {path} is missing") from None
    except Exception as e:
        raise EmbeddingError(f"embedding part {path} is corrupt ({type(e).__name__}: {e})") from None
    if len(meta) != len(emb) or (expected_rows is not None and len(emb) != expected_rows):
        raise EmbeddingError(f"embedding part {path} has {len(emb)} rows, expected {expected_rows}")
    if identity is not None and made_by != identity:
        raise EmbeddingError(f"embedding part {path} was made by another model or shard set ({made_by or 'unknown'}, "
                             f"this run is {identity})")
    return emb, meta


def array_checksum(emb: np.ndarray, like: str | None = None) -> str:
    """The consolidated embeddings' checksum (embed.json `checksum`; `sha256` in runs made before it)."""
    return integrity.of_array(np.ascontiguousarray(emb, dtype=np.float32), like)


def write_consolidated(out: Path, emb: np.ndarray, meta: pd.DataFrame, info: dict) -> dict:
    """embeddings.zarr + sites.parquet, then embed.json (last: its presence means the rest is whole)."""
    import zarr

    out = storage.path(out)
    if isinstance(out, storage.ObjectPath):     # no atomic swap in a bucket: the old record goes first
        (out / "embed.json").unlink(missing_ok=True)
    atomic.remove_leftovers(out, r"embeddings\.zarr")   # a killed run's half-built array
    with atomic.atomic_path(out / "embeddings.zarr") as tmp_z:
        arr = zarr.create_array(str(tmp_z), shape=emb.shape, chunks=(max(1, min(len(emb), 8192)), max(1, emb.shape[1])),
                                dtype="float32", zarr_format=3)
        arr[:] = emb
        storage.remove_tree(out / "embeddings.zarr")
    atomic.write_parquet(out / "sites.parquet", meta)
    info = dict(info, n_sites=int(len(emb)), dim=int(emb.shape[1]) if emb.ndim == 2 else 0,
                checksum=array_checksum(emb), checksums={"sites.parquet": storage.checksum(out / "sites.parquet")})
    atomic.write_json(out / "embed.json", info)
    return info


def load_embeddings(path: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Site metadata and embeddings written by the embedding job; errors name the file and how to repair it."""
    import zarr

    p = storage.path(path)
    hint = f"rerun ./launch.sh embed CKPT SHARDS {p} to repair it"
    if not p.is_dir():
        raise EmbeddingError(f"{p} does not exist: embed first with ./launch.sh embed CKPT SHARDS {p}")
    if not (p / "embed.json").is_file():
        raise EmbeddingError(f"{p} holds no finished embedding run (no embed.json); {hint}")
    info = json.loads((p / "embed.json").read_text())
    if (p / "sites.parquet").is_file() and not integrity.matches(
            lambda like: storage.checksum(p / "sites.parquet", like), info.get("checksums", {}).get("sites.parquet")):
        raise EmbeddingError(f"{p / 'sites.parquet'} is missing or corrupt (it does not match the checksum recorded "
                             f"in embed.json when it was written); {hint}")
    try:
        meta = pd.read_parquet(io.BytesIO(storage.read_bytes(p / "sites.parquet")))
    except Exception as e:
        raise EmbeddingError(f"{p / 'sites.parquet'} is missing or corrupt ({type(e).__name__}); {hint}") from None
    try:
        emb = np.asarray(zarr.open_array(storage.zarr_store(p / "embeddings.zarr", read_only=True), mode="r")[:])
    except Exception as e:
        raise EmbeddingError(f"{p / 'embeddings.zarr'} is missing or corrupt ({type(e).__name__}: "
                             f"{str(e)[:200]}); {hint}") from None
    if len(emb) != len(meta):
        raise EmbeddingError(f"{p / 'embeddings.zarr'} has {len(emb)} rows but {p / 'sites.parquet'} has "
                             f"{len(meta)}; {hint}")
    recorded = info.get("checksum", info.get("sha256"))
    if info.get("n_sites", len(emb)) != len(emb) or not integrity.matches(lambda like: array_checksum(emb, like),
                                                                           recorded):
        # zarr reads a lost chunk as its fill value: the array is whole-looking and wrong
        raise EmbeddingError(f"{p / 'embeddings.zarr'} does not match the checksum recorded in embed.json when it was "
                             f"written (a chunk lost or changed); {hint}")
    return meta, emb


def read_feature_names(path: str | Path) -> list[str] | None:
    """The feature names a featuriser recorded in `path`/embed.json (`"feature_names"`, one per column,
    e.g. CellProfiler's `Nuclei_AreaShape_Area`), or None when it recorded none (learned embeddings)."""
    info_path = storage.path(path) / "embed.json"
    try:
        info = json.loads(info_path.read_text())
    except FileNotFoundError:
        raise EmbeddingError(f"{storage.path(path)} holds no finished embedding run (no embed.json)") from None
    except ValueError as e:
        raise EmbeddingError(f"{info_path} is not valid JSON ({e}); rerun the embed job to repair it") from None
    names = info.get("feature_names")
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) and n and not n.startswith("Metadata_")
                                                for n in names):
        raise EmbeddingError(f"{info_path}: feature_names must be a list of non-empty strings, none starting with "
                             f"Metadata_ (the prefix of metadata columns)")
    if "dim" in info and len(names) != info["dim"]:
        raise EmbeddingError(f"{info_path}: {len(names)} feature_names for {info['dim']} embedding columns; "
                             f"rerun the embed job")
    dup = sorted(pd.Series(names)[pd.Series(names).duplicated()].unique())
    if dup:
        raise EmbeddingError(f"{info_path}: feature_names repeat {dup[:5]}; each column needs its own name")
    return names
