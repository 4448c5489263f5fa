"""The training data path of one rank: stream shards, pair replicates, draw controls, augment, batch.

The stream is a pure function of (seed, rank, world size, worker, number of workers), so a resumed
run can fast-forward to its saved position: skipped batches are planned (metadata only) but never
decoded. Shards come in an order shuffled with a seed shared by all ranks before they are split by
rank and worker; the stream is endless (epochs repeat, or shards are resampled), so no rank runs dry.
Shards may live in object storage (`data.shards=s3://...`): each is streamed through micon.storage, and a
transient read error is retried (counted as read_retries).
"""
from __future__ import annotations

import json
import logging
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import numpy as np
import torch

from micon import schema
from micon.chem.graph import collate_graphs
from micon.config import NonNegativeFloat, NonNegativeInt
from micon.data.needs import DataNeeds
from micon.data.preprocess import Preprocessing, SitePreprocessor
from micon.data.replicate_sets import PAIR_LEVELS, pair_score, pair_wells
from micon.data.shards import ControlBank, Manifest, verified_samples

log = logging.getLogger("micon.data")



@dataclass
class Augment:
    """Microscopy augmentations: random crop, flips and 90-degree rotations, per-channel intensity jitter."""

    crop: NonNegativeInt = 0      # random crop size in pixels (0 = whole field; at most the stored site size)
    flip: bool = True             # random horizontal and vertical flips
    rot90: bool = True            # random 90-degree rotations
    intensity_jitter: NonNegativeFloat = 0.0  # per-channel multiplicative jitter, x * exp(N(0, s)) + N(0, s / 2)

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """[C, H, W] float32 -> [C, h, w] float32."""
        c, h, w = img.shape
        if self.crop and self.crop < min(h, w):
            y, x = rng.integers(0, h - self.crop + 1), rng.integers(0, w - self.crop + 1)
            img = img[:, y:y + self.crop, x:x + self.crop]
        if self.flip and rng.random() < 0.5:
            img = img[:, :, ::-1]
        if self.rot90:
            img = np.rot90(img, int(rng.integers(4)), axes=(1, 2))
        if self.intensity_jitter > 0:
            s = self.intensity_jitter
            img = img * np.exp(rng.normal(0, s, (c, 1, 1))) + rng.normal(0, s / 2, (c, 1, 1))
        return np.ascontiguousarray(img, dtype=np.float32)


@dataclass
class StreamConfig:
    needs: DataNeeds = field(default_factory=DataNeeds)   # what the method's examples need (micon.methods)
    batch_size: int = 8            # examples per micro-batch on this rank
    shuffle_buffer: int = 128      # raw samples shuffled before decoding
    pair_buffer: int = 4096        # treated sites waiting for a replicate partner
    pair_prefer: str = "source"    # prefer partners from another source, else batch, plate, well
    pair_within_source: bool = False   # replicate sets: another batch of the same source first
    resample: bool = False         # draw shards with replacement instead of epoch by epoch
    preprocessing: Preprocessing = field(default_factory=Preprocessing)   # written once, shared with embedding
    include_poscon: bool = False   # positive controls as compounds too
    replicate_sets: bool = False   # pairs and controls from replicate-set shards (else plate shards + pairer)
    splits: tuple[str, ...] = ("train",)
    seed: int = 0
    augment: Augment = field(default_factory=Augment)


class DataStreamError(RuntimeError):
    """The stream cannot continue (nothing readable); the message names the shards."""


TAR_BLOCK = 512


def tar_bytes(*payloads: bytes) -> int:
    """Bytes a tar reader goes through for these members: a header block each plus padded data."""
    return sum(TAR_BLOCK + -(-len(p) // TAR_BLOCK) * TAR_BLOCK for p in payloads)


class Counts(dict):
    """Per-worker counters shipped to the trainer with every batch, cumulative: images_read (every site
    image read from storage, controls and plate-cache loads included), images_used (images placed into
    a batch), bytes_read (tar bytes, headers included), bytes_used (the payload of the images used), examples,
    pairs_across_{source,batch,plate}, controls_{plate,batch,source},
    samples_lost (corrupt or incomplete samples skipped), read_retries (transient storage errors retried).
    The reported ones start at 0, so every step's record holds all of them."""

    REPORTED = ("images_read", "images_used", "bytes_read", "examples", "pairs_across_source", "pairs_across_batch",
                "pairs_across_plate", "controls_plate", "controls_batch", "controls_source", "samples_lost",
                "read_retries")

    def __init__(self):
        super().__init__(dict.fromkeys(self.REPORTED, 0))

    def add(self, key: str, n: int = 1) -> None:
        self[key] = self.get(key, 0) + n

    def since(self, base: dict) -> dict:
        """These counts minus `base` (what a resumed stream re-read to fast-forward was counted before)."""
        return {k: v - base.get(k, 0) for k, v in self.items()}


_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "FSTimeoutError",
                "ClientConnectorError", "ClientConnectionError", "ServerDisconnectedError", "ServerTimeoutError",
                "ConnectionTimeoutError", "StorageTimeout", "NewConnectionError", "MaxRetryError"}


def unreachable_cause(e: BaseException | None) -> BaseException | None:
    """The error in `e`'s chain (causes and contexts) that says the storage endpoint did not answer at all
    (a refused or failed connection, a timeout), or None: the shards themselves may then be intact."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError)) or {c.__name__ for c in type(e).__mro__} & _UNREACHABLE:
            return e
        e = e.__cause__ or e.__context__
    return None


class _Handler:
    """WebDataset error handler: count and warn, never crash on a corrupt shard or member. Remembers the
    first error that says the storage endpoint cannot be reached (`unreachable`)."""

    def __init__(self, counts: Counts):
        self.counts = counts
        self.unreachable: BaseException | None = None

    def note(self, exn: BaseException) -> None:
        if self.unreachable is None:
            self.unreachable = unreachable_cause(exn)

    def __call__(self, exn: Exception) -> bool:
        self.note(exn)
        self.counts.add("corrupt_reads")
        log.warning("skipping unreadable shard data (the rest of that shard is lost): %s",
                    str(exn).split("\n")[0][:300])
        return True


def shard_slot(shards: list[str], epoch: int, seed: int, slot: int, n_slots: int, resample: bool) -> list[str]:
    """This (rank, worker) slot's shards for one epoch. The shuffle is shared by every slot."""
    if len(shards) < n_slots:
        raise ValueError(f"{len(shards)} shards cannot feed {n_slots} data streams (ranks x loader workers): "
                         f"re-run prep with a smaller shard_mb, or use fewer workers")
    if resample:
        rng = np.random.default_rng([seed, epoch, slot, 99])
        return [shards[i] for i in rng.integers(0, len(shards), len(shards) // n_slots)]
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    return [shards[i] for i in order[slot::n_slots]]


class ReplicatePairer:
    """Pairs two treated sites of one compound from different wells, preferring different sources
    (then batches, then plates). Holds at most `capacity` unpaired sites, evicting the oldest."""

    def __init__(self, capacity: int, prefer: str, counts: Counts):
        self.capacity = capacity
        self.min_score = len(PAIR_LEVELS) - PAIR_LEVELS.index(prefer)
        self.waiting: OrderedDict[int, dict] = OrderedDict()   # entry number -> sample
        self.by_compound: dict[str, list[int]] = {}
        self._n = 0
        self.counts = counts

    def push(self, sample: dict):
        meta = sample["meta"]
        cid = meta[schema.JCP]
        best, best_score = None, 0
        for key in self.by_compound.get(cid, []):
            s = pair_score(meta, self.waiting[key]["meta"])
            if s > best_score:
                best, best_score = key, s
        if best is not None and best_score >= min(self.min_score, 1):
            partner = self.waiting.pop(best)
            self.by_compound[cid].remove(best)
            self.counts.add(f"pairs_across_{PAIR_LEVELS[len(PAIR_LEVELS) - best_score]}")
            return partner, sample
        # the same site comes back every epoch: buffer entries are numbered, not keyed by site
        self._n += 1
        self.waiting[self._n] = sample
        self.by_compound.setdefault(cid, []).append(self._n)
        if len(self.waiting) > self.capacity:
            old_key, old = self.waiting.popitem(last=False)
            self.by_compound[old["meta"][schema.JCP]].remove(old_key)
            self.counts.add("pair_evicted")
        return None


class ShardTally:
    """Whole samples each shard of an epoch yielded. When the stream moves on from a shard (or the epoch
    ends) the shard is settled: what it should have held (the manifest's count) but did not yield whole
    is counted as samples lost, so a truncated shard reports samples, not tar members."""

    def __init__(self, expected: dict[str, int], counts: Counts):
        self.expected, self.counts = expected, counts
        self.got: dict[str, int] = {}
        self.settled: set[str] = set()
        self.last: str | None = None

    @property
    def usable(self) -> int:
        return sum(self.got.values())

    def add(self, url: str) -> None:
        if self.last is not None and self.last != url:
            self._settle(self.last)
        self.last = url
        self.got[url] = self.got.get(url, 0) + 1

    def finish(self, urls: list[str]) -> None:
        for u in urls:
            self._settle(u)

    def _settle(self, url: str) -> None:
        if url in self.settled:
            return
        self.settled.add(url)
        lost = self.expected.get(Path(url).name, 0) - self.got.get(url, 0)
        if lost > 0:
            self.counts.add("samples_lost", lost)
            self.counts.add("shards_damaged")


class ExampleStream(torch.utils.data.IterableDataset):
    """Endless batches for one rank. Each DataLoader worker is one slot of the shard split.

    `skip_batches` fast-forwards a resumed run: the DataLoader hands out worker batches round-robin,
    so after `skip` batches the next one comes from logical worker skip % W; physical worker w plays
    logical worker (w + skip) % W and skips the batches that logical worker already delivered.
    """

    def __init__(self, manifest_dir: str, cfg: StreamConfig, rank: int, world: int, num_workers: int,
                 graph_store: str | None = None, skip_batches: int = 0, compound_labels: dict | None = None,
                 molecule_table: str | None = None):
        super().__init__()
        self.manifest_dir, self.cfg, self.rank, self.world = manifest_dir, cfg, rank, world
        self.num_workers = max(num_workers, 1)
        self.graph_store, self.skip_batches = graph_store, skip_batches
        self.molecule_table = molecule_table
        self.compound_labels = compound_labels or {}

    # ---- planning: metadata only, no pixel decoded
    def _epochs(self, shards: list[str], expected: dict, slot: int, counts: Counts, parse, keep, salt: str = "",
                checksums: dict | None = None):
        """Endless epochs over this slot's `shards`: each shard is checked whole against its manifest's
        `checksums` before any of its samples is used (a mismatch skips it: verified_samples), each tar
        sample goes through `parse` (None = unreadable) and `keep` (False = not for this run: another split,
        role), then a reservoir of raw bytes shuffles it before anything is decoded. Samples lost to damaged
        shards are counted against the manifest's `expected` counts; an epoch with nothing readable, or
        nothing kept, stops the stream."""
        n_slots = self.world * self.num_workers
        for epoch in count():
            urls = shard_slot(shards, epoch, self.cfg.seed, slot, n_slots, self.cfg.resample)
            rng = random.Random(f"{self.cfg.seed}-{epoch}-{slot}{salt}")
            buf: list[dict] = []
            tally, kept, handler, damaged = ShardTally(expected, counts), 0, _Handler(counts), []

            def lost(url: str) -> None:       # a shard that failed its checksum: all its samples are lost
                damaged.append(Path(url).name)
                counts.add("shards_failed_checksum")
                tally.finish([url])

            def unopened(url: str, e: OSError) -> None:     # deleted, or unreadable: lost, and counted now
                name, missing = Path(url).name, isinstance(e, FileNotFoundError)
                handler.note(e)
                damaged.append(name)
                counts.add("corrupt_reads")
                counts.add("shards_missing" if missing else "shards_unreadable")
                log.warning("shard %s %s: its %d samples are lost (./launch.sh verify SHARDS lists every damaged "
                            "shard; rerun prep for its plate to rewrite it)", name,
                            "is listed in the manifest but missing" if missing
                            else f"cannot be read ({str(e).splitlines()[0][:200]})", expected.get(name, 0))
                tally.finish([url])

            for s in verified_samples(urls, checksums or {}, handler, lost,
                                      on_retry=lambda e: counts.add("read_retries"), on_unopened=unopened):
                counts.add("bytes_read", tar_bytes(*(v for k, v in s.items() if not k.startswith("__"))))
                sample = parse(s, counts)
                if sample is None:
                    continue
                tally.add(s["__url__"])
                if not keep(sample):
                    continue
                kept += 1
                if len(buf) < self.cfg.shuffle_buffer:
                    buf.append(sample)
                    continue
                i = rng.randrange(len(buf))
                buf[i], sample = sample, buf[i]
                yield sample
            rng.shuffle(buf)
            yield from buf
            tally.finish(urls)
            self._check_epoch(tally.usable, kept, urls, slot, epoch, damaged, handler.unreachable)

    @staticmethod
    def _parse_site(s: dict, counts: Counts) -> dict | None:
        image_key = next((k for k in s if k.startswith("image.")), None)
        counts.add("images_read", int(image_key is not None))
        if image_key is None or "json" not in s:
            log.warning("skipping incomplete sample %s in %s", s.get("__key__"), s.get("__url__"))
            return None
        try:
            meta = json.loads(s["json"])
        except ValueError:
            return None
        return dict(key=s["__key__"], meta=meta, blob=s[image_key], codec=image_key.split(".", 1)[1])

    def _raw_samples(self, manifest: Manifest, slot: int, counts: Counts):
        expected = {sh["name"]: sh["n_samples"] for sh in manifest.data["shards"]}
        return self._epochs(manifest.shard_paths(), expected, slot, counts, self._parse_site,
                            lambda sample: self._keep(manifest, sample["meta"]), checksums=manifest.shard_checksums())

    def _check_epoch(self, readable: int, kept: int, urls: list[str], slot: int, epoch: int,
                     damaged: list[str] = (), unreachable: BaseException | None = None) -> None:
        names = ", ".join(Path(u).name for u in urls[:5]) + (" ..." if len(urls) > 5 else "")
        where = f"epoch {epoch} of data stream {slot} (rank {self.rank})"
        if readable == 0 and unreachable is not None:
            from micon.storage import endpoint_name, redact
            endpoint = endpoint_name(urls[0]) if urls and "://" in urls[0] else "(the shards' file system)"
            detail = redact(str(unreachable).splitlines()[0][:200]) if str(unreachable) else ""
            raise DataStreamError(f"{where} read no sample from its {len(urls)} shards ({names}): the storage "
                                  f"endpoint {endpoint} cannot be reached ({type(unreachable).__name__}"
                                  f"{': ' + detail if detail else ''}). The shards are probably intact: rerun the "
                                  f"same command once the endpoint answers (training resumes from its last "
                                  f"checkpoint)")
        if readable == 0:
            failed = (f"; {', '.join(damaged[:5])}{' ...' if len(damaged) > 5 else ''} are missing or failed their "
                      f"checksum" if damaged else "")
            raise DataStreamError(f"{where} read no usable sample from its {len(urls)} shards ({names}): they are "
                                  f"unreadable, truncated or damaged{failed}. Rerun prep to rewrite them (list "
                                  f"them with ./launch.sh verify), or remove them from the shard set")
        if kept == 0:
            raise DataStreamError(f"{where} read {readable} samples from its {len(urls)} shards ({names}) but none "
                                  f"is for this run (splits {list(self.cfg.splits)}, positive controls "
                                  f"{'in' if self.cfg.include_poscon else 'out'}): use fewer ranks x loader workers "
                                  f"or more, smaller shards (prep shard_mb), or other splits")

    def _keep(self, manifest: Manifest, meta: dict) -> bool:
        if manifest.split_of(meta) not in self.cfg.splits:
            return False
        role = meta[schema.ROLE]
        if self.cfg.needs.negcon_sites:
            return True
        return role == schema.TREATED or (self.cfg.include_poscon and role == schema.POSCON)

    def _plans(self, manifest: Manifest, slot: int, counts: Counts):
        """Batches of example plans: lists of (samples, rng seed)."""
        pairer = ReplicatePairer(self.cfg.pair_buffer, self.cfg.pair_prefer, counts)
        batch = []
        n = 0
        for sample in self._raw_samples(manifest, slot, counts):
            if not self.cfg.needs.pairs:
                example = (sample,)
            else:
                pair = pairer.push(sample)
                if pair is None:
                    continue
                example = pair
            counts.add("examples")
            counts.add("images_used", len(example))
            counts.add("bytes_used", sum(len(x["blob"]) for x in example))
            batch.append((dict(views=[(x["blob"], x["codec"], x["meta"]) for x in example], controls=None,
                               key=example[0]["key"]), (self.cfg.seed, slot, n)))
            n += 1
            if len(batch) == self.cfg.batch_size:
                yield batch
                batch = []

    @staticmethod
    def _parse_replicate_set(s: dict, counts: Counts) -> dict | None:
        counts.add("images_read", s["json"].count(b'"image"') if "json" in s else 0)
        try:
            doc, pack = json.loads(s["json"]), s["pack"]
            for w in doc["wells"]:          # the compound's fields are stored once per sample
                w["meta"].update(doc["shared"])
            spans = [tuple(w["image"]) for w in doc["wells"]] + [tuple(w["control"]["image"])
                                                                 for w in doc["wells"] if w["control"]]
            if max(o + n for o, n in spans) > len(pack):
                raise ValueError("pack shorter than its images")
        except (KeyError, ValueError, TypeError) as e:
            log.warning("skipping incomplete replicate set %s in %s (%s)", s.get("__key__"), s.get("__url__"),
                        str(e)[:100])
            return None
        return dict(key=s["__key__"], doc=doc, blobs={sp: pack[sp[0]:sp[0] + sp[1]] for sp in spans})

    def _rset_samples(self, manifest: Manifest, slot: int, counts: Counts):
        """Replicate-set samples of this slot's shards, shuffled as raw bytes before decoding."""
        rs = manifest.replicate_sets
        expected = {sh["name"]: sh["n_samples"] for sh in rs["shards"]}
        roles = {schema.TREATED} | ({schema.POSCON} if self.cfg.include_poscon else set())
        return self._epochs(manifest.replicate_set_paths(), expected, slot, counts, self._parse_replicate_set,
                            lambda sample: sample["doc"]["role"] in roles, salt="-rsets",
                            checksums=manifest.replicate_set_checksums())

    def _rset_plans(self, manifest: Manifest, slot: int, counts: Counts):
        """Batches of example plans from replicate sets: every well of a sample in a pair (another source
        preferred), its same-plate control beside it; no pairing buffer, no control-bank read."""
        batch, n = [], 0
        for sample in self._rset_samples(manifest, slot, counts):
            doc = sample["doc"]
            rng = np.random.default_rng([self.cfg.seed, slot, n, 3])
            if doc.get("weight", 1.0) < 1.0 and rng.random() >= doc["weight"]:
                continue          # a down-weighted compound is used in that share of its samples
            wells = doc["wells"]
            pairs = pair_wells([w["meta"] for w in wells], rng, self.cfg.pair_within_source)
            used = set()
            for i, j, level in pairs:
                views = [(sample["blobs"][tuple(wells[k]["image"])], doc["codec"], wells[k]["meta"]) for k in (i, j)]
                used |= {tuple(wells[i]["image"]), tuple(wells[j]["image"])}
                controls = None
                if self.cfg.needs.controls:
                    controls = [(sample["blobs"][tuple(wells[k]["control"]["image"])], doc["codec"],
                                 wells[k]["meta"], wells[k]["control"]["level"]) for k in (i, j)]
                    used |= {tuple(wells[i]["control"]["image"]), tuple(wells[j]["control"]["image"])}
                    for k in (i, j):
                        counts.add(f"controls_{wells[k]['control']['level']}")
                counts.add(f"pairs_across_{level}")
                counts.add("examples")
                batch.append((dict(views=views, controls=controls, key=f"{sample['key']}:{i}-{j}"),
                              (self.cfg.seed, slot, n)))
                n += 1
                if len(batch) == self.cfg.batch_size:
                    yield batch
                    batch = []
            counts.add("images_used", len(used))
            counts.add("bytes_used", sum(len(sample["blobs"][m]) for m in used))

    # ---- materialising: decode, controls, augment, collate
    def _materialise(self, plans: list, prep: SitePreprocessor, bank: ControlBank | None, store,
                     counts: Counts, table=None) -> dict:
        aug, needs = self.cfg.augment, self.cfg.needs
        views, controls, cids = [], [], []
        for example, seed in plans:
            rng = np.random.default_rng(seed)
            if needs.pairs:    # one view per replicate site
                views.append([aug(prep.decode(blob, codec, meta[schema.PLATE]), rng)
                              for blob, codec, meta in example["views"]])
            else:              # two augmentations of one site
                blob, codec, meta = example["views"][0]
                img = prep.decode(blob, codec, meta[schema.PLATE])
                views.append([aug(img, rng), aug(img, rng)])
            cids.append(example["views"][0][2][schema.JCP])
            if not needs.controls:
                continue
            ctl = []
            if example["controls"] is not None:       # co-located; normalised with the treated site's plate
                for blob, codec, meta, level in example["controls"]:
                    ctl.append(aug(prep.decode(blob, codec, meta[schema.PLATE]), rng))
            else:                                     # drawn from the control bank
                for _, _, m in example["views"]:
                    img, level = bank.draw(m[schema.PLATE], m[schema.BATCH], m[schema.SOURCE], rng)
                    counts.add(f"controls_{level}")
                    counts.add("images_used")
                    counts.add("bytes_used", int(img.nbytes))
                    # a control drawn from another plate is normalised with the treated site's plate
                    ctl.append(aug(prep(img, m[schema.PLATE]), rng))
            controls.append(ctl)
        out = dict(views=torch.from_numpy(np.stack([np.stack(v) for v in views])),
                   labels=torch.tensor([self.compound_labels.get(c, -1) for c in cids], dtype=torch.long),
                   compounds=cids, keys=[example["key"] for example, _ in plans])
        if controls:
            out["controls"] = torch.from_numpy(np.stack([np.stack(c) for c in controls]))
        if store is not None and needs.graphs:          # the compound in the form its encoder reads
            out["graphs"] = collate_graphs([store.get(c) for c in cids])
        if store is not None and needs.fingerprints:
            out["fingerprints"] = torch.from_numpy(store.fingerprints(cids))   # [B, n_bits] uint8
        if table is not None:
            out["vectors"] = torch.from_numpy(table.get(cids))               # [B, N] float32, frozen
        return out

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.skip_batches) % self.num_workers
        # batches 0..skip-1 went round-robin to logical workers 0, 1, ..., W-1, 0, ...
        skip = self.skip_batches // self.num_workers + (1 if logical < self.skip_batches % self.num_workers else 0)
        slot = self.rank * self.num_workers + logical
        manifest = Manifest.load(self.manifest_dir)
        prep = SitePreprocessor(manifest, self.cfg.preprocessing)
        counts = Counts()
        bank = None
        if self.cfg.needs.controls and not self.cfg.replicate_sets:
            bank = ControlBank(manifest.root, counts=counts)
        store = None
        if self.graph_store and (self.cfg.needs.graphs or self.cfg.needs.fingerprints):
            from micon.chem.store import GraphStore
            store = GraphStore(self.graph_store)
        table = None
        if self.molecule_table and self.cfg.needs.vectors:
            from micon.chem.table import MoleculeTable
            table = MoleculeTable(self.molecule_table)
        plans_of = self._rset_plans if self.cfg.replicate_sets else self._plans
        base: dict = {}   # a resumed run's checkpoint holds the counts up to here: count only what follows
        for i, plans in enumerate(plans_of(manifest, slot, counts)):
            if i < skip:
                if i == skip - 1:
                    base = dict(counts)
                continue
            batch = self._materialise(plans, prep, bank, store, counts, table)
            batch["counts"] = counts.since(base)
            batch["worker"] = logical
            yield batch


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: Slurm and torchrun signal every process of a job; the trainer process
    decides when to stop (after a checkpoint), and workers exit with it. If the trainer is killed
    outright, the kernel kills the worker too (PR_SET_PDEATHSIG), so no orphan keeps streaming."""
    import ctypes
    import signal
    import sys

    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def collate_identity(batch):
    """Batches are built inside the workers; the DataLoader passes them through."""
    return batch
