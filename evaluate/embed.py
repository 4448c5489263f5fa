"""Embed every site of a shard set with a trained image encoder, a named featuriser or a reference source, with Ray.

    ./launch.sh embed CKPT SHARDS OUT [workers=N] [batch_size=N] [ray=false] [wandb=true]
        CKPT: a training output dir, its checkpoints/ dir, one step dir or a model.pt; a featuriser's name
        (micon.eval.featurisers: cellprofiler, cellprofiler_full, image_stats); or a reference (SOURCES):
        untrained:CKPT (that run's network as initialised, never updated), truth:SCREEN (each well's
        true phenotype from a synthetic screen's ground_truth/: the ceiling, no images read),
        pretrained:PRESET[:WEIGHTS] (a pretrained backbone, frozen, per channel with ImageNet normalisation:
        e.g. pretrained:resnet101 from the local timm cache, pretrained:dinov2_vits14:/weights/dinov2.safetensors)

Ray CPU tasks read and decode chunks of a shard (`decode_chunk`, one CPU each, anywhere in the cluster)
and feed the embedding actors: one per GPU of the cluster (CPU actors when there are none), which
normalise on the device from pinned memory and write each shard's embeddings once, atomically, to
OUT/parts/. A rerun recomputes only missing or corrupt parts, then OUT/embeddings.zarr ([sites, dim]
float32) and OUT/sites.parquet (Metadata_* columns) are rebuilt. OUT may be in object storage (s3://...):
every object is uploaded whole and embed.json last, so a killed run there resumes the same way. One embed per
OUT at a time (micon.locks: a second is refused, exit 2, naming the first). With wandb=true the run (job_type
embed, in the training run's group) records the checkpoint it read and logs its embeddings, both as artifacts
by reference (micon.wandb_runs).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from micon import atomic, schema, storage
from micon.checkpoint import CheckpointError
from micon.config import ConfigError, NonNegativeInt, PositiveInt, load_config, save_config
from micon.data.codecs import decode
from micon.data.shards import Manifest, ManifestError, read_tar_encoded
from micon.embeddings import (META_COLUMNS, EmbeddingError, describe_identity, identity_difference, identity_key,
                              part_path, read_part, write_consolidated, write_part)
from micon.encoders import open_encoder
from micon.raycluster import JobError, UnitFailed, describe_failure, init_ray


@dataclass
class EmbedConfig:
    workers: NonNegativeInt = 0  # embedding actors (0 = one per GPU of the cluster, else 2 CPU actors)
    batch_size: PositiveInt = 64  # sites per forward pass
    threads: PositiveInt = 1  # torch threads per CPU actor (a GPU actor's decoding runs in the CPU tasks)
    chunk: PositiveInt = 256  # sites per CPU decode task (rounded up to a multiple of batch_size)
    ray: bool = True          # false: decode and embed in this process, one shard after another (small sets)
    overwrite: bool = False   # replace embeddings of another model or shard set found in OUT (else refuse)
    wandb: bool = False       # a wandb run (offline unless WANDB_MODE=online): the checkpoint read and the
                              # embeddings written, as artifacts by reference (off by default: embed is often
                              # run once per checkpoint in a loop; evaluate records the checkpoint too)
    wandb_project: str = "micon"  # wandb project
    wandb_group: str = ""     # wandb group ("" = the training run's group, else OUT's parent folder's name)
    wandb_name: str = ""      # wandb run name ("" = OUT's name)
    wandb_tags: str = ""      # comma-separated wandb tags (embed is always one)


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
    """Embed one shard into its part in this process (the reference path: the job's CPU tasks and actors
    must give its bytes). With `threads` > 1, the next batches are decoded and preprocessed in a thread pool
    while the model embeds the current one."""
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
    write_part(part_path(out, shard), emb, rows, identity)
    return {"shard": shard, "rows": len(rows)}


# ----------------------------------------------------------------------------- the job: CPU tasks feed actors

def chunk_ranges(n_sites: int, chunk: int, batch_size: int) -> list[tuple[int, int]]:
    """[lo, hi) site ranges of one shard, one per CPU task; every boundary is a multiple of batch_size, so
    the actor sees the same forward-pass batches as embed_shard."""
    step = max(batch_size, -(-chunk // batch_size) * batch_size)
    return [(lo, min(lo + step, n_sites)) for lo in range(0, n_sites, step)] or [(0, 0)]


def decode_chunk(shard: str, lo: int, hi: int, channels: int, checksum: str | None) -> dict:
    """CPU task: sites [lo, hi) of a shard (tar order) -> {"sites": uint8 [n, C, H, W], "plates", "rows"}.
    The whole shard is read and checked against its checksum (a damaged shard stops the job, named);
    only this chunk is decoded."""
    try:
        plates, rows, sites = [], [], []
        for i, (_, blob, codec, meta) in enumerate(read_tar_encoded(shard, checksum)):
            if lo <= i < hi:
                sites.append(decode(blob, codec, channels))
                plates.append(str(meta[schema.PLATE]))
                rows.append({c: str(meta.get(c, "")) for c in META_COLUMNS})
        return {"sites": np.stack(sites) if sites else np.zeros((0, channels, 1, 1), np.uint8),
                "plates": plates, "rows": rows}
    except Exception as e:   # named here: Ray's own report does not say which shard
        raise UnitFailed.of(f"shard {Path(shard).name}", e) from e


class ShardEmbedder:
    """The embedding actor (one per GPU): one model; takes a shard's decoded chunks (Ray object refs, or
    the dicts themselves in-process) in order and writes the shard's part."""

    def __init__(self, ckpt: str, manifest_dir: str, out: str, batch_size: int, threads: int, identity: str):
        self.encoder = SiteEncoder(ckpt, manifest_dir, threads).encoder
        self.out, self.batch_size, self.identity = storage.path(out), batch_size, identity

    def embed_shard(self, shard: str, chunks: list) -> dict:
        try:
            rows, embs = [], []
            for chunk in chunks:
                if not isinstance(chunk, dict):
                    import ray
                    chunk = ray.get(chunk)
                rows += chunk["rows"]
                for j in range(0, len(chunk["rows"]), self.batch_size):
                    embs.append(self.encoder.embed_sites(chunk["sites"][j:j + self.batch_size],
                                                         chunk["plates"][j:j + self.batch_size]))
            emb = gather(embs)
            if os.environ.get("MICON_EMBED_TEST_DELAY_S"):   # tests: slow a shard down so that a kill lands mid-run
                time.sleep(float(os.environ["MICON_EMBED_TEST_DELAY_S"]))
            write_part(part_path(self.out, shard), emb, rows, self.identity)
        except UnitFailed:
            raise
        except Exception as e:   # named here: Ray's own report does not say which shard
            from micon.raycluster import root_cause
            raise UnitFailed.of(f"shard {Path(shard).name}", root_cause(e)) from e
        return {"shard": shard, "rows": len(rows)}


def gather(embs: list) -> np.ndarray:
    """A shard's batch embeddings (NumPy arrays, or torch tensors left on the device) -> one float32 array;
    the one device-to-host copy of the shard."""
    if not embs:
        return np.zeros((0, 0), np.float32)
    if isinstance(embs[0], np.ndarray):
        return np.concatenate(embs).astype(np.float32)
    import torch
    return torch.cat(embs).cpu().numpy().astype(np.float32)


def embed_with_ray(ckpt: str, manifest: Manifest, todo: list[str], out: Path, cfg: EmbedConfig, key: str,
                   uses_gpu: bool) -> list[dict]:
    """Decode tasks (one CPU each, scheduled anywhere) feed one actor per GPU of the cluster; at most about
    two chunks per CPU are decoded ahead of the actors, so memory stays bounded."""
    ray = init_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0)) if uses_gpu else 0
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # one actor per GPU (an actor more than the GPUs would wait for one for ever)
    n_actors = min(min(cfg.workers, gpus) if gpus and cfg.workers else cfg.workers or gpus or min(2, cpus), len(todo))
    # actors reserve no CPU: they wait on the decode tasks, which must always find one (2 CPU actors holding
    # a 2-core machine's CPUs would wait for ever)
    actor_cls = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0)(ShardEmbedder)
    actors = [actor_cls.remote(ckpt, str(manifest.root), str(out), cfg.batch_size, 1 if gpus else cfg.threads, key)
              for _ in range(n_actors)]
    task = ray.remote(num_cpus=1)(decode_chunk)
    sizes = {s["name"]: s["n_samples"] for s in manifest.data["shards"]}
    checksums, channels = manifest.shard_checksums(), len(manifest.channels)
    queue, pending, load, in_flight, results = list(todo), {}, [0] * n_actors, 0, []
    budget = 2 * cpus + n_actors      # chunks submitted and not yet embedded
    t0, done_sites, said = time.perf_counter(), 0, 0.0
    while queue or pending:
        while queue and (in_flight < budget or not pending):
            shard = queue.pop(0)
            name = Path(shard).name
            ranges = chunk_ranges(sizes[name], cfg.chunk, cfg.batch_size)
            refs = [task.remote(shard, lo, hi, channels, checksums.get(name)) for lo, hi in ranges]
            i = min(range(n_actors), key=load.__getitem__)
            pending[actors[i].embed_shard.remote(shard, refs)] = (i, shard, len(refs))
            load[i] += 1
            in_flight += len(refs)
        ready, _ = ray.wait(list(pending), num_returns=1)
        i, shard, n = pending.pop(ready[0])
        load[i] -= 1
        in_flight -= n
        try:
            results.append(ray.get(ready[0]))
        except Exception as e:   # Ray's report is a page long: one line for the person, the page in a log
            raise describe_failure("embed", f"shard {Path(shard).name}", e, log_dir(out)) from None
        done_sites += results[-1]["rows"]
        if time.perf_counter() - said > 10 or not (queue or pending):     # progress, every 10 s at most
            said = time.perf_counter()
            print(f"embed: {len(results)}/{len(todo)} shards, {done_sites} sites, "
                  f"{done_sites / max(said - t0, 1e-9):.0f} sites/s", flush=True)
    return results


def embed_in_process(ckpt: str, manifest: Manifest, todo: list[str], out: Path, cfg: EmbedConfig,
                     key: str) -> list[dict]:
    """The same decode and actor code, one shard after another in this process (no Ray start-up)."""
    embedder = ShardEmbedder(ckpt, str(manifest.root), str(out), cfg.batch_size, cfg.threads, key)
    sizes, checksums = {s["name"]: s["n_samples"] for s in manifest.data["shards"]}, manifest.shard_checksums()
    results = []
    for shard in todo:
        name = Path(shard).name
        try:
            results.append(embedder.embed_shard(shard, [decode_chunk(shard, lo, hi, len(manifest.channels),
                                                                     checksums.get(name))
                                                        for lo, hi in chunk_ranges(sizes[name], cfg.chunk,
                                                                                   cfg.batch_size)]))
        except UnitFailed as e:
            raise describe_failure("embed", f"shard {name}", e, log_dir(out)) from None
    return results


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


def embedding_identity(encoder, manifest: Manifest) -> dict:
    """What makes these embeddings: the model (checkpoint file hash and preprocessing, or the featuriser's
    name, feature names and settings) and the shard set (its manifest's hash). Parts and embed.json carry it."""
    shards = {"path": str(manifest.root), "sha256": manifest.sha256}
    return {"model": encoder.identity(), "shards": shards}


def log_dir(out) -> Path | None:
    """Where a failure's traceback goes: OUT on disk; none in object storage (the temp directory's log)."""
    return out if isinstance(out, Path) else None


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
            storage.remove_tree(out / "embeddings.zarr")
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
    if not encoder.reads_images:    # a reference computed from tables (truth:SCREEN): no parts, no Ray
        meta, emb = encoder.site_table()
        info = write_consolidated(out, emb, meta, dict(checkpoint=str(ckpt), shards=str(manifest.root),
                                                       identity=identity, identity_key=key,
                                                       method=identity["model"]["method"], **encoder.embed_info()))
        save_config(cfg, out / "embed_config.yaml")
        return info
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
        results = (embed_with_ray(ckpt, manifest, todo, out, cfg, key, encoder.uses_gpu) if cfg.ray
                   else embed_in_process(ckpt, manifest, todo, out, cfg, key))
        print(f"embed: embedded {sum(int(r['rows']) for r in results)} sites from {len(results)} shards", flush=True)
    info = consolidate(out, manifest, ckpt, identity, encoder.embed_info())
    save_config(cfg, out / "embed_config.yaml")
    return info


def log_wandb(out, cfg: EmbedConfig, info: dict) -> None:
    """The embed run in wandb: the checkpoint read (when trained weights) as an input artifact and the
    embeddings as an output artifact, both by reference; OUT/wandb_run.json names the run for evaluate."""
    from micon import wandb_runs
    from micon.config import to_dict

    model_file = wandb_runs.trained_checkpoint(info.get("identity", {}).get("model", {}))
    run = wandb_runs.open_run("embed", out, project=cfg.wandb_project, name=cfg.wandb_name, group=cfg.wandb_group,
                              tags=cfg.wandb_tags, upstream=[wandb_runs.run_dir_of(model_file)] if model_file else (),
                              config={**to_dict(cfg), "checkpoint": info.get("checkpoint"), "out": str(out),
                                      "shards": info.get("shards")},
                              wandb_dir=out if isinstance(out, Path) else wandb_runs.local_dir())
    try:
        if model_file is not None:
            wandb_runs.use(run, wandb_runs.checkpoint_artifact(model_file))
        run.log_artifact(wandb_runs.embeddings_artifact(out))
        run.summary.update({"n_sites": info.get("n_sites"), "dim": info.get("dim")})
        wandb_runs.write_run_file(out, run, "embed")
    finally:
        run.finish()


def main(argv: list[str]) -> int:
    from micon.config import help_or_usage
    from micon.locks import LockHeld, run_lock

    if (rc := help_or_usage(argv, __doc__, EmbedConfig, positional=3)) is not None:
        return rc
    ckpt, shards, out = argv[0], storage.path(argv[1]), storage.path(argv[2])
    try:
        cfg = load_config(EmbedConfig, overrides=argv[3:])
    except ConfigError as e:
        print(f"embed: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        with run_lock(out, job="embed"):        # one embed per OUT: a second run is refused, naming the first
            info = run(ckpt, shards, out, cfg)
            if cfg.wandb:
                try:
                    log_wandb(out, cfg, info)
                except Exception as e:          # wandb never fails the job: its outputs are complete
                    from micon.wandb_runs import warning
                    print(f"embed: {warning('the run', e)}", file=sys.stderr)
    except LockHeld as e:
        print(e, file=sys.stderr)
        return 2
    except (ManifestError, EmbeddingError, CheckpointError, FileNotFoundError, ValueError, JobError) as e:
        print(e if isinstance(e, JobError) else f"embed: {e}", file=sys.stderr)
        return 1
    except OSError as e:     # writing the consolidated embeddings (a full disk, a read-only directory)
        print(describe_failure("embed", f"embedding into {out}", e, log_dir(out)), file=sys.stderr)
        return 1
    print(f"embed: {info['n_sites']} sites x {info['dim']} dims -> {out / 'embeddings.zarr'} + "
          f"{out / 'sites.parquet'} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
