"""Data where it lives: the jobs against a real S3 API (moto's server, started here on localhost).

Fast: the storage layer (object paths, whole-object writes, retries of a throttling reply and a dropped
connection, counted; a missing object named; credentials refused in URLs), the load_data rebasing, the
training stream's handling of faults. Slow: prep from a bucket laid out like cpg0016 into a bucket, killed
and rerun, byte-identical to prep from disk; training and embedding streaming from the bucket; no secret
in any output.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from micon import atomic, storage
from tests.conftest import run_job
from tests.s3server import ACCESS_KEY, SECRET_KEY, s3  # noqa: F401 (the fixture)

GALLERY = "s3://cellpainting-gallery/cpg0016-jump/"


@pytest.fixture
def bucket(s3, request):
    """A fresh bucket per test (named after it), and no fault left over."""
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")
    s3.bucket(name)
    yield name
    s3.faults.clear()


def test_object_paths_and_whole_object_writes(bucket):
    root = storage.path(f"s3://{bucket}/out")
    assert isinstance(root, storage.ObjectPath) and str(root / "a" / ".." / "b.json") == f"s3://{bucket}/out/b.json"
    atomic.write_json(root / "b.json", {"x": float("nan"), "y": 1})
    assert json.loads((root / "b.json").read_text()) == {"x": None, "y": 1}
    atomic.write_parquet(root / "t.parquet", pd.DataFrame({"a": [1, 2]}))
    with atomic.atomic_path(root / "arr") as tmp:      # a directory: uploaded object by object
        (tmp / "c").mkdir(parents=True)
        (tmp / "zarr.json").write_text("{}")
        (tmp / "c" / "0").write_bytes(b"\1\2")
    assert [p.name for p in root.glob("*")] == ["arr", "b.json", "t.parquet"]
    assert (root / "arr" / "c" / "0").read_bytes() == b"\1\2" and (root / "t.parquet").stat().st_size > 0
    assert root.is_dir() and (root / "b.json").is_file() and not (root / "nothing").exists()
    assert atomic.remove_leftovers(root) == []
    # a failed writer leaves nothing behind in the bucket
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(root / "failed.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert not (root / "failed.bin").exists()
    storage.remove_tree(root / "arr")
    assert not (root / "arr").exists()
    assert storage.path("runs/x") == Path("runs/x") and storage.path("file:///tmp/x") == Path("/tmp/x")


def test_throttling_and_a_dropped_connection_are_retried_and_counted(s3, bucket):
    data = np.random.default_rng(0).bytes(3_000_000)
    url = f"s3://{bucket}/big.bin"
    atomic.write_bytes(url, data)
    before = sum(storage.RETRIES.values())
    s3.faults.add("slowdown", "big.bin", times=2)
    assert storage.read_bytes(url) == data
    assert sum(storage.RETRIES.values()) == before + 2
    seen = []
    s3.faults.add("drop", "big.bin", times=1)       # half the body, then the connection closes
    with storage.open_read(url, on_retry=seen.append) as fh:
        assert fh.read() == data
    assert len(seen) == 1
    s3.faults.add("slowdown", "big.bin", times=1)
    s3.faults.add("drop", "big.bin", times=1)
    got = storage.read_many([url, f"s3://{bucket}/missing.tiff"])
    assert got[url] == data and isinstance(got[f"s3://{bucket}/missing.tiff"], FileNotFoundError)


def test_a_missing_object_and_a_lasting_fault_are_clear_errors(s3, bucket, monkeypatch):
    with pytest.raises(FileNotFoundError, match=f"{bucket}/nowhere/x.tiff"):
        storage.read_bytes(f"s3://{bucket}/nowhere/x.tiff")
    atomic.write_bytes(f"s3://{bucket}/x.bin", b"x")
    monkeypatch.setenv(storage.RETRIES_ENV, "3")
    s3.faults.add("slowdown", "x.bin", times=100)
    with pytest.raises(OSError, match=rf"s3://{bucket}/x.bin: gave up after 3 attempts"):
        storage.read_bytes(f"s3://{bucket}/x.bin")


def test_credentials_in_urls_are_refused_and_redacted():
    for url in (f"s3://{ACCESS_KEY}:{SECRET_KEY}@bucket/x", f"https://h/x?X-Amz-Signature={SECRET_KEY}"):
        with pytest.raises(ValueError) as e:
            storage.path(url)
        assert SECRET_KEY not in str(e.value) and "standard AWS chain" in str(e.value)
    assert SECRET_KEY not in storage.redact(f"see s3://u:{SECRET_KEY}@b/k?token={SECRET_KEY}&a=1")
    from data_prep.ingest import IngestConfig
    from micon.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(IngestConfig, None, [f"storage.endpoint=http://u:{SECRET_KEY}@127.0.0.1:9000"])
    assert SECRET_KEY not in str(e.value)


def test_the_public_bucket_is_read_anonymously_others_with_the_aws_chain(monkeypatch):
    monkeypatch.delenv(storage.ANON_ENV, raising=False)
    assert storage.filesystem(GALLERY + "source_4/x")[0].anon is True
    assert storage.filesystem("s3://my-mirror/cpg0016-jump/x")[0].anon is False
    monkeypatch.setenv(storage.ANON_ENV, "false")
    assert storage.filesystem(GALLERY + "source_4/x")[0].anon is False


def test_load_data_paths_of_the_public_bucket_are_rebased_onto_src():
    from micon.data.jump import IngestError, check_inside_root, local_path

    for root in (storage.path("s3://mirror/cpg0016-jump"), Path("/data/cpg0016-jump")):
        got = local_path(root, GALLERY + "source_4/images/B/images/P/Images/", "r01c01f01p01-ch1sk1fk1fl1.tiff")
        assert got == f"{root}/source_4/images/B/images/P/Images/r01c01f01p01-ch1sk1fk1fl1.tiff"
    root = storage.path("s3://mirror/cpg0016-jump")
    sites = pd.DataFrame({"Metadata_Well": ["A01"], "Metadata_Site": ["1"],
                          "path_DNA": [local_path(root, "../other/", "x.tiff")]})
    with pytest.raises(IngestError, match="outside the screen root"):
        check_inside_root(sites, root, "P", ["path_DNA"])


def test_the_training_stream_retries_and_counts_and_loses_an_unreadable_shard(s3, bucket, monkeypatch):
    from micon.data.pipeline import Counts, _Handler
    from micon.data.shards import ShardWriter, verified_samples

    rng = np.random.default_rng(1)
    shards = ShardWriter(storage.path(f"s3://{bucket}/shards"), "P1", "npy", 15_000)
    for i in range(6):
        shards.write(f"P1_A0{i}_1", rng.integers(0, 255, (5, 32, 32), dtype=np.uint8), {"i": i})
    written = shards.close()
    assert len(written) == 2 and all(storage.path(f"s3://{bucket}/shards/{s['name']}").stat().st_size == s["bytes"]
                                     for s in written)
    urls = [f"s3://{bucket}/shards/{s['name']}" for s in written]
    checksums = {s["name"]: s["checksum"] for s in written}
    counts, lost = Counts(), []
    s3.faults.add("drop", written[0]["name"], times=1)
    s3.faults.add("slowdown", written[1]["name"], times=1)
    got = list(verified_samples(urls, checksums, _Handler(counts), lost.append,
                                on_retry=lambda e: counts.add("read_retries")))
    assert len(got) == 6 and not lost and counts["read_retries"] == 2
    # a shard that stays unreadable: handled as a truncated one (nothing of it used, named)
    monkeypatch.setenv(storage.RETRIES_ENV, "2")
    s3.faults.add("drop", written[0]["name"], times=100)
    got = list(verified_samples(urls, checksums, _Handler(Counts()), lost.append))
    assert lost == [urls[0]] and len(got) == sum(s["n_samples"] for s in written[1:])


def test_a_missing_tiff_object_is_named_and_counted_like_a_missing_file(s3, bucket, tiny_screen, tmp_path):
    from data_prep.ingest import IngestConfig, ingest_plate
    from micon.data.jump import IngestError, read_screen

    src = publish(tiny_screen, bucket, plates=["SYN0101001"])
    screen = read_screen(src)
    # the public bucket holds images only: the tables may live elsewhere (metadata=)
    assert read_screen(f"s3://{bucket}/images-only", metadata=f"{src}/metadata").wells.equals(screen.wells)
    victim = next(k for k in storage.filesystem(src)[0].find(f"{bucket}/cpg0016-jump/source_1/images")
                  if k.endswith(".tiff"))
    s3.faults.add("missing", victim.rsplit("/", 1)[1], times=1000)
    cfg = IngestConfig(on_error="skip")
    for out in ("out", "out2"):
        for d in ("shards", "plates", "control_bank.zarr"):
            (tmp_path / out / d).mkdir(parents=True)
    rec = ingest_plate(screen.subsets(["SYN0101001"])["SYN0101001"], str(tmp_path / "out"), "SYN0101001", cfg)
    assert [(p["kind"], p["file"]) for p in rec["problems"]] == [("missing_tiff", f"s3://{victim}")]
    with pytest.raises(IngestError, match=re.escape(f"file s3://{victim}: image object is missing")):
        ingest_plate(screen.subsets(["SYN0101001"])["SYN0101001"], str(tmp_path / "out2"), "SYN0101001",
                     IngestConfig(on_error="stop"))


def test_a_shard_set_in_a_bucket_reads_like_the_one_on_disk(s3, bucket, tiny_shards):
    from micon.data.shards import ControlBank, Manifest, read_tar_encoded

    url = f"s3://{bucket}/shards"
    fs, key = storage.filesystem(url)
    fs.pipe({f"{key}/{k}": v for k, v in local_files(tiny_shards).items()})
    remote, disk = Manifest.load(url), Manifest.load(tiny_shards)
    assert remote.data == disk.data and remote.sha256 == disk.sha256 and remote.replicate_sets == disk.replicate_sets
    name = disk.data["shards"][0]["name"]
    checksum = disk.shard_checksums()[name]
    assert list(read_tar_encoded(f"{url}/shards/{name}", checksum)) == list(
        read_tar_encoded(tiny_shards / "shards" / name, checksum))
    bank, local = ControlBank(url), ControlBank(tiny_shards)
    plate = sorted(local.n_by_plate)[0]
    np.testing.assert_array_equal(bank.plate_images(plate), local.plate_images(plate))
    assert not bank.damaged


# ----------------------------------------------------------------------------------------- end to end

def publish(screen: Path, bucket: str, plates: list[str] | None = None) -> str:
    """Upload a screen as a cpg0016 mirror (s3://bucket/cpg0016-jump), its load_data naming images as the
    published files do: s3://cellpainting-gallery/cpg0016-jump/... Returns the mirror's URL."""
    objects = {}
    for f in sorted(screen.rglob("*")):
        rel = f.relative_to(screen).as_posix()
        if not f.is_file() or rel.startswith("ground_truth") or (plates and "/" in rel and not rel.startswith(
                "metadata") and not any(p in rel for p in plates)):
            continue
        data = f.read_bytes()
        if f.name.startswith("load_data"):
            if f.suffix != ".parquet":
                continue            # the parquet is what prep prefers; the CSV would need the same rewrite
            table = pd.read_parquet(f)
            for col in [c for c in table.columns if c.startswith("PathName_")]:
                table[col] = GALLERY + table[col]
            buf = io.BytesIO()
            table.to_parquet(buf, index=False)
            data = buf.getvalue()
        objects[f"{bucket}/cpg0016-jump/{rel}"] = data
    storage.filesystem(f"s3://{bucket}")[0].pipe(objects)
    return f"s3://{bucket}/cpg0016-jump"


def digests(files: dict[str, bytes]) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def bucket_files(url: str) -> dict[str, bytes]:
    fs, key = storage.filesystem(url)
    return {k[len(key) + 1:]: fs.cat_file(k) for k in fs.find(key)}


def without_source(manifest: bytes) -> dict:
    doc = json.loads(manifest)
    doc.pop("source")
    return doc


@pytest.mark.slow
def test_prep_from_a_bucket_into_a_bucket_killed_and_rerun_equals_prep_from_disk(s3, tiny_screen, tiny_shards):
    from tests.test_fault_injection import kill_midway

    src = publish(tiny_screen, s3.bucket("cpg-mirror"))
    out = f"s3://{s3.bucket('prep-out')}/shards"
    args = ["data_prep.ingest", src, out, "workers=1", "shard_mb=0.2"]
    fs, key = storage.filesystem(out)
    seen = kill_midway(args, lambda: len(fs.glob(f"{key}/plates/*.json")), 4, 21,
                       env={**s3.env, "MICON_INGEST_TEST_DELAY_S": "0.5"})
    assert 1 <= seen < 4 and not fs.exists(f"{key}/manifest.json")
    rerun = run_job(*args, **s3.env)
    assert re.search(r"4 plates in s3://cpg-mirror/cpg0016-jump, [1-3] already done", rerun.stdout), rerun.stdout
    remote, disk = bucket_files(out), local_files(tiny_shards)
    assert without_source(remote.pop("manifest.json")) == without_source(disk.pop("manifest.json"))
    assert b"workers: 1" in remote.pop("prep_config.yaml") and disk.pop("prep_config.yaml")   # the one option that differs
    assert digests(remote) == digests(disk)      # shards, replicate sets, site index, control bank, records
    check_no_secret(rerun.stdout + rerun.stderr, remote)


@pytest.mark.slow
def test_train_and_embed_stream_from_the_bucket(s3, tiny_shards, tiny_graphs, tmp_path):
    from micon.embeddings import load_embeddings

    out = f"s3://{s3.bucket('shards-in-a-bucket')}/shards"
    fs, key = storage.filesystem(out)
    fs.pipe({f"{key}/{k}": v for k, v in local_files(tiny_shards).items()})
    s3.faults.add("slowdown", "rset-00001.tar", times=1)
    s3.faults.add("drop", "SYN0101001-0000.tar", times=1)
    train = run_job("train.run", "-", f"data.shards={out}", f"data.graphs={tiny_graphs}", f"out={tmp_path / 'run'}",
                    "method=micon", "steps=2", "micro_batch=4", "progress=false", "data.num_workers=1",
                    "ckpt_every=2", **s3.env)
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["step"] == 2, final
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["data/samples_lost"] == 0 and "data/read_retries" in rows[-1]
    emb = run_job("evaluate.embed", tmp_path / "run", out, tmp_path / "emb", "workers=1", "batch_size=8", **s3.env)
    meta, x = load_embeddings(tmp_path / "emb")
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    assert len(meta) == manifest["n_sites"] and np.isfinite(x).all()
    assert len(set(zip(meta["Metadata_Plate"], meta["Metadata_Well"], meta["Metadata_Site"]))) == len(meta)
    written = {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    check_no_secret(train.stdout + train.stderr + emb.stdout + emb.stderr, written)


def check_no_secret(text: str, files: dict[str, bytes]) -> None:
    """Neither credential appears in the jobs' output or in any file they wrote (configs, manifests, logs,
    metrics, wandb's offline records, checkpoints, embeddings)."""
    for secret in (SECRET_KEY, ACCESS_KEY):
        assert secret not in text
        leaked = [name for name, data in files.items() if secret.encode() in data]
        assert not leaked, f"{secret[:6]}... found in {leaked}"


def test_slurm_keeps_object_storage_urls_as_they_are():
    from cluster.submit import absolute_args

    got = absolute_args(["s3://src/cpg0016-jump", "runs/x", "data.shards=s3://out/shards", "out=runs/y"], Path("/w"))
    assert got == ["s3://src/cpg0016-jump", "/w/runs/x", "data.shards=s3://out/shards", "out=/w/runs/y"]
