"""Embed every site of a shard set with a trained image encoder or a named featuriser, with Ray Data.

    ./launch.sh embed CKPT SHARDS OUT [workers=N] [batch_size=N]
        CKPT: a training output dir, its checkpoints/ dir, one step dir or a model.pt; or a featuriser's
        name (micon.eval.featurisers: cellprofiler, cellprofiler_full, image_stats)

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

from micon import atomic, schema, storage
from micon.checkpoint import CheckpointError, load_checkpoint
from micon.config import ConfigError, NonNegativeInt, PositiveInt, load_config, save_config
from micon.data.preprocess import SitePreprocessor
from micon.data.codecs import decode
from micon.data.shards import Manifest, ManifestError, read_tar_encoded
from micon.embeddings import (META_COLUMNS, EmbeddingError, describe_identity, identity_difference, identity_key,
                              part_path, read_part, sha256_file, write_consolidated, write_part)
from micon.eval.featurisers import FEATURISERS, get_featuriser
from micon.raycluster import JobError, UnitFailed, describe_failure, init_ray


@dataclass
class EmbedConfig:
    workers: NonNegativeInt = 0  # actors (0 = one per GPU, else 2 CPU actors)
    batch_size: PositiveInt = 64  # sites per forward pass
    threads: PositiveInt = 1  # per actor: torch threads on a CPU; on a GPU, threads decoding the next batch
                              # while the GPU embeds this one (decoding, not the GPU, bounds one thread)
    overwrite: bool = False   # replace embeddings of another model or shard set found in OUT (else refuse)


class CheckpointEncoder:
    """A trained checkpoint's image encoder: sites preprocessed exactly as in training (micon.data.preprocess,
    settings from the checkpoint's record), the embedding before any projection head. The checkpoint's record
    is read (and its channels checked) on construction; the network is built by `load`, in the actor."""

    input_dtype = np.float32
    uses_gpu = True

    def __init__(self, ckpt: str, manifest: Manifest):
        self.checkpoint = load_checkpoint(ckpt)
        check_channels(self.checkpoint.record.channels, manifest)
        self.manifest, self.name = manifest, self.checkpoint.record.method

    def describe(self) -> str:
        rec = self.checkpoint.record
        return f"{rec.method} image encoder ({rec.model['preset']}, step {rec.step}) from {self.checkpoint.path}"

    def notes(self) -> list[str]:
        return [f"plate {plate} has no DMSO sites; its sites are normalised with the screen-wide DMSO average, "
                f"as in training" for plate in self.manifest.plates_without_dmso()]

    def identity(self) -> dict:
        rec = self.checkpoint.record
        return {"method": rec.method, "path": str(self.checkpoint.path), "step": rec.step,
                "sha256": sha256_file(self.checkpoint.path), "preprocessing": rec.preprocessing}

    def embed_info(self) -> dict:
        return {}

    def load(self, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(max(threads, 1))
        self.prep = SitePreprocessor(self.manifest, self.checkpoint.preprocessing())
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.model = self.checkpoint.build_model().to(self.device)

    def prepare(self, images: np.ndarray, plates: list[str]) -> np.ndarray:
        return self.prep.batch(images, plates)

    def prepare_into(self, site: np.ndarray, plate: str, out: np.ndarray) -> None:
        self.prep.into(site, plate, out)

    def embed(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            # the image encoder's embedding, before any projection head: what profiles are built from
            return self.model.image_encoder(torch.from_numpy(x).to(self.device)).float().cpu().numpy()


class FeaturiserEncoder:
    """A named featuriser (micon.eval.featurisers: CellProfiler-grade features, image statistics) on the
    uint8 sites as stored; embed.json lists its feature names."""

    input_dtype = np.uint8
    uses_gpu = False

    def __init__(self, name: str, manifest: Manifest):
        self.featuriser = get_featuriser(name)
        self.manifest, self.name = manifest, self.featuriser.name
        self.names = self.featuriser.feature_names(manifest.channels)   # fails here on a missing channel

    def describe(self) -> str:
        return f"{self.name} features ({len(self.names)}: {self.featuriser.description})"

    def notes(self) -> list[str]:
        return []

    def identity(self) -> dict:
        return {"featuriser": self.name, "method": self.name,
                "features": identity_key({"names": self.names, "settings": self.featuriser.settings()})}

    def embed_info(self) -> dict:
        return {"feature_names": self.names}

    def load(self, threads: int = 1) -> None:
        pass

    def prepare(self, images: np.ndarray, plates: list[str]) -> np.ndarray:
        return images

    def prepare_into(self, site: np.ndarray, plate: str, out: np.ndarray) -> None:
        out[...] = site

    def embed(self, x: np.ndarray) -> np.ndarray:
        return self.featuriser.embed(x, self.manifest.channels)


def check_channels(trained: list[str], manifest: Manifest) -> None:
    if list(trained) != list(manifest.channels):
        raise CheckpointError(f"the checkpoint was trained on channels {trained} but the shards in {manifest.root} "
                              f"hold {manifest.channels}: re-ingest them in the training order")


def open_encoder(ckpt: str, manifest: Manifest) -> CheckpointEncoder | FeaturiserEncoder:
    """CKPT is a featuriser's registered name or a checkpoint path; fails here, naming it, not in an actor."""
    return FeaturiserEncoder(ckpt, manifest) if ckpt in FEATURISERS else CheckpointEncoder(ckpt, manifest)


class SiteEncoder:
    """Opens an encoder once (`open_encoder`) and embeds [N, C, H, W] uint8 sites with it."""

    def __init__(self, ckpt: str, manifest_dir: str, threads: int = 1):
        self.manifest = Manifest.load(manifest_dir)
        self.encoder = open_encoder(ckpt, self.manifest)
        self.encoder.load(threads)
        self._ring: dict[int, np.ndarray] = {}   # batch buffers, see buffer()

    def preprocess(self, images: np.ndarray, plates: list[str]) -> np.ndarray:
        return self.encoder.prepare(images, plates)

    def inputs(self, blobs: list[tuple[bytes, str, str]], out: np.ndarray) -> np.ndarray:
        """Encoded sites (bytes, codec, plate) -> the encoder's input, written into `out` (a slice of a batch
        buffer). NumPy/zstd work: runs in threads."""
        n_channels = len(self.manifest.channels)
        for row, (b, c, p) in zip(out, blobs):
            self.encoder.prepare_into(decode(b, c, n_channels), p, row)
        return out

    def buffer(self, i: int, shape: tuple) -> np.ndarray:
        """Batch buffer number `i` (a small ring, reused for every shard)."""
        if i not in self._ring or self._ring[i].shape != shape:
            self._ring[i] = np.empty(shape, self.encoder.input_dtype)
        return self._ring[i]

    def embed_inputs(self, x: np.ndarray) -> np.ndarray:
        return self.encoder.embed(x)

    def __call__(self, images: np.ndarray, plates: list[str]) -> np.ndarray:
        """[N, C, H, W] uint8 sites of the given plates -> [N, D] embeddings."""
        return self.embed_inputs(self.preprocess(images, plates))


def embed_shard(encoder: SiteEncoder, shard: str, out: Path, batch_size: int, channels: int,
                identity: str = "", threads: int = 1) -> dict:
    """Embed one shard into its part. With `threads` > 1, the next batches are decoded and preprocessed
    in a thread pool while the model embeds the current one."""
    from concurrent.futures import ThreadPoolExecutor

    rows, batches = [], []
    checksum = encoder.manifest.shard_checksums().get(Path(shard).name)   # a damaged shard stops the job, named
    for key, blob, codec, meta in read_tar_encoded(shard, checksum):
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
            return buf, [pool.submit(encoder.inputs, batch[j:j + step], buf[j:j + step])
                         for j in range(0, len(batch), step)]

        pending = [submit(i) for i in range(min(ahead, len(batches)))]
        embs = []
        for i in range(len(batches)):
            buf, futures = pending[i]
            for f in futures:
                f.result()
            x = buf[:len(batches[i])]
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
        done = []
        for s in batch["shard"]:
            try:
                done.append(embed_shard(self.encoder, s, self.out, self.batch_size,
                                        len(self.encoder.manifest.channels), self.identity, self.decode_threads))
            except Exception as e:   # named here: Ray Data's own report does not say which shard
                raise UnitFailed.of(f"shard {Path(s).name}", e) from e
        return {"shard": np.array([d["shard"] for d in done]), "rows": np.array([d["rows"] for d in done])}


def consolidate(out: Path, manifest: Manifest, ckpt: str, identity: dict, embed_info: dict) -> dict:
    embs, metas = [], []
    key = identity_key(identity)
    for s in manifest.data["shards"]:
        e, m = read_part(part_path(out, s["name"]), s["n_samples"], key)
        embs.append(e)
        metas.append(m)
    return write_consolidated(out, np.concatenate(embs), pd.concat(metas, ignore_index=True),
                              dict(checkpoint=str(ckpt), shards=str(manifest.root), identity=identity,
                                   identity_key=key, method=identity["model"]["method"], **embed_info))


def embedding_identity(encoder: CheckpointEncoder | FeaturiserEncoder, manifest: Manifest) -> dict:
    """What makes these embeddings: the model (checkpoint file hash and preprocessing, or the featuriser's
    name, feature names and settings) and the shard set (its manifest's hash). Parts and embed.json carry it."""
    shards = {"path": str(manifest.root), "sha256": manifest.sha256}
    return {"model": encoder.identity(), "shards": shards}


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
    atomic.write_json(path, identity)


def run(ckpt: str, shards: Path, out: Path, cfg: EmbedConfig) -> dict:
    manifest = Manifest.load(shards)
    encoder = open_encoder(ckpt, manifest)      # fails here, naming CKPT, rather than inside a Ray actor
    print(f"embed: {encoder.describe()}", flush=True)
    for note in encoder.notes():
        print(f"embed: {note}", file=sys.stderr)
    identity = embedding_identity(encoder, manifest)
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

        gpus = torch.cuda.device_count() if encoder.uses_gpu else 0
        init_ray()
        size = cfg.workers or (gpus if gpus else min(2, os.cpu_count() or 1))
        ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
        try:
            results = ds.map_batches(
            ShardEmbedder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(size, len(todo))),
            num_gpus=1 if gpus else 0, num_cpus=cfg.threads,
            fn_constructor_kwargs=dict(ckpt=ckpt, manifest_dir=str(shards), out=str(out), batch_size=cfg.batch_size,
                                       threads=1 if gpus else cfg.threads, identity=key,
                                       decode_threads=cfg.threads if gpus else 1)).take_all()
        except Exception as e:   # Ray's report is a page long: one line for the person, the page in a log
            raise describe_failure("embed", f"one of {len(todo)} shards", e, out) from None
        print(f"embed: embedded {sum(int(r['rows']) for r in results)} sites from {len(results)} shards", flush=True)
    info = consolidate(out, manifest, ckpt, identity, encoder.embed_info())
    save_config(cfg, out / "embed_config.yaml")
    return info


def main(argv: list[str]) -> int:
    from micon.config import help_or_usage

    if (rc := help_or_usage(argv, __doc__, EmbedConfig, positional=3)) is not None:
        return rc
    ckpt, shards, out = argv[0], storage.path(argv[1]), Path(argv[2])
    try:
        cfg = load_config(EmbedConfig, overrides=argv[3:])
    except ConfigError as e:
        print(f"embed: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        info = run(ckpt, shards, out, cfg)
    except (ManifestError, EmbeddingError, CheckpointError, FileNotFoundError, ValueError, JobError) as e:
        print(e if isinstance(e, JobError) else f"embed: {e}", file=sys.stderr)
        return 1
    except OSError as e:     # writing the consolidated embeddings (a full disk, a read-only directory)
        print(describe_failure("embed", f"embedding into {out}", e, out), file=sys.stderr)
        return 1
    print(f"embed: {info['n_sites']} sites x {info['dim']} dims -> {out / 'embeddings.zarr'} + "
          f"{out / 'sites.parquet'} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
