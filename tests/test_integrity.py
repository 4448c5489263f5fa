"""Checksums of every stored object: recorded when written, checked by the readers (the training stream,
embedding, the control bank, the graph store, evaluation's loader) and by the verify job."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import tarfile
import zlib

import numpy as np
import pandas as pd
import pytest
import xxhash

from micon import integrity


def flip(path, offset: int, mask: int = 1) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([b ^ mask]))


def json_flip_offset(shard, key: bytes = b'"Metadata_Well": "') -> int:
    """A byte inside the first JSON member whose flip keeps the JSON valid (a well's row letter): the shard
    still decodes, only its checksum can tell."""
    with tarfile.open(shard) as tar:
        m = next(m for m in tar if m.name.endswith(".json"))
        data = tar.extractfile(m).read()
    return m.offset_data + data.index(key) + len(key)


@pytest.fixture
def shard_copy(tiny_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(tiny_shards, out)
    return out


# --------------------------------------------------------------------------- the helper

def test_checksums_match_independent_references():
    rng = np.random.default_rng(0)
    for n in (0, 1, 511, 1 << 20):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert integrity.of_bytes(data) == f"xxh3_64:{xxhash.xxh3_64_hexdigest(data)}"
        assert integrity.of_bytes(data, "crc32:x") == f"crc32:{zlib.crc32(data):08x}"
        assert integrity.of_bytes(data, "sha256:x") == "sha256:" + hashlib.sha256(data).hexdigest()
        assert integrity.of_bytes(data, "abc") == hashlib.sha256(data).hexdigest()   # bare hex: old embed.json
        for algorithm in ("xxh3_64", "crc32", "sha256"):
            h = integrity.Checksum(algorithm)
            for i in range(0, n, 1000):
                h.update(data[i:i + 1000])
            assert h.hexdigest() == integrity.of_bytes(data, f"{algorithm}:x")
    arr = rng.normal(size=(7, 3)).astype(np.float32)
    assert integrity.of_array(arr.T) == integrity.of_bytes(np.ascontiguousarray(arr.T).tobytes())


def test_sample_tar_checksum_is_the_files(tmp_path):
    from micon.data.tarwriter import SampleTar

    rng = np.random.default_rng(1)
    with SampleTar(tmp_path / "a.tar") as tar:
        for i in range(5):
            tar.write({"__key__": f"k{i}", "json": b"{}", "pack": rng.bytes(int(rng.integers(1, 3000)))})
    assert tar.checksum == integrity.of_file(tmp_path / "a.tar", chunk=777)


# --------------------------------------------------------------------------- the training stream

def _stream(root, **kw):
    from micon.data.pipeline import ExampleStream, StreamConfig

    return ExampleStream(str(root), StreamConfig(replicate_sets=True, **kw), rank=0, world=1, num_workers=1)


def _epoch0(root, checksums: bool, n: int):
    """The first `n` replicate sets of the one data stream and its counts then. With fewer samples than the
    shuffle buffer holds, epoch 0 yields its first sample only after reading (and settling) all its shards."""
    from micon.data.pipeline import Counts, ExampleStream
    from micon.data.shards import Manifest

    m = Manifest.load(root)
    counts, stream = Counts(), _stream(root)
    sums = m.replicate_set_checksums() if checksums else {}
    expected = {s["name"]: s["n_samples"] for s in m.replicate_sets["shards"]}
    assert sum(expected.values()) < stream.cfg.shuffle_buffer
    gen = stream._epochs(m.replicate_set_paths(), expected, 0, counts, ExampleStream._parse_replicate_set,
                         lambda s: True, checksums=sums)
    return [next(gen) for _ in range(n)], counts


def test_flipped_byte_in_a_replicate_set_shard_is_caught_by_its_checksum(shard_copy, caplog):
    rs = json.loads((shard_copy / "replicate_sets" / "manifest.json").read_text())
    bad = rs["shards"][1]
    total = sum(s["n_samples"] for s in rs["shards"])
    flip(shard_copy / "replicate_sets" / bad["name"], json_flip_offset(shard_copy / "replicate_sets" / bad["name"]))
    # unverified, the damaged shard decodes: every sample parses, nothing is counted lost
    got, counts = _epoch0(shard_copy, False, total)
    assert counts["samples_lost"] == 0 and len({s["key"] for s in got}) == total
    # verified, its samples never reach the stream: counted lost, the shard named
    with caplog.at_level(logging.WARNING, logger="micon.data"):
        got, counts = _epoch0(shard_copy, True, total - bad["n_samples"])
    assert counts["samples_lost"] == bad["n_samples"] and counts["shards_failed_checksum"] == 1
    assert counts["shards_damaged"] == 1
    assert not {s["key"] for s in got} & {k for k in _keys(shard_copy / "replicate_sets" / bad["name"])}
    assert any(bad["name"] in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records)


def _keys(shard):
    with tarfile.open(shard) as tar:
        return {m.name.split(".", 1)[0] for m in tar}


def test_nothing_readable_stops_the_stream_naming_the_damaged_shards(shard_copy):
    from micon.data.pipeline import DataStreamError

    rs = json.loads((shard_copy / "replicate_sets" / "manifest.json").read_text())
    for s in rs["shards"]:
        p = shard_copy / "replicate_sets" / s["name"]
        flip(p, json_flip_offset(p))
    stream = _stream(shard_copy, batch_size=2)
    with pytest.raises(DataStreamError, match="failed their checksum") as e:
        next(iter(stream))
    assert sum(s["name"] in str(e.value) for s in rs["shards"]) >= 5 and "verify" in str(e.value)


def test_shards_written_before_checksums_still_read_with_one_warning(shard_copy, caplog):
    from micon.data.pipeline import Counts
    from micon.data.shards import Manifest

    for path in (shard_copy / "manifest.json", shard_copy / "replicate_sets" / "manifest.json"):
        doc = json.loads(path.read_text())
        for s in doc["shards"]:
            del s["checksum"]
        path.write_text(json.dumps(doc))
    total = sum(s["n_samples"] for s in doc["shards"])
    integrity._warned.clear()
    with caplog.at_level(logging.WARNING, logger="micon.integrity"):
        got, counts = _epoch0(shard_copy, True, total)
        m = Manifest.load(shard_copy)
        m.replicate_set_checksums()
        stream = _stream(shard_copy)
        assert next(stream._raw_samples(m, 0, Counts()))["meta"]          # plate shards read too
    assert len({s["key"] for s in got}) == total and counts["samples_lost"] == 0
    warned = [r.getMessage() for r in caplog.records if "records no checksums" in r.getMessage()]
    assert len(warned) == 2 and any("replicate sets" in w for w in warned) and any("shard set" in w for w in warned)


def test_plate_shard_checksum_is_checked_by_embedding_readers(shard_copy):
    from micon.data.shards import Manifest, ShardDamagedError, read_tar_encoded

    m = Manifest.load(shard_copy)
    name = m.data["shards"][0]["name"]
    path = shard_copy / "shards" / name
    clean = list(read_tar_encoded(path, m.shard_checksums()[name]))
    flip(path, json_flip_offset(path))
    assert len(list(read_tar_encoded(path))) == len(clean)          # it still decodes
    with pytest.raises(ShardDamagedError, match=name):
        list(read_tar_encoded(path, m.shard_checksums()[name]))
    other = m.data["shards"][1]["name"]                                # truncated: named the same way
    (shard_copy / "shards" / other).write_bytes((shard_copy / "shards" / other).read_bytes()[:5000])
    with pytest.raises(ShardDamagedError, match=other):
        list(read_tar_encoded(shard_copy / "shards" / other, m.shard_checksums()[other]))


def test_control_bank_never_draws_a_damaged_site(shard_copy, caplog):
    from micon.data.pipeline import Counts
    from micon.data.shards import ControlBank

    table = pd.read_parquet(shard_copy / "controls.parquet")
    plate = table["Metadata_Plate"].iloc[0]
    bad_rows = table.index[table["Metadata_Plate"] == plate]
    table.loc[bad_rows[:-1], "checksum"] = "crc32:00000000"        # all but one site of the plate
    table.to_parquet(shard_copy / "controls.parquet", index=False)
    for cache in (0, 4):
        counts = Counts()
        bank = ControlBank(shard_copy, cache_plates=cache, counts=counts)
        with caplog.at_level(logging.WARNING, logger="micon.data"):
            assert bank.get(plate, int(table.loc[bad_rows[0], "row"])) is None
        assert bank.get(plate, int(table.loc[bad_rows[-1], "row"])) is not None
        rng = np.random.default_rng(0)
        for _ in range(20):
            img, level = bank.draw(plate, table["Metadata_Batch"].iloc[0], table["Metadata_Source"].iloc[0], rng)
            assert img is not None
        assert counts["controls_lost"] >= 1
        assert any(plate in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- verify

def _embeddings(out):
    from micon.embeddings import part_path, write_consolidated, write_part

    rng = np.random.default_rng(2)
    emb = rng.normal(size=(10, 4)).astype(np.float32)
    rows = [{"Metadata_Plate": "P", "Metadata_Well": f"A{i:02d}"} for i in range(10)]
    (out / "parts").mkdir(parents=True)
    write_part(part_path(out, "s-0000.tar"), emb, rows, "k")
    write_consolidated(out, emb, pd.DataFrame(rows), {"identity": "k"})


def _run_verify(path, capsys):
    from data_prep.verify import main

    rc = main([str(path)])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def _first(directory, pattern):
    return sorted(p for p in directory.glob(pattern) if p.is_file() and p.stat().st_size > 0)[0]


def test_verify_finds_a_flipped_byte_in_each_kind_and_passes_clean(shard_copy, tiny_graphs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    shutil.move(str(shard_copy), out / "shards")
    shutil.copytree(tiny_graphs, out / "graphs")
    _embeddings(out / "emb")
    rc, text = _run_verify(out, capsys)
    assert rc == 0, text
    assert "shard set" in text and "graph store" in text and "embeddings" in text
    s = out / "shards"
    targets = {
        "plate shard": _first(s / "shards", "*.tar"),
        "replicate-set shard": _first(s / "replicate_sets", "rset-*.tar"),
        "control table": s / "controls.parquet",
        "control bank plate": _first(s / "control_bank.zarr", "*/c/**/*"),
        "graph index": out / "graphs" / "index.parquet",
        "graph array": _first(out / "graphs" / "graphs.zarr", "fingerprints/c/**/*"),
        "embeddings": _first(out / "emb" / "embeddings.zarr", "c/**/*"),
        "embedding sites": out / "emb" / "sites.parquet",
        "embedding part": _first(out / "emb" / "parts", "*.npz"),
    }
    for kind, path in targets.items():
        offset = path.stat().st_size // 2
        flip(path, offset, 0x10)
        rc, text = _run_verify(out, capsys)
        flip(path, offset, 0x10)                                   # restored for the next kind
        damaged = [line for line in text.splitlines() if line.startswith("  ") and line.strip()]
        assert rc == 1 and len(damaged) == 1 and kind in damaged[0], (kind, text)
        assert path.parent.name in damaged[0] or path.name in damaged[0], (kind, text)
    assert _run_verify(out, capsys)[0] == 0
    assert _run_verify(tmp_path / "nothing-here", capsys)[0] == 2


def test_readers_refuse_damaged_graph_stores_and_embeddings(tiny_graphs, tmp_path):
    from micon.chem.store import GraphStore, StoreError
    from micon.embeddings import EmbeddingError, load_embeddings, part_path, read_part

    store = tmp_path / "graphs"
    shutil.copytree(tiny_graphs, store)
    GraphStore(store).packed_fingerprints
    path = _first(store / "graphs.zarr", "fingerprints/c/**/*")
    flip(path, path.stat().st_size // 2, 0x10)
    with pytest.raises(StoreError, match="fingerprints"):
        GraphStore(store).packed_fingerprints
    emb = tmp_path / "emb"
    _embeddings(emb)
    load_embeddings(emb)
    part = part_path(emb, "s-0000.tar")
    with np.load(part) as z:
        offset = io.BytesIO(part.read_bytes()).getvalue().index(z["embeddings"].tobytes()[:8])
    flip(part, offset + 3)
    with pytest.raises(EmbeddingError, match="CRC-32"):            # the zip's own checksum of each member
        read_part(part)
    flip(emb / "sites.parquet", (emb / "sites.parquet").stat().st_size // 2)
    with pytest.raises(EmbeddingError, match="sites.parquet"):
        load_embeddings(emb)
    flip(emb / "sites.parquet", (emb / "sites.parquet").stat().st_size // 2)
    # embed.json written before: a bare sha256 of the embeddings, no sites checksum; still checked
    info = json.loads((emb / "embed.json").read_text())
    _, x = load_embeddings(emb)
    old = {k: v for k, v in info.items() if k not in ("checksum", "checksums")}
    (emb / "embed.json").write_text(json.dumps(dict(old, sha256=hashlib.sha256(x.tobytes()).hexdigest())))
    load_embeddings(emb)
    (emb / "embed.json").write_text(json.dumps(dict(old, sha256=hashlib.sha256(x[:-1].tobytes()).hexdigest())))
    with pytest.raises(EmbeddingError, match="checksum"):
        load_embeddings(emb)


@pytest.mark.slow
def test_training_skips_a_damaged_replicate_set_shard_counting_and_naming_it(shard_copy, tiny_graphs, tmp_path):
    """The probe of issue 20: one flipped byte in a replicate-set shard (one that still decodes). Training
    goes on with the other shards; the damaged one is counted and named, never decoded."""
    from conftest import run_job

    rs = json.loads((shard_copy / "replicate_sets" / "manifest.json").read_text())
    bad = rs["shards"][0]
    flip(shard_copy / "replicate_sets" / bad["name"], json_flip_offset(shard_copy / "replicate_sets" / bad["name"]))
    out = tmp_path / "run"
    proc = run_job("train.run", "-", f"data.shards={shard_copy}", f"data.graphs={tiny_graphs}", f"out={out}",
                   "method=clip", "data.stream=replicate_sets", "steps=4", "micro_batch=4", "progress=false",
                   "wandb.enabled=false")
    counts = json.loads((out / "final.json").read_text())["counts"]
    assert counts["shards_failed_checksum"] >= 1 and counts["samples_lost"] >= bad["n_samples"]
    assert f"{bad['name']} does not match the checksum" in proc.stderr
