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
from micon.checkpoint import CheckpointError, load_checkpoint
from micon.config import ConfigError, load_config, save_config
from micon.data.preprocess import SitePreprocessor
from micon.data.codecs import decode
from micon.data.shards import Manifest, ManifestError, read_tar_encoded
from micon.embeddings import (META_COLUMNS, EmbeddingError, describe_identity, identity_difference, identity_key,
                              part_path, read_part, sha256_file, write_consolidated, write_part)
from micon.raycluster import init_ray


@dataclass
class EmbedConfig:
    workers: int = 0          # actors (0 = one per GPU, else 2 CPU actors)
    batch_size: int = 64      # sites per forward pass
    threads: int = 1          # per actor: torch threads on a CPU; on a GPU, threads decoding the next batch
                              # while the GPU embeds this one (decoding, not the GPU, bounds one thread)
    overwrite: bool = False   # replace embeddings of another model or shard set found in OUT (else refuse)


class SiteEncoder:
    """Loads the image encoder once (or the hand-crafted featuriser) and embeds [N, C, H, W] uint8 sites,
    preprocessed exactly as in training (micon.data.preprocess, settings from the checkpoint's record)."""

    def __init__(self, ckpt: str, manifest_dir: str, threads: int = 1):
        import torch

        self.manifest = Manifest.load(manifest_dir)
        self.handcrafted = ckpt == "handcrafted"
        self._ring: dict[int, np.ndarray] = {}   # batch buffers, see buffer()
        if self.handcrafted:
            return
        torch.set_num_threads(max(threads, 1))
        checkpoint = load_checkpoint(ckpt)
        check_channels(checkpoint.record.channels, self.manifest)
        self.method = checkpoint.record.method
        self.prep = SitePreprocessor(self.manifest, checkpoint.preprocessing())
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.model = checkpoint.build_model().to(self.device)

    def preprocess(self, images: np.ndarray, plates: list[str]) -> np.ndarray:
        return self.prep.batch(images, plates)

    def inputs(self, blobs: list[tuple[bytes, str, str]], out: np.ndarray | None) -> np.ndarray:
        """Encoded sites (bytes, codec, plate) -> the model's [N, C, H, W] float32 input, written into `out`
        (a slice of a batch buffer); the hand-crafted featuriser's input instead: uint8 images, `out` None.
        NumPy/zstd work: runs in threads."""
        n_channels = len(self.manifest.channels)
        if self.handcrafted:
            return np.stack([decode(b, c, n_channels) for b, c, _ in blobs])
        for row, (b, c, p) in zip(out, blobs):
            self.prep.into(decode(b, c, n_channels), p, row)
        return out

    def buffer(self, i: int, shape: tuple) -> np.ndarray | None:
        """Batch buffer number `i` (a small ring, reused for every shard): None for the hand-crafted path."""
        if self.handcrafted:
            return None
        if i not in self._ring or self._ring[i].shape != shape:
            self._ring[i] = np.empty(shape, np.float32)
        return self._ring[i]

    def embed_inputs(self, x: np.ndarray) -> np.ndarray:
        if self.handcrafted:
            from micon.eval.handcrafted import site_features
            return np.stack([site_features(im, self.manifest.channels.index("DNA")) for im in x])
        import torch

        with torch.no_grad():
            # the image encoder's embedding, before any projection head: what profiles are built from
            return self.model.image_encoder(torch.from_numpy(x).to(self.device)).float().cpu().numpy()

    def __call__(self, images: np.ndarray, plates: list[str]) -> np.ndarray:
        """[N, C, H, W] uint8 sites of the given plates -> [N, D] embeddings."""
        return self.embed_inputs(images if self.handcrafted else self.preprocess(images, plates))


def check_channels(trained: list[str], manifest: Manifest) -> None:
    if list(trained) != list(manifest.channels):
        raise CheckpointError(f"the checkpoint was trained on channels {trained} but the shards in {manifest.root} "
                              f"hold {manifest.channels}: re-ingest them in the training order")


def embed_shard(encoder: SiteEncoder, shard: str, out: Path, batch_size: int, channels: int,
                identity: str = "", threads: int = 1) -> dict:
    """Embed one shard into its part. With `threads` > 1, the next batches are decoded and preprocessed
    in a thread pool while the model embeds the current one."""
    from concurrent.futures import ThreadPoolExecutor

    rows, batches = [], []
    for key, blob, codec, meta in read_tar_encoded(shard):
        rows.append({c: str(meta.get(c, "")) for c in META_COLUMNS})
        if not batches or len(batches[-1]) == batch_size:
            batches.append([])
        batches[-1].append((blob, codec, meta[schema.PLATE]))
    shape = None
    if batches:
        first = decode(batches[0][0][0], batches[0][0][1], channels)
        shape = (batch_size, *first.shape)
    ahead = max(threads, 1)     # batches being decoded while the model embeds one
    with ThreadPoolExecutor(ahead) as pool:
        # each batch is split over the threads, which write into that batch's ring buffer
        def submit(i):
            batch, buf = batches[i], encoder.buffer(i % (ahead + 1), shape)
            step = -(-len(batch) // ahead)
            return buf, [pool.submit(encoder.inputs, batch[j:j + step], None if buf is None else buf[j:j + step])
                         for j in range(0, len(batch), step)]

        pending = [submit(i) for i in range(min(ahead, len(batches)))]
        embs = []
        for i in range(len(batches)):
            buf, futures = pending[i]
            parts = [f.result() for f in futures]
            x = buf[:len(batches[i])] if buf is not None else np.concatenate(parts)
            if i + ahead < len(batches):
                pending.append(submit(i + ahead))
            embs.append(encoder.embed_inputs(x))
    emb = np.concatenate(embs).astype(np.float32) if embs else np.zeros((0, 0), np.float32)
    if os.environ.get("MICON_EMBED_TEST_DELAY_S"):   # tests: slow a shard down so that a kill lands mid-run
        time.sleep(float(os.environ["MICON_EMBED_TEST_DELAY_S"]))
    write_part(part_path(out, shard), emb, rows, identity)
    return {"shard": shard, "rows": len(rows)}


class ShardEmbedder:
    """Ray Data actor: one model per actor, one shard per call."""

    def __init__(self, ckpt: str, manifest_dir: str, out: str, batch_size: int, threads: int, identity: str,
                 decode_threads: int = 1):
        self.encoder = SiteEncoder(ckpt, manifest_dir, threads)
        self.out, self.batch_size, self.identity, self.decode_threads = Path(out), batch_size, identity, decode_threads

    def __call__(self, batch: dict) -> dict:
        done = [embed_shard(self.encoder, s, self.out, self.batch_size, len(self.encoder.manifest.channels),
                            self.identity, self.decode_threads)
                for s in batch["shard"]]
        return {"shard": np.array([d["shard"] for d in done]), "rows": np.array([d["rows"] for d in done])}


def consolidate(out: Path, manifest: Manifest, ckpt: str, identity: dict) -> dict:
    embs, metas = [], []
    key = identity_key(identity)
    for s in manifest.data["shards"]:
        e, m = read_part(part_path(out, s["name"]), s["n_samples"], key)
        embs.append(e)
        metas.append(m)
    return write_consolidated(out, np.concatenate(embs), pd.concat(metas, ignore_index=True),
                              dict(checkpoint=str(ckpt), shards=str(manifest.root), identity=identity,
                                   identity_key=key, method=identity["model"].get("method", "handcrafted")))


def embedding_identity(ckpt: str, manifest: Manifest, checkpoint=None) -> dict:
    """What makes these embeddings: the model (checkpoint file hash, or the hand-crafted featuriser), the
    shard set (its manifest's hash) and the preprocessing. Parts and embed.json carry it."""
    shards = {"path": str(manifest.root), "sha256": sha256_file(manifest.root / "manifest.json")}
    if checkpoint is None:
        from micon.eval.handcrafted import feature_names
        model = {"featuriser": "handcrafted", "method": "handcrafted",
                 "features": identity_key({"names": feature_names(manifest.channels)})}
    else:
        model = {"method": checkpoint.record.method, "path": str(checkpoint.path), "step": checkpoint.record.step,
                 "sha256": sha256_file(checkpoint.path), "preprocessing": checkpoint.record.preprocessing}
    return {"model": model, "shards": shards}


def check_output(out: Path, identity: dict, overwrite: bool) -> None:
    """Refuse to mix embeddings of different models or shard sets in one directory."""
    path = out / "embed_identity.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if identity_key(old) != identity_key(identity):
            if not overwrite:
                raise EmbeddingError(f"{out} holds embeddings of {describe_identity(old)}; this run embeds "
                                     f"{describe_identity(identity)} ({identity_difference(old, identity)}). Use "
                                     f"another output directory, or pass overwrite=true to replace them")
            print(f"embed: replacing the embeddings in {out} ({identity_difference(old, identity)})", file=sys.stderr)
            for p in (out / "parts").glob("*.npz"):
                p.unlink()
            for name in ("embed.json", "sites.parquet"):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / "embeddings.zarr", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(identity, indent=1))
    os.replace(tmp, path)


def run(ckpt: str, shards: Path, out: Path, cfg: EmbedConfig) -> dict:
    manifest = Manifest.load(shards)
    checkpoint = None
    if ckpt != "handcrafted":   # fail here, with the path, rather than inside a Ray actor
        checkpoint = load_checkpoint(ckpt)
        check_channels(checkpoint.record.channels, manifest)
        print(f"embed: {checkpoint.record.method} image encoder ({checkpoint.record.model['preset']}, step "
              f"{checkpoint.record.step}) from {checkpoint.path}", flush=True)
        for plate in manifest.plates_without_dmso():
            print(f"embed: plate {plate} has no DMSO sites; its sites are normalised with the screen-wide DMSO "
                  f"average, as in training", file=sys.stderr)
    identity = embedding_identity(ckpt, manifest, checkpoint)
    key = identity_key(identity)
    check_output(out, identity, cfg.overwrite)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    todo = []
    for s in manifest.data["shards"]:
        p = part_path(out, s["name"])
        if p.exists():
            try:
                read_part(p, s["n_samples"], key)
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
            num_gpus=1 if gpus else 0, num_cpus=cfg.threads,
            fn_constructor_kwargs=dict(ckpt=ckpt, manifest_dir=str(shards), out=str(out), batch_size=cfg.batch_size,
                                       threads=1 if gpus else cfg.threads, identity=key,
                                       decode_threads=cfg.threads if gpus else 1)).take_all()
        print(f"embed: embedded {sum(int(r['rows']) for r in results)} sites from {len(results)} shards", flush=True)
    info = consolidate(out, manifest, ckpt, identity)
    save_config(cfg, out / "embed_config.yaml")
    return info


def main(argv: list[str]) -> int:
    from micon.config import job_help, wants_help

    if wants_help(argv):
        print(job_help(__doc__, EmbedConfig))
        return 0
    if len(argv) < 3:
        print(__doc__)
        return 2
    ckpt, shards, out = argv[0], Path(argv[1]), Path(argv[2])
    try:
        cfg = load_config(EmbedConfig, overrides=argv[3:])
    except ConfigError as e:
        print(f"embed: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        info = run(ckpt, shards, out, cfg)
    except (ManifestError, EmbeddingError, CheckpointError, FileNotFoundError) as e:
        print(f"embed: {e}", file=sys.stderr)
        return 1
    print(f"embed: {info['n_sites']} sites x {info['dim']} dims -> {out / 'embeddings.zarr'} + "
          f"{out / 'sites.parquet'} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
