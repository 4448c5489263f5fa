"""The shard tar writer and the atomic writes every job uses: SampleTar writes the bytes webdataset's own
TarWriter writes (the reference), webdataset reads them back; a write is whole or absent."""
from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pandas as pd
import pytest
import webdataset as wds

from micon import atomic
from micon.data.tarwriter import SampleTar


def _samples(rng: np.random.Generator, n: int) -> list[dict]:
    return [{"__key__": f"PLATE_A{i:02d}_{rng.integers(1, 9)}",
             "json": json.dumps({"i": i, "x": float(rng.random())}).encode(),
             "image.dzstd": rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes(),
             "pack": rng.bytes(int(rng.integers(1, 700)))} for i in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sample_tar_writes_webdatasets_bytes_and_webdataset_reads_them(tmp_path, seed):
    samples = _samples(np.random.default_rng(seed), 25)
    with SampleTar(tmp_path / "ours.tar") as tar:
        for s in samples:
            assert tar.write(s) == sum(len(v) for k, v in s.items() if k != "__key__")
    with open(tmp_path / "reference.tar", "wb") as fh, wds.TarWriter(fh, user="", group="", mtime=0,
                                                                     encoder=False) as ref:
        for s in samples:
            ref.write(s)
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "reference.tar").read_bytes()
    read = list(wds.WebDataset(str(tmp_path / "ours.tar"), shardshuffle=False))
    assert [r["__key__"] for r in read] == [s["__key__"] for s in samples]
    assert all(r[k] == s[k] for r, s in zip(read, samples) for k in ("json", "image.dzstd", "pack"))


def test_atomic_writes_are_whole_or_absent(tmp_path):
    atomic.write_json(tmp_path / "a.json", {"b": 1})
    atomic.write_csv(tmp_path / "t.csv.gz", pd.DataFrame({"x": [1, 2]}))
    atomic.write_parquet(tmp_path / "t.parquet", pd.DataFrame({"x": [3]}))
    assert json.loads((tmp_path / "a.json").read_text()) == {"b": 1}
    assert gzip.decompress((tmp_path / "t.csv.gz").read_bytes()).decode() == "x\n1\n2\n"   # gzip, as named
    assert pd.read_parquet(tmp_path / "t.parquet")["x"].tolist() == [3]
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert json.loads((tmp_path / "a.json").read_text()) == {"b": 1}      # the old file stands
    with atomic.atomic_path(tmp_path / "store.zarr") as tmp:              # a directory built aside
        (tmp / "sub").mkdir(parents=True)
        (tmp / "sub" / "x").write_text("1")
    assert (tmp_path / "store.zarr" / "sub" / "x").read_text() == "1"
    assert sorted(os.listdir(tmp_path)) == ["a.json", "store.zarr", "t.csv.gz", "t.parquet"]


def test_leftovers_of_killed_writers_are_found_by_their_final_name(tmp_path):
    for name in ("P1-0000.tar", "P1-0001.tar", "P1-2-0000.tar", "P1"):
        atomic.temp_path(tmp_path / name).write_bytes(b"half")
    (tmp_path / "P1-0000.tar").write_bytes(b"whole")
    assert len(atomic.remove_leftovers(tmp_path, r"P1-\d+\.tar")) == 2
    assert len(atomic.remove_leftovers(tmp_path)) == 2
    assert os.listdir(tmp_path) == ["P1-0000.tar"]
