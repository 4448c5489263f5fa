"""JUMP layout -> WebDataset shards, DMSO control bank (zarr), per-plate channel stats, manifest.

    ./launch.sh prep SRC OUT [key=value ...]          (keys and their defaults: --help)

One Ray task per plate (local Ray, or the cluster at RAY_ADDRESS). A plate is finished when its
record `OUT/plates/{plate}.json` exists; it is written last, after the plate's shards and control
array were renamed into place (uploaded whole, in object storage), so a rerun skips finished plates and
redoes the rest. SRC and OUT may be local paths or object-storage URLs (s3://bucket/prefix; micon.storage).
One prep at a time per OUT (micon.locks): a second is refused (exit 2) naming the first's host, pid and start.
"""
from __future__ import annotations

import io
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Annotated

import numpy as np
import pandas as pd

from micon import atomic, integrity, schema, storage
from micon.config import (ConfigError, Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range,
                          dump, help_or_usage, load_config)
from micon.data.codecs import CODECS, DEFAULT_CODEC
from micon.data.jump import IngestError, Screen, plate_sites, read_screen
from micon.data.replicate_sets import ReplicateSetConfig
from micon.locks import LockHeld, run_lock
from micon.raycluster import JobError, describe_failure, init_ray, root_cause
from micon.data.shards import FORMAT_VERSION, ShardWriter, assign_splits

REPORT = "ingest_report.csv"
PLATE_LEVEL_PROBLEMS = ("missing_channel", "missing_load_data", "bad_illum")
DELAY_ENV = "MICON_INGEST_TEST_DELAY_S"


Percent = Annotated[float, Range(0, 100)]


@dataclass
class StorageConfig:
    """How prep reaches object storage (micon.storage); credentials come from the standard AWS chain
    (environment, profile, instance role), never from here."""

    endpoint: str = ""            # S3 endpoint URL (default: $AWS_ENDPOINT_URL_S3, else $AWS_ENDPOINT_URL, else AWS)
    anon: str = "auto"            # auto (anonymous for the public cellpainting-gallery bucket), true or false
    retries: PositiveInt = 5      # attempts per object read or write before a transient error is final
    backoff_s: NonNegativeFloat = 0.5  # first wait between attempts, doubled each time (with jitter), at most 20 s
    timeout_s: PositiveFloat = 60.0  # deadline of one request (an upload: 1 s more per MB); then it is retried

    def validate(self) -> None:
        try:
            storage.check_settings(**asdict(self))
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass
class IngestConfig:
    image_size: NonNegativeInt = 0  # stored size in pixels (0 = keep the source size)
    resize: str = "area"            # area (downsample the whole field) or crop (centre crop)
    codec: str = DEFAULT_CODEC      # see docs/BENCHMARKS.md "Site storage formats"
    p_low: Percent = 0.1            # percentile mapped to 0
    p_high: Percent = 99.9          # percentile mapped to 255
    illum: bool = True              # divide by the illumination functions named in load_data
    shard_mb: PositiveFloat = 256.0  # target shard size
    on_error: str = "stop"          # stop: a bad site fails its plate; skip: drop it and report it
    plates: list[str] = field(default_factory=list)  # only these plates (default: every plate of plate_types)
    plate_types: list[str] = field(  # Metadata_PlateType kept (ORF and CRISPR plates are left out)
        default_factory=lambda: ["COMPOUND", "TARGET2", "DMSO", "POSCON8"])
    workers: NonNegativeInt = 0     # Ray CPUs for the local cluster (0 = all cores)
    rebuild: bool = False           # redo plates made with other output options (else refuse)
    allow_outside_root: bool = False  # let load_data name images outside SRC (else such a row is refused)
    metadata: str = ""              # folder or URL of plate/well/compound.csv.gz (default SRC/metadata)
    seed: NonNegativeInt = 0        # seed of the held-out splits
    heldout_compound_fraction: Fraction = 0.2  # share of treated compounds held out of training
    heldout_sources: NonNegativeInt = 0  # whole sources held out of training
    heldout_batches: NonNegativeInt = 0  # whole batches (of the other sources) held out of training
    replicate_sets: bool = True     # end with the replicate-set shards training reads (see rsets)
    rsets: ReplicateSetConfig = field(default_factory=ReplicateSetConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)   # object storage (s3://): endpoint, retries

    def validate(self) -> None:
        if self.codec not in CODECS:
            raise ConfigError(f"codec={self.codec!r}: choose one of {', '.join(CODECS)}")
        if self.on_error not in ("stop", "skip"):
            raise ConfigError(f"on_error={self.on_error!r}: choose stop or skip")
        if self.resize not in ("area", "crop"):
            raise ConfigError(f"resize={self.resize!r}: choose area or crop")
        if not 0 <= self.p_low < self.p_high <= 100:
            raise ConfigError("need 0 <= p_low < p_high <= 100")


def output_options(cfg: IngestConfig) -> dict:
    """The options that shape a plate's stored sites: plates made with others cannot share a shard set."""
    return dict(codec=cfg.codec, image_size=cfg.image_size, resize=cfg.resize, p_low=cfg.p_low, p_high=cfg.p_high,
                illum=cfg.illum, channels=list(schema.CHANNELS))


class OptionsMismatch(RuntimeError):
    pass


def plate_done(out, plate: str, options: dict | None = None) -> dict | None:
    """The plate's record if the plate is complete (record present and every shard whole). With
    `options`, a plate made with other output options raises OptionsMismatch naming them."""
    rec_path = out / "plates" / f"{plate}.json"
    if not rec_path.is_file():
        return None
    rec = json.loads(rec_path.read_text())
    if options is not None and rec.get("options") != options:
        made = rec.get("options") or {}
        diff = [f"{k}={made.get(k, '?')} (now {v})" for k, v in options.items() if made.get(k) != v]
        raise OptionsMismatch(f"plate {plate} was made with {', '.join(diff) or 'options this version does not record'}")
    for s in rec["shards"]:
        p = out / "shards" / s["name"]
        if not p.is_file() or p.stat().st_size != s["bytes"]:
            return None
    return rec


def plates_todo(out, plates: list[str], options: dict) -> tuple[list[str], list[str]]:
    """(plates not finished with these options, why each plate made with other options differs); the
    latter are in the former too, so that rebuild=true redoes them."""
    todo, mismatched = [], []
    for p in plates:
        try:
            if plate_done(out, p, options) is None:
                todo.append(p)
        except OptionsMismatch as e:
            todo.append(p)
            mismatched.append(str(e))
    return todo, mismatched


def ingest_plate(src: "str | Screen", out: str, plate: str, cfg: IngestConfig, progress=None) -> dict:
    """Read, scale and shard one plate; write its DMSO sites to the control bank. Returns its record.
    `src` is the screen's root, or (from `run`) the plate's own slice of the metadata tables."""
    from micon.data.imaging import illumination_gain, process_site
    import zarr

    storage.configure(**asdict(cfg.storage))      # a task on a Ray cluster elsewhere gets the job's storage settings
    out_p = storage.path(out)
    screen = src if isinstance(src, Screen) else read_screen(src, cfg.allow_outside_root, cfg.metadata)
    if os.environ.get(DELAY_ENV):   # tests: slow a plate down so that a kill lands mid-run
        time.sleep(float(os.environ[DELAY_ENV]))
    sites, problems = plate_sites(screen, plate, schema.CHANNELS, cfg.on_error)
    if progress is not None:
        progress.start.remote(len(sites))
    for leftover in (out_p / "shards").glob(f"{plate}-*.tar*"):
        leftover.unlink()   # a half-finished earlier attempt: redo the plate from scratch
    atomic.remove_leftovers(out_p / "shards", rf"{re.escape(plate)}-\d+\.tar")
    writer = ShardWriter(out_p / "shards", plate, cfg.codec, int(cfg.shard_mb * 1e6))
    illum_cache: dict[str, np.ndarray] = {}
    negcon_images, negcon_rows = [], []
    images = SiteImages(sites, isinstance(screen.root, storage.ObjectPath))
    # the plate's image shape: what most of its first images share, not whatever image comes first
    from micon.data.imaging import majority_shape
    expected_shape = majority_shape([p for i in range(min(5, len(sites))) for p in images.readable(i)])
    n_written = 0
    try:
        for i, r in enumerate(sites.itertuples(index=False)):
            r = r._asdict()
            illum = []
            for ch in schema.CHANNELS:
                ipath = r.get(f"illum_{ch}", "") if cfg.illum else ""
                if ipath:
                    if ipath not in illum_cache:
                        try:
                            illum_cache[ipath] = illumination_gain(np.load(io.BytesIO(storage.read_bytes(ipath)),
                                                                           allow_pickle=False))
                        except (OSError, ValueError) as e:
                            raise IngestError(f"illumination function unreadable ({e}); expected a .npy array",
                                              plate, r[schema.WELL], r[schema.SITE], ipath, kind="bad_illum") from None
                    illum.append(illum_cache[ipath])
                else:
                    illum.append(None)
            try:
                paths = images.site(i, plate, r[schema.WELL], r[schema.SITE])
                img, expected_shape = process_site(paths, illum, plate, r[schema.WELL], r[schema.SITE], cfg.image_size, cfg.resize,
                                   cfg.p_low, cfg.p_high, expected_shape)
            except IngestError as e:
                if cfg.on_error == "stop":
                    raise
                problems.append(e.record())
                continue
            meta = {k: str(r[k]) for k in (schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL, schema.SITE,
                                             schema.JCP, schema.INCHIKEY, schema.SMILES, schema.ROLE)}
            writer.write(f"{plate}_{r[schema.WELL]}_{r[schema.SITE]}", img, meta)
            n_written += 1
            if r[schema.ROLE] == schema.NEGCON:
                negcon_images.append(img)
                negcon_rows.append({**{k: meta[k] for k in (schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL,
                                                            schema.SITE)}, "checksum": integrity.of_array(img)})
            if progress is not None and (i + 1) % 16 == 0:
                progress.update.remote(16)
    except BaseException:
        writer.abort()
        raise
    if progress is not None:
        progress.update.remote(len(sites) % 16)
    shards = writer.close()
    # DMSO control bank: one zarr array per plate, written aside and renamed into place (in object storage:
    # uploaded object by object; the plate's record, written after it, is what says it is whole)
    bank = out_p / "control_bank.zarr"
    atomic.remove_leftovers(bank, re.escape(plate))   # an earlier attempt's half-written array
    if negcon_images:
        stack = np.stack(negcon_images)
        with atomic.atomic_path(bank / plate) as tmp:
            arr = zarr.create_array(str(tmp), shape=stack.shape, chunks=(1,) + stack.shape[1:], dtype="uint8",
                                    zarr_format=3, overwrite=True)
            arr[:] = stack
            storage.remove_tree(bank / plate)
        x = stack.astype(np.float64)
        stats = dict(mean=x.mean(axis=(0, 2, 3)).round(6).tolist(), std=x.std(axis=(0, 2, 3)).round(6).tolist(),
                     n_sites=len(stack))
    else:
        stats = dict(mean=None, std=None, n_sites=0)
    roles = pd.Series([s for s in sites[schema.ROLE]]).value_counts().to_dict()
    record = dict(plate=plate, source=str(sites[schema.SOURCE].iloc[0]) if len(sites) else "",
                  batch=str(sites[schema.BATCH].iloc[0]) if len(sites) else "", n_sites=n_written,
                  n_by_role={k: int(v) for k, v in roles.items()}, shards=shards, stats=stats,
                  controls=negcon_rows, problems=problems, options=output_options(cfg),
                  image_shape=list(negcon_images[0].shape) if negcon_images else None)
    atomic.write_json(out_p / "plates" / f"{plate}.json", record)
    return record


class SiteImages:
    """The TIFFs of a plate's sites as `process_site` reads them: local paths as they are; objects fetched
    ahead in batches (every channel of several sites at once, concurrent requests, transient errors
    retried), so a Ray task waits on the store once per batch, not once per image. A missing object is
    the IngestError of a missing TIFF (kind missing_tiff), naming its key."""

    AHEAD = 8   # sites fetched together (40 TIFFs: ~90 MB at cpg0016's sizes)

    def __init__(self, sites: pd.DataFrame, remote: bool):
        self.paths = [[str(getattr(r, f"path_{ch}")) for ch in schema.CHANNELS] for r in sites.itertuples(index=False)]
        self.remote, self.fetched, self.start = remote, {}, None

    def _fetch(self, i: int) -> None:
        if self.start is not None and self.start <= i < self.start + self.AHEAD:
            return
        self.start = i
        self.fetched = storage.read_many([p for ps in self.paths[i:i + self.AHEAD] for p in ps])

    def readable(self, i: int) -> list:
        """Site i's images for a header read (majority_shape): unreadable ones left out."""
        if not self.remote:
            return self.paths[i]
        self._fetch(i)
        return [_Named(self.fetched[p], p) for p in self.paths[i] if isinstance(self.fetched.get(p), bytes)]

    def site(self, i: int, plate: str, well: str, site: str) -> list:
        if not self.remote:
            return self.paths[i]
        self._fetch(i)
        out = []
        for p in self.paths[i]:
            got = self.fetched.get(p)
            if isinstance(got, FileNotFoundError):
                raise IngestError("image object is missing (expected a 16-bit TIFF)", plate, well, site, p,
                                  kind="missing_tiff")
            if not isinstance(got, bytes):
                raise IngestError(f"image object is unreadable ({type(got).__name__}: {storage.redact(str(got))[:200]})",
                                  plate, well, site, p, kind="unreadable_tiff")
            out.append(_Named(got, p))
        return out


class _Named(io.BytesIO):
    """An image's bytes that tifffile reads like a file and errors name by its URL."""

    def __init__(self, data: bytes, url: str):
        super().__init__(data)
        self.url = url

    def __str__(self) -> str:
        return self.url


def finalize(src, out, cfg: IngestConfig, plates: list[str]) -> dict:
    """Manifest, control table, report and splits from the per-plate records."""
    screen = read_screen(src, cfg.allow_outside_root, cfg.metadata)
    records = [json.loads((out / "plates" / f"{p}.json").read_text()) for p in plates]
    # checksum: of the DMSO site's stored pixels (micon.integrity), checked by ControlBank as it reads them
    controls = pd.DataFrame([dict(c, row=i) for r in records for i, c in enumerate(r["controls"])],
                            columns=[schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL, schema.SITE, "row",
                                     "checksum"])
    atomic.write_parquet(out / "controls.parquet", controls)
    import zarr
    zarr.open_group(storage.zarr_store(out / "control_bank.zarr"), mode="a", zarr_format=3)
    problems = pd.DataFrame([p for r in records for p in r["problems"]],
                            columns=["plate", "well", "site", "file", "kind", "reason"])
    atomic.write_csv(out / REPORT, problems)
    used = screen.wells[screen.wells[schema.PLATE].isin(plates)]
    cpds = screen.compounds[screen.compounds[schema.JCP].isin(used[schema.JCP])]
    treated = sorted(c for c in cpds[schema.JCP] if schema.role_of(c) == schema.TREATED)
    pl = screen.plates[screen.plates[schema.PLATE].isin(plates)]
    splits = assign_splits(treated, sorted(pl[schema.SOURCE].unique()),
                           pl.groupby(schema.SOURCE)[schema.BATCH].apply(lambda s: sorted(set(s))).to_dict(),
                           cfg.seed, cfg.heldout_compound_fraction, cfg.heldout_sources, cfg.heldout_batches)
    shapes = {tuple(r["image_shape"]) for r in records if r["image_shape"]}
    manifest = dict(
        format_version=FORMAT_VERSION, channels=list(schema.CHANNELS), codec=cfg.codec, shard_mb=cfg.shard_mb,
        image_shape=list(shapes.pop()) if len(shapes) == 1 else None, source=str(src),
        scaling=dict(rule="per-image percentile", p_low=cfg.p_low, p_high=cfg.p_high, illum=cfg.illum,
                     image_size=cfg.image_size, resize=cfg.resize),
        n_sites=sum(r["n_sites"] for r in records), n_skipped=len(problems),
        shards=[dict(s, plate=r["plate"]) for r in records for s in r["shards"]],
        plates={r["plate"]: dict(source=r["source"], batch=r["batch"], n_sites=r["n_sites"],
                                 n_by_role=r["n_by_role"], stats=r["stats"],
                                 shards=[s["name"] for s in r["shards"]]) for r in records},
        splits=splits,
        checksums={"controls.parquet": storage.checksum(out / "controls.parquet")},
        compounds=[{k: row[k] for k in (schema.JCP, schema.INCHIKEY, schema.SMILES)} | dict(
            Metadata_Role=schema.role_of(row[schema.JCP])) for _, row in cpds.iterrows()],
    )
    atomic.write_json(out / "manifest.json", manifest)
    atomic.write_text(out / "prep_config.yaml", dump(cfg))
    return manifest


def meta_dir(src, cfg: IngestConfig):
    """Where the metadata tables are: `metadata=` if given, else SRC/metadata."""
    return storage.path(cfg.metadata) if cfg.metadata else src / "metadata"


def run(src, out, cfg: IngestConfig) -> int:
    from micon.progress import bar as progress_bar

    screen = read_screen(src, cfg.allow_outside_root, cfg.metadata)
    plates = cfg.plates or screen.plates[screen.plates[schema.PLATE_TYPE].isin(cfg.plate_types)][schema.PLATE].tolist()
    unknown = sorted(set(plates) - set(screen.plates[schema.PLATE]))
    if unknown:
        print(f"prep: plates {', '.join(unknown)} are not in {meta_dir(src, cfg) / 'plate.csv.gz'}", file=sys.stderr)
        return 2
    for d in ("shards", "plates", "control_bank.zarr"):
        (out / d).mkdir(parents=True, exist_ok=True)
    todo, mismatched = plates_todo(out, plates, output_options(cfg))
    if mismatched and not cfg.rebuild:
        print(f"prep: {out} already holds {len(mismatched)} plate(s) made with other options, and one shard set "
              f"cannot mix them: {'; '.join(mismatched[:3])}{' ...' if len(mismatched) > 3 else ''}. Rerun with "
              f"the same options to finish it, write to another OUT, or pass rebuild=true to redo those plates",
              file=sys.stderr)
        return 2
    if mismatched:
        print(f"prep: rebuild=true: redoing {len(mismatched)} plate(s) made with other options", file=sys.stderr)
    print(f"prep: {len(plates)} plates in {src}, {len(plates) - len(todo)} already done, {len(todo)} to ingest "
          f"[codec={cfg.codec} image_size={cfg.image_size or 'source'} on_error={cfg.on_error}]", flush=True)
    failures: list[tuple[str, str]] = []
    if todo:
        ray = init_ray(cfg.workers)

        @ray.remote
        class Progress:
            """Sites written, and the sites of the plates started so far (each task reports its count)."""

            def __init__(self):
                self.n, self.known, self.started = 0, 0, 0

            def start(self, n_sites):
                self.known += n_sites
                self.started += 1

            def update(self, k):
                self.n += k

            def value(self):
                return self.n, self.known, self.started

        progress = Progress.remote()
        task = ray.remote(num_cpus=1, max_retries=0)(ingest_plate)
        # the metadata tables are read once here; each task gets its plate's rows (plate, wells, compounds)
        # through the object store, never the screen's tables
        refs = {p: ray.put(sub) for p, sub in screen.subsets(todo).items()}
        pending = {task.remote(refs[p], str(out), p, cfg, progress): p for p in todo}
        plate_bar = progress_bar(total=len(todo), desc="prep plates", unit="plate", position=0)
        site_bar = progress_bar(desc="prep sites", unit="site", position=1)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            site_bar.n, known, started = ray.get(progress.value.remote())
            if started:     # the started plates' sites, and as many per plate for those not started yet
                site_bar.total = known + round(known / started * (len(todo) - started))
            site_bar.refresh()
            for ref in done:
                plate = pending.pop(ref)
                try:
                    ray.get(ref)
                except Exception as e:  # the task's IngestError, re-raised by Ray, or anything else
                    cause = root_cause(e)
                    if isinstance(cause, IngestError):
                        failures.append((plate, str(cause).splitlines()[0], cause.kind))
                    else:   # a full disk, a lost worker: the cause in one line, Ray's report in a log
                        failures.append((plate, describe_failure("prep", f"plate {plate}", e, out).cause, ""))
                plate_bar.update()
        site_bar.close()
        plate_bar.close()
    if failures:
        for plate, msg, _ in failures:
            print(f"prep: plate {plate} failed, nothing written for it: {msg}", file=sys.stderr)
        done_n = len(plates) - len(failures)
        # a missing channel or load_data concerns the whole plate: on_error=skip cannot skip part of it
        whole = sorted(p for p, _, kind in failures if kind in PLATE_LEVEL_PROBLEMS)
        hint = ("fix the input (or pass on_error=skip to drop bad sites)" if cfg.on_error == "stop" and
                len(whole) < len(failures) else "fix the input")
        if whole:
            hint += (f"; {len(whole)} plate(s) have a whole-plate problem that on_error=skip cannot skip: fix their "
                     f"load_data, or leave them out by listing the other plates in plates=[...]")
        print(f"prep: {done_n} of {len(plates)} plates are done and kept; {hint}, and rerun the same command to "
              f"finish the rest", file=sys.stderr)
        return 1
    m = finalize(src, out, cfg, plates)
    no_dmso = sorted(p for p, rec in m["plates"].items() if rec["stats"]["mean"] is None)
    if no_dmso:
        print(f"prep: {len(no_dmso)} plate(s) have no DMSO sites ({', '.join(no_dmso[:5])}"
              f"{' ...' if len(no_dmso) > 5 else ''}): training and embedding normalise them with the screen-wide "
              f"DMSO average, and evaluation cannot normalise their wells per plate", file=sys.stderr)
    sizes = [s["bytes"] / max(s["n_samples"], 1) for s in m["shards"]]
    print(f"prep: wrote {m['n_sites']} sites in {len(m['shards'])} shards "
          f"({np.mean(sizes) / 1e3:.1f} kB/site, {cfg.codec}), "
          f"{sum(p['stats']['n_sites'] for p in m['plates'].values())} DMSO sites in the control bank, "
          f"{m['n_skipped']} sites skipped (see {out / REPORT}); manifest {out / 'manifest.json'}")
    if cfg.replicate_sets:
        from data_prep.replicate_sets import build
        build(out, cfg.rsets, cfg.workers)
    return 0


def main(argv: list[str]) -> int:
    if (rc := help_or_usage(argv, __doc__, IngestConfig, positional=2)) is not None:
        return rc
    try:
        src, out = storage.path(argv[0]), storage.path(argv[1])
        cfg = load_config(IngestConfig, overrides=argv[2:])
        storage.configure(**asdict(cfg.storage))
        if not meta_dir(src, cfg).is_dir():
            raise ConfigError(f"{src} is not a JUMP-layout screen: expected {meta_dir(src, cfg)}/plate.csv.gz, "
                              f"well.csv.gz, compound.csv.gz")
    except (ConfigError, ValueError) as e:      # ValueError: credentials in a URL (micon.storage.check_url)
        print(f"prep: {storage.redact(str(e))}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        with run_lock(out, job="prep"):     # one prep per OUT: a second run is refused, naming the first
            rc = run(src, out, cfg)
    except LockHeld as e:
        print(e, file=sys.stderr)
        return 2
    except OSError as e:        # storage that stopped answering (its endpoint named), a full disk: one line
        print(f"prep: {storage.redact(str(e))}; finished plates are kept: rerun the same command to finish the "
              f"rest{' once it answers' if isinstance(e, storage.StorageTimeout) else ''}", file=sys.stderr)
        return 1
    except (IngestError, JobError) as e:
        print(e if isinstance(e, JobError) else f"prep: {e}", file=sys.stderr)
        return 1
    if rc == 0:
        print(f"prep: done in {time.perf_counter() - t0:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
