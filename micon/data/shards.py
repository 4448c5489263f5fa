"""WebDataset shards of sites, the shard manifest, and the DMSO control bank: writing and reading.

One sample = one site: `{key}.image.{codec}` ([C, H, W] uint8) + `{key}.json` (Metadata_*).
Shards are plate-grouped (a shard never mixes plates) and written under a temporary name, then
renamed, so a killed writer never leaves a file that looks whole. Tar headers carry no time or
owner, so the same input gives the same bytes. Each shard's and each DMSO site's checksum
(micon.integrity) is recorded when it is written; the readers here check them. A shard set may live in
object storage (micon.storage): shards are staged locally and uploaded whole, and read as streams that
retry transient errors.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from micon import atomic, integrity, schema, storage
from micon.data.codecs import decode, encode
from micon.data.tarwriter import SampleTar

FORMAT_VERSION = 1
log = logging.getLogger("micon.data")
SAMPLE_COLUMNS = (schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL, schema.SITE, schema.JCP,
                  schema.INCHIKEY, schema.SMILES, schema.ROLE)


def sample_key(plate: str, well: str, site: str) -> str:
    """WebDataset keys may not contain dots (the extension starts at the first one)."""
    return f"{plate}_{well}_{site}".replace(".", "-")


@dataclass
class ShardWriter:
    """Rolls plate-grouped tar shards at about `target_bytes`; `close()` renames them into place."""

    directory: Path
    prefix: str
    codec: str
    target_bytes: int
    shards: list[dict] = field(default_factory=list)
    _tar: SampleTar | None = None
    _tmp_paths: list[Path] = field(default_factory=list)

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):04d}.tar"
        tmp = atomic.temp_path(self.directory / name)
        self._tmp_paths.append(tmp)
        self._tar = SampleTar(tmp)
        self.shards.append(dict(name=name, n_samples=0, bytes=0))

    def write(self, key: str, image: np.ndarray, meta: dict) -> None:
        if self._tar is None or self.shards[-1]["bytes"] >= self.target_bytes:
            self._finish_current()
            self._open()
        size = self._tar.write({"__key__": key, f"image.{self.codec}": encode(image, self.codec),
                                "json": json.dumps(meta, sort_keys=True).encode()})
        self.shards[-1]["n_samples"] += 1
        self.shards[-1]["bytes"] += size + 1024

    def _finish_current(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self.shards[-1]["checksum"] = self._tar.checksum
            self._tar = None

    def close(self) -> list[dict]:
        """Rename every finished shard into place; returns [{name, n_samples, bytes, checksum}]."""
        self._finish_current()
        for tmp, shard in zip(self._tmp_paths, self.shards):
            shard["bytes"] = tmp.stat().st_size
            atomic.commit(tmp, self.directory / shard["name"])
        return self.shards

    def abort(self) -> None:
        """Remove every temporary file: a failed plate leaves nothing behind."""
        self._finish_current()
        for tmp in self._tmp_paths:
            tmp.unlink(missing_ok=True)


class ShardDamagedError(OSError):
    """A shard's bytes differ from the checksum its manifest recorded when it was written."""


def damaged_message(path: str | Path) -> str:
    return (f"shard {path} does not match the checksum recorded in its manifest when it was written (damaged on "
            f"disk or in transfer): rerun prep for its plate (plate shards) or ./launch.sh rsets (replicate sets), "
            f"or restore it from a copy")


def open_hashed(url: str, like: str | None = None, on_retry=None):
    """(a buffered reader of a local shard or an object, its HashingReader): micon.integrity.open_hashed,
    for object storage too (a stream that re-opens at its offset after a transient error, counted)."""
    if not storage.is_url(url):
        return integrity.open_hashed(url, like=like)
    raw = integrity.HashingReader(storage.open_read(url, on_retry), like)
    return io.BufferedReader(raw, 1 << 20), raw


def verified_samples(urls: list[str], checksums: dict[str, str | None], handler, on_damaged, on_retry=None,
                     on_unopened=None):
    """WebDataset samples of each shard in turn. A shard with a recorded checksum is hashed as its bytes
    stream past and its samples are held back until the whole file matched, so nothing of a damaged
    (altered or truncated) shard is ever used; such a shard is skipped, logged with its name and passed
    to `on_damaged(url)`. Holding back costs one shard's samples in memory per loader worker (about
    shard_mb). Unreadable data goes to `handler` (webdataset's error handler); a shard that stays
    unreadable after the retries (`on_retry` is told of each) is handled as a truncated one. A shard that
    cannot be opened at all (deleted, no permission) goes to `on_unopened(url, error)` when given (so it
    is counted at once), else to `handler`."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    for url in urls:
        expected = checksums.get(Path(url).name)
        try:
            fh, hashed = open_hashed(url, like=expected, on_retry=on_retry)
        except OSError as e:
            if on_unopened is not None:
                on_unopened(url, e)
                continue
            if handler(e):
                continue
            raise
        with fh:
            samples = group_by_keys(tar_file_expander([{"url": url, "stream": fh}], handler=handler),
                                    handler=handler)
            if expected is None:
                yield from samples
                continue
            held = list(samples)
            try:
                integrity.drain(fh)
            except OSError as e:      # unreadable to the end: as truncated (its checksum cannot match)
                handler(e)
                held = None
        if held is None or hashed.checksum.hexdigest() != expected:
            log.warning("skipping its samples: %s", damaged_message(url))
            on_damaged(url)
            continue
        yield from held


def read_tar_encoded(path: str | Path, checksum: str | None = None):
    """Yield (key, encoded image bytes, codec, meta) from one shard, without WebDataset or decoding. With
    `checksum` (the manifest's), the shard is hashed as it is read and nothing is yielded unless the whole
    file matches (ShardDamagedError names it)."""
    if checksum is None:
        with open_hashed(str(path))[0] as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
            yield from _encoded_samples(tar)
        return
    fh, hashed = open_hashed(str(path), like=checksum)
    with fh:
        try:
            held = list(_encoded_samples(tarfile.open(fileobj=fh, mode="r|")))
            integrity.drain(fh)
        except (tarfile.TarError, EOFError, ValueError):     # truncated, or damaged where the decoder notices
            held = None
    if held is None or hashed.checksum.hexdigest() != checksum:
        raise ShardDamagedError(damaged_message(path))
    yield from held


def _encoded_samples(tar: tarfile.TarFile):
    pending: dict[str, dict] = {}
    for member in tar:
        key, ext = member.name.split(".", 1)
        data = tar.extractfile(member).read()
        entry = pending.setdefault(key, {})
        if ext == "json":
            entry["json"] = json.loads(data)
        elif ext.startswith("image."):
            entry["image"], entry["codec"] = data, ext.split(".", 1)[1]
        if "json" in entry and "image" in entry:
            yield key, entry["image"], entry["codec"], entry["json"]
            del pending[key]


def read_tar_samples(path: str | Path, channels: int = 5):
    """Yield (key, image, meta) from one shard, without WebDataset (for checks and tools)."""
    for key, blob, codec, meta in read_tar_encoded(path):
        yield key, decode(blob, codec, channels), meta


# ----------------------------------------------------------------------------- manifest

class ManifestError(ValueError):
    pass


@dataclass
class Manifest:
    """What training and evaluation read first: format, channels, shards, plates, splits."""

    root: Path
    data: dict
    sha256: str = ""      # of manifest.json's bytes as read (what an embedding's identity records)

    @classmethod
    def load(cls, path) -> "Manifest":
        """From a prep output (its directory or manifest.json), local or an object-storage URL."""
        path = storage.path(path)
        if path.is_dir() if isinstance(path, Path) else path.name != "manifest.json":
            path = path / "manifest.json"
        try:
            raw = path.read_bytes()
            data = json.loads(raw)
        except (FileNotFoundError, IsADirectoryError):
            raise ManifestError(f"no shard manifest at {path}: run ./launch.sh prep SRC OUT first "
                                f"(a killed prep writes it only when every plate is done)") from None
        if data.get("format_version") != FORMAT_VERSION:
            raise ManifestError(f"{path}: format version {data.get('format_version')}, this code reads "
                                f"{FORMAT_VERSION}; re-run prep")
        return cls(path.parent, data, hashlib.sha256(raw).hexdigest())

    @property
    def channels(self) -> list[str]:
        return self.data["channels"]

    @property
    def codec(self) -> str:
        return self.data["codec"]

    def shard_checksums(self) -> dict[str, str | None]:
        """Plate shard name -> checksum recorded when it was written (None for shards written before)."""
        return self._checksums(self.data["shards"], f"shard set {self.root}", "rerun prep into a new OUT")

    def replicate_set_checksums(self) -> dict[str, str | None]:
        return self._checksums(self.replicate_sets["shards"], f"replicate sets of {self.root}",
                               f"rebuild them with ./launch.sh rsets {self.root}")

    @staticmethod
    def _checksums(shards: list[dict], what: str, hint: str) -> dict[str, str | None]:
        out = {s["name"]: s.get("checksum") for s in shards}
        if any(v is None for v in out.values()):
            integrity.warn_unrecorded(what, hint)
        return out

    def shard_paths(self, plates: set[str] | None = None) -> list[str]:
        return [str(self.root / "shards" / s["name"]) for s in self.data["shards"]
                if plates is None or s["plate"] in plates]

    def plates(self) -> pd.DataFrame:
        rows = [dict(Metadata_Plate=p, **{k: v for k, v in rec.items() if not isinstance(v, (dict, list))})
                for p, rec in self.data["plates"].items()]
        return pd.DataFrame(rows)

    def plates_without_dmso(self) -> list[str]:
        return sorted(p for p, rec in self.data["plates"].items() if rec["stats"]["mean"] is None)

    @functools.cached_property
    def replicate_sets(self) -> dict | None:
        """The replicate-set shards' manifest (replicate_sets/manifest.json, read once), or None when not built."""
        try:
            return json.loads((self.root / "replicate_sets" / "manifest.json").read_text())
        except FileNotFoundError:
            return None

    def replicate_set_paths(self) -> list[str]:
        rs = self.replicate_sets
        if rs is None:
            raise ManifestError(f"{self.root} has no replicate sets: run ./launch.sh rsets {self.root} (prep "
                                f"builds them unless replicate_sets=false)")
        from micon.data.replicate_sets import FORMAT_VERSION as RSET_VERSION
        if rs.get("version") != RSET_VERSION:
            raise ManifestError(f"{self.root / 'replicate_sets'} has format version {rs.get('version')}, this code "
                                f"reads {RSET_VERSION}: rebuild them with ./launch.sh rsets {self.root}")
        return [str(self.root / "replicate_sets" / s["name"]) for s in rs["shards"]]

    def plate_stats(self, plate: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel DMSO (mean, std) of a plate, float64 [C] each. A plate without DMSO sites gets
        the screen-wide average of the other plates' statistics (the one fallback rule, used by
        training and embedding alike). Raises ManifestError naming the plate when nothing fits."""
        plates = self.data["plates"]
        if plate not in plates:
            raise ManifestError(f"plate {plate} is not in the shard manifest {self.root / 'manifest.json'}")
        st = plates[plate]["stats"]
        if st["mean"] is None:
            ok = [p["stats"] for p in plates.values() if p["stats"]["mean"] is not None]
            if not ok:
                raise ManifestError(f"plate {plate} has no DMSO sites and neither has any other plate of "
                                    f"{self.root}: plate normalisation is impossible; train with "
                                    f"data.normalize=none or add DMSO wells")
            mean, std = np.mean([s["mean"] for s in ok], axis=0), np.mean([s["std"] for s in ok], axis=0)
        else:
            mean, std = np.asarray(st["mean"], np.float64), np.asarray(st["std"], np.float64)
        if mean.shape != (len(self.channels),) or std.shape != mean.shape or not (
                np.isfinite(mean).all() and np.isfinite(std).all()):
            raise ManifestError(f"plate {plate}: DMSO channel statistics are not {len(self.channels)} finite "
                                f"numbers (mean {st['mean']}, std {st['std']}); rerun prep for this plate")
        return mean, std

    def split_of(self, meta: dict) -> str:
        """'train' or why a site is held out: heldout_source, heldout_batch, heldout_compound."""
        sp = self.data["splits"]
        if meta[schema.SOURCE] in sp["heldout_sources"]:
            return "heldout_source"
        if meta[schema.BATCH] in sp["heldout_batches"]:
            return "heldout_batch"
        if meta[schema.JCP] in sp["heldout_compounds"]:
            return "heldout_compound"
        return "train"


def assign_splits(compounds: list[str], sources: list[str], batches_by_source: dict[str, list[str]], seed: int,
                  heldout_compound_fraction: float, heldout_sources: int, heldout_batches: int) -> dict:
    """Reproducible splits by seed: held-out treated compounds, sources and (other sources') batches."""
    rng = np.random.default_rng([seed, 2024])
    compounds = sorted(compounds)
    n_c = int(round(heldout_compound_fraction * len(compounds)))
    held_c = sorted(rng.permutation(compounds)[:n_c].tolist()) if n_c else []
    sources = sorted(sources)
    if heldout_sources >= len(sources) and heldout_sources > 0:
        raise ManifestError(f"heldout_sources={heldout_sources} would leave no source to train on "
                            f"(the screen has {len(sources)})")
    held_s = sorted(rng.permutation(sources)[:heldout_sources].tolist()) if heldout_sources else []
    remaining = sorted(b for s in sources if s not in held_s for b in batches_by_source[s])
    if heldout_batches >= len(remaining) and heldout_batches > 0:
        raise ManifestError(f"heldout_batches={heldout_batches} would leave no batch to train on "
                            f"({len(remaining)} batches outside held-out sources)")
    held_b = sorted(rng.permutation(remaining)[:heldout_batches].tolist()) if heldout_batches else []
    return dict(seed=seed, heldout_compound_fraction=heldout_compound_fraction, heldout_compounds=held_c,
                heldout_sources=held_s, heldout_batches=held_b)


# ----------------------------------------------------------------------------- control bank

class ControlBank:
    """DMSO sites per plate in zarr (`{plate}` arrays [n, C, H, W] uint8) plus `controls.parquet`
    (plate, batch, source, well, site, row). Same-plate lookups are O(1); the fallbacks to the
    same batch, then source, are for plates whose controls were all lost or held out."""

    def __init__(self, root: str | Path, cache_plates: int = 16, counts: dict | None = None):
        """`cache_plates`: how many plates' DMSO sites to keep decoded in memory (LRU; 0 = read one
        site per draw). Plate-grouped shards keep a worker on a few plates at a time, so a small
        cache turns almost every draw into a memory lookup."""
        import zarr

        self.root = storage.path(root)
        self.table = pd.read_parquet(io.BytesIO(storage.read_bytes(self.root / "controls.parquet")))
        self._zarr = zarr.open_group(storage.zarr_store(self.root / "control_bank.zarr", read_only=True), mode="r")
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.cache_plates = cache_plates
        self.counts = counts      # images_read / bytes_read of every site loaded (micon.data.pipeline.Counts)
        # each DMSO site's checksum (controls.parquet, written by prep); a damaged site is never drawn
        self.checksums: dict[tuple[str, int], str] = {}
        if "checksum" in self.table.columns and self.table["checksum"].notna().all():
            self.checksums = dict(zip(zip(self.table[schema.PLATE], self.table["row"]), self.table["checksum"]))
        else:
            integrity.warn_unrecorded(f"control bank {self.root}", "rerun prep into a new OUT to record them")
        self.damaged: set[tuple[str, int]] = set()
        counts = self.table.groupby(schema.PLATE).size()
        self.n_by_plate = counts.to_dict()
        first = self.table.drop_duplicates(schema.PLATE).set_index(schema.PLATE)
        self.plates_by_batch = first.reset_index().groupby(schema.BATCH)[schema.PLATE].apply(list).to_dict()
        self.plates_by_source = first.reset_index().groupby(schema.SOURCE)[schema.PLATE].apply(list).to_dict()

    def plate_images(self, plate: str) -> np.ndarray:
        """All DMSO sites of a plate [n, C, H, W] (cached, least recently used plate evicted)."""
        if plate in self._cache:
            self._cache.move_to_end(plate)
            return self._cache[plate]
        arr = np.asarray(self._zarr[plate][:])
        self._count(arr)
        for row in range(len(arr)):
            self._verify(plate, row, arr[row])
        if self.cache_plates > 0:
            self._cache[plate] = arr
            if len(self._cache) > self.cache_plates:
                self._cache.popitem(last=False)
        return arr

    def get(self, plate: str, row: int) -> np.ndarray | None:
        """DMSO site `row` of `plate`, or None when it does not match its checksum (damaged)."""
        if self.cache_plates > 0:
            arr = self.plate_images(plate)[row]
        else:
            arr = np.asarray(self._zarr[plate][row])
            self._count(arr[None])
            self._verify(plate, row, arr)
        return None if (plate, row) in self.damaged else arr

    def _verify(self, plate: str, row: int, site: np.ndarray) -> None:
        expected = self.checksums.get((plate, row))
        if (plate, row) in self.damaged or integrity.matches(lambda like: integrity.of_array(site, like), expected):
            return
        self.damaged.add((plate, row))
        if self.counts is not None:
            self.counts.add("controls_lost")
        log.warning("control bank %s: DMSO site %d of plate %s does not match its checksum (damaged): never drawn; "
                    "rerun prep for plate %s to repair it", self.root, row, plate, plate)

    def _count(self, arr: np.ndarray) -> None:
        if self.counts is not None:   # decoded bytes: the zarr chunks are stored uncompressed-equivalent
            self.counts.add("images_read", len(arr))
            self.counts.add("bytes_read", int(arr.nbytes))

    def draw(self, plate: str, batch: str, source: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        """A random DMSO site for a treated site: same plate, else same batch, else same source.
        Returns (image, level) with level in {"plate", "batch", "source"}."""
        for level, candidates in (("plate", [plate] if self.n_by_plate.get(plate) else []),
                                  ("batch", self.plates_by_batch.get(batch, [])),
                                  ("source", self.plates_by_source.get(source, []))):
            for _ in range(8 if candidates else 0):   # a damaged site is skipped: draw again
                p = candidates[int(rng.integers(len(candidates)))]
                image = self.get(p, int(rng.integers(self.n_by_plate[p])))
                if image is not None:
                    return image, level
        raise KeyError(f"no DMSO control for plate {plate} (batch {batch}, source {source}) in {self.root}")
