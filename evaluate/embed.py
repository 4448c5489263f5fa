"""Embed every site of a shard set with a trained image encoder (or hand-crafted features), with Ray Data.

    ./launch.sh embed CKPT SHARDS OUT [workers=N] [batch_size=N]
        CKPT: a training output dir, its checkpoints/ dir, one step dir or a model.pt; or "handcrafted"

One actor per GPU (CPU actors when there are none) maps over shards; each shard's embeddings are
written once, atomically, to OUT/parts/. A rerun recomputes only missing or corrupt parts, then
OUT/embeddings.zarr ([sites, dim] float32) and OUT/sites.parquet (Metadata_* columns) are rebuilt.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from micon import schema
from micon.config import ConfigError, load_config, save_config
from micon.data.shards import Manifest, ManifestError, read_tar_samples
from micon.raycluster import init_ray

META_COLUMNS = [schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL, schema.SITE, schema.JCP, schema.INCHIKEY,
                schema.SMILES, schema.ROLE]


@dataclass
class EmbedConfig:
    workers: int = 0          # actors (0 = one per GPU, else 2 CPU actors)
    batch_size: int = 64      # sites per forward pass
    threads: int = 1          # torch threads per CPU actor


class EmbeddingError(RuntimeError):
    pass


def part_path(out: Path, shard: str) -> Path:
    return out / "parts" / (Path(shard).name + ".npz")


def read_part(path: Path, expected_rows: int | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """One shard's part, checked; raises EmbeddingError naming the file when it is unusable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            emb = z["embeddings"]
            meta = pd.DataFrame(json.loads(str(z["meta"])))
    except FileNotFoundError:
        raise EmbeddingError(f"embedding part {path} is missing") from None
    except Exception as e:
        raise EmbeddingError(f"embedding part {path} is corrupt ({type(e).__name__}: {e})") from None
    if len(meta) != len(emb) or (expected_rows is not None and len(emb) != expected_rows):
        raise EmbeddingError(f"embedding part {path} has {len(emb)} rows, expected {expected_rows}")
    return emb, meta


class SiteEncoder:
    """Loads the image encoder once (or the hand-crafted featuriser) and embeds [N, C, H, W] uint8 sites."""

    def __init__(self, ckpt: str, manifest_dir: str, threads: int = 1):
        import torch

        self.manifest = Manifest.load(manifest_dir)
        self.handcrafted = ckpt == "handcrafted"
        self.normalize = "plate"
        if self.handcrafted:
            return
        from micon.models.factory import ModelConfig, build_model
        from train.checkpoint import load_model_weights

        torch.set_num_threads(max(threads, 1))
        ck = load_model_weights(ckpt)
        cfg = ck["config"]
        self.method = cfg["method"]
        self.normalize = cfg["data"]["normalize"]
        model_cfg = ModelConfig(**cfg["model"])
        from micon.chem.featurizer import ATOM_DIM, BOND_DIM
        model = build_model(self.method, model_cfg, len(self.manifest.channels), ATOM_DIM, BOND_DIM)
        model.load_state_dict(ck["model"])
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.model = model.to(self.device).eval()

    def __call__(self, images: np.ndarray, plates: list[str]) -> np.ndarray:
        if self.handcrafted:
            from micon.eval.handcrafted import site_features
            return np.stack([site_features(im, self.manifest.channels.index("DNA")) for im in images])
        import torch

        x = images.astype(np.float32)
        if self.normalize == "plate":
            for i, plate in enumerate(plates):
                mean, std = self.manifest.plate_stats(plate)
                x[i] = (x[i] - mean[:, None, None]) / np.maximum(std, 1e-3)[:, None, None]
        else:
            x /= 255.0
        with torch.no_grad():
            # the image encoder's embedding, before any projection head: what profiles are built from
            return self.model.image_encoder(torch.from_numpy(x).to(self.device)).float().cpu().numpy()


def embed_shard(encoder: SiteEncoder, shard: str, out: Path, batch_size: int, channels: int) -> dict:
    rows, embs, images, plates = [], [], [], []

    def flush():
        if images:
            embs.append(encoder(np.stack(images), plates))
            images.clear()
            plates.clear()

    for key, img, meta in read_tar_samples(shard, channels):
        rows.append({c: str(meta.get(c, "")) for c in META_COLUMNS})
        images.append(img)
        plates.append(meta[schema.PLATE])
        if len(images) == batch_size:
            flush()
    flush()
    emb = np.concatenate(embs).astype(np.float32) if embs else np.zeros((0, 0), np.float32)
    path = part_path(out, shard)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, embeddings=emb, meta=np.array(json.dumps(rows)))
    os.replace(tmp, path)
    return {"shard": shard, "rows": len(rows)}


class ShardEmbedder:
    """Ray Data actor: one model per actor, one shard per call."""

    def __init__(self, ckpt: str, manifest_dir: str, out: str, batch_size: int, threads: int):
        self.encoder = SiteEncoder(ckpt, manifest_dir, threads)
        self.out, self.batch_size = Path(out), batch_size

    def __call__(self, batch: dict) -> dict:
        done = [embed_shard(self.encoder, s, self.out, self.batch_size, len(self.encoder.manifest.channels))
                for s in batch["shard"]]
        return {"shard": np.array([d["shard"] for d in done]), "rows": np.array([d["rows"] for d in done])}


def consolidate(out: Path, manifest: Manifest, ckpt: str) -> dict:
    import zarr

    embs, metas = [], []
    for s in manifest.data["shards"]:
        e, m = read_part(part_path(out, s["name"]), s["n_samples"])
        embs.append(e)
        metas.append(m)
    emb = np.concatenate(embs)
    meta = pd.concat(metas, ignore_index=True)
    tmp_z = out / ".embeddings.zarr.tmp"
    shutil.rmtree(tmp_z, ignore_errors=True)
    arr = zarr.create_array(str(tmp_z), shape=emb.shape, chunks=(min(len(emb), 8192), emb.shape[1]),
                            dtype="float32", zarr_format=3)
    arr[:] = emb
    shutil.rmtree(out / "embeddings.zarr", ignore_errors=True)
    os.replace(tmp_z, out / "embeddings.zarr")
    meta.to_parquet(out / "sites.parquet.tmp", index=False)
    os.replace(out / "sites.parquet.tmp", out / "sites.parquet")
    info = dict(checkpoint=str(ckpt), shards=str(manifest.root), n_sites=len(emb), dim=int(emb.shape[1]))
    (out / "embed.json.tmp").write_text(json.dumps(info, indent=1))
    os.replace(out / "embed.json.tmp", out / "embed.json")
    return info


def load_embeddings(path: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Site metadata and embeddings written by this job; errors name the file and how to repair it."""
    import zarr

    p = Path(path)
    hint = f"rerun ./launch.sh embed CKPT SHARDS {p} to repair it"
    if not (p / "embed.json").is_file():
        raise EmbeddingError(f"{p} holds no finished embedding run (no embed.json); {hint}")
    try:
        meta = pd.read_parquet(p / "sites.parquet")
    except Exception as e:
        raise EmbeddingError(f"{p / 'sites.parquet'} is missing or corrupt ({type(e).__name__}); {hint}") from None
    try:
        emb = np.asarray(zarr.open_array(str(p / "embeddings.zarr"), mode="r")[:])
    except Exception as e:
        raise EmbeddingError(f"{p / 'embeddings.zarr'} is missing or corrupt ({type(e).__name__}: "
                             f"{str(e)[:200]}); {hint}") from None
    if len(emb) != len(meta):
        raise EmbeddingError(f"{p / 'embeddings.zarr'} has {len(emb)} rows but {p / 'sites.parquet'} has "
                             f"{len(meta)}; {hint}")
    return meta, emb


def run(ckpt: str, shards: Path, out: Path, cfg: EmbedConfig) -> dict:
    manifest = Manifest.load(shards)
    if ckpt != "handcrafted":   # fail here, with the path, rather than inside a Ray actor
        from train.checkpoint import load_model_weights
        ckpt_cfg = load_model_weights(ckpt)["config"]
        print(f"embed: {ckpt_cfg['method']} image encoder ({ckpt_cfg['model']['preset']}) from {ckpt}", flush=True)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    todo = []
    for s in manifest.data["shards"]:
        p = part_path(out, s["name"])
        if p.exists():
            try:
                read_part(p, s["n_samples"])
                continue
            except EmbeddingError as e:
                print(f"embed: {e}; recomputing it", file=sys.stderr)
                p.unlink()
        todo.append(str(manifest.root / "shards" / s["name"]))
    print(f"embed: {len(manifest.data['shards'])} shards, {len(manifest.data['shards']) - len(todo)} already "
          f"embedded, {len(todo)} to do [{ckpt}]", flush=True)
    if todo:
        import ray
        import torch

        gpus = torch.cuda.device_count()
        init_ray()
        size = cfg.workers or (gpus if gpus else min(2, os.cpu_count() or 1))
        ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
        results = ds.map_batches(
            ShardEmbedder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(size, len(todo))),
            num_gpus=1 if gpus else 0, num_cpus=cfg.threads if not gpus else 1,
            fn_constructor_kwargs=dict(ckpt=ckpt, manifest_dir=str(shards), out=str(out),
                                       batch_size=cfg.batch_size, threads=cfg.threads)).take_all()
        print(f"embed: embedded {sum(int(r['rows']) for r in results)} sites from {len(results)} shards", flush=True)
    info = consolidate(out, manifest, ckpt)
    save_config(cfg, out / "embed_config.yaml")
    return info


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    ckpt, shards, out = argv[0], Path(argv[1]), Path(argv[2])
    try:
        cfg = load_config(EmbedConfig, overrides=argv[3:])
    except ConfigError as e:
        print(f"embed: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        info = run(ckpt, shards, out, cfg)
    except (ManifestError, EmbeddingError, FileNotFoundError) as e:
        print(f"embed: {e}", file=sys.stderr)
        return 1
    print(f"embed: {info['n_sites']} sites x {info['dim']} dims -> {out / 'embeddings.zarr'} + "
          f"{out / 'sites.parquet'} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
