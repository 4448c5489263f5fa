"""Outputs in object storage (moto's S3 server, started here on localhost): featurize, embed and evaluate
writing to a bucket with the guarantees of a local run (every object whole, the status record last, a killed
rerun keeps finished parts), equal to the same jobs writing to disk, and read back from the bucket.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from micon import storage
from tests.conftest import run_job
from tests.s3server import s3  # noqa: F401 (the fixture)
from tests.test_object_storage import bucket, bucket_files, check_no_secret, local_files  # noqa: F401


def test_a_graph_store_in_a_bucket_reads_like_the_one_on_disk(bucket, tmp_path):
    from micon.chem.featurizer import N_ATOM_CODES, N_BOND_CODES, EncodedMol
    from micon.chem.store import INDEX_COLUMNS, GraphStore, RaggedGraphs, StoreError, write_store

    rng = np.random.default_rng(3)
    mols, fps = [], []
    for i in range(7):
        n_atoms, n_bonds = int(rng.integers(1, 9)), int(rng.integers(0, 6))
        mols.append(None if i == 4 else EncodedMol(
            rng.integers(0, 3, (n_atoms, N_ATOM_CODES), dtype=np.uint8), rng.random((n_atoms, 1), np.float32),
            rng.integers(0, n_atoms, (n_bonds, 2), dtype=np.int32),
            rng.integers(0, 3, (n_bonds, N_BOND_CODES), dtype=np.uint8)))
        fps.append(None if i == 4 else rng.integers(0, 2, 64, dtype=np.uint8))
    graphs = RaggedGraphs.from_encoded(mols, fps, 64)
    index = pd.DataFrame({"Metadata_JCP2022": [f"JCP2022_{i:06d}" for i in range(7)],
                          "Metadata_InChIKey": [f"K{i}" for i in range(7)],
                          "status": ["error" if i == 4 else "ok" for i in range(7)],
                          "reason": ["too large" if i == 4 else "" for i in range(7)], "flags": [""] * 7,
                          "n_atoms": np.diff(graphs.atom_offsets), "n_bonds": np.diff(graphs.bond_offsets)})
    write_store(tmp_path / "g", index[list(INDEX_COLUMNS)], graphs, radius=2, n_bits=64)
    url = f"s3://{bucket}/graphs"
    storage.put_tree(tmp_path / "g", storage.path(url))
    remote, disk = GraphStore(url), GraphStore(tmp_path / "g")
    assert str(remote.root) == url and remote.ids == disk.ids and len(remote) == 6
    pd.testing.assert_frame_equal(remote.index, disk.index)
    for k, v in disk.graphs.arrays().items():
        np.testing.assert_array_equal(getattr(remote.graphs, k), v, err_msg=k)
    np.testing.assert_array_equal(remote.fingerprints(remote.ids), disk.fingerprints(disk.ids))
    with pytest.raises(KeyError, match=f"featurisation failed with too large"):
        remote.get("JCP2022_000004")
    # a damaged index object is refused as a damaged file is; no store at all is named
    fs, key = storage.filesystem(url)
    fs.pipe_file(f"{key}/index.parquet", (tmp_path / "g" / "index.parquet").read_bytes()[:-9] + b"\0" * 9)
    with pytest.raises(StoreError, match="damaged"):
        GraphStore(url)
    with pytest.raises(StoreError, match=f"no complete graph store at s3://{bucket}/nowhere"):
        GraphStore(f"s3://{bucket}/nowhere")


def one_rank(monkeypatch) -> None:
    """The environment of a one-process training run."""
    from micon.distributed import free_port

    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)


@pytest.mark.slow
def test_featurize_into_a_bucket_killed_and_rerun_equals_featurize_to_disk(s3, tiny_screen, tiny_graphs,
                                                                           tiny_shards, tmp_path, monkeypatch, capsys):
    from micon.chem.store import GraphStore
    from micon.config import load_config
    from tests.test_fault_injection import already, kill_midway
    from train.config import TrainConfig
    from train.trainer import EXIT_OK, train

    name = s3.bucket("featurize-out")
    table = f"s3://{name}/metadata/compound.csv.gz"              # the compound table from the bucket too
    storage.filesystem(table)[0].pipe_file(f"{name}/metadata/compound.csv.gz",
                                           (tiny_screen / "metadata" / "compound.csv.gz").read_bytes())
    out = f"s3://{name}/graphs"
    args = ["data_prep.featurize", table, out, "workers=1", "chunk_size=2"]
    n_chunks = -(-len(pd.read_csv(tiny_screen / "metadata" / "compound.csv.gz")) // 2)
    fs, key = storage.filesystem(out)
    seen = kill_midway(args, lambda: len(fs.glob(f"{key}/parts/part-*.npz")), n_chunks, 31,
                       env={**s3.env, "MICON_FEATURIZE_TEST_DELAY_S": "0.4"})
    assert not fs.exists(f"{key}/featurize.json")       # no status record: the store is not taken as whole
    rerun = run_job(*args, **s3.env)
    already(rf"in {n_chunks} chunks \((\d+) already done\)", rerun.stderr, seen)
    remote, disk = GraphStore(out), GraphStore(tiny_graphs)
    pd.testing.assert_frame_equal(remote.index, disk.index)
    for k, v in disk.graphs.arrays().items():
        np.testing.assert_array_equal(getattr(remote.graphs, k), v, err_msg=k)
    assert remote.checksums == disk.checksums and remote.n_bits == disk.n_bits
    marker = json.loads(fs.cat_file(f"{key}/featurize.json"))
    assert marker["counts"]["ok"] == len(disk) and marker["counts"]["chunks"] == n_chunks
    files = bucket_files(out)
    assert not [k for k in files if k.endswith(".tmp") or "consolidate" in k], sorted(files)
    again = run_job(*args, **s3.env)
    assert "up to date, nothing to do" in again.stdout
    # training reads its graphs straight from the bucket (in process: the s3 fixture points it at the server)
    one_rank(monkeypatch)
    assert train(load_config(TrainConfig, None, [f"data.shards={tiny_shards}", f"data.graphs={out}", "method=micon",
                                                 f"out={tmp_path / 'run'}", "steps=1", "micro_batch=4", "progress=false",
                                                 "data.num_workers=0", "wandb.enabled=false"])) == EXIT_OK
    assert json.loads((tmp_path / "run" / "final.json").read_text())["step"] == 1
    said = capsys.readouterr()
    check_no_secret(rerun.stdout + rerun.stderr + said.out + said.err,
                    {**files, **{str(p): p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}})


@pytest.mark.slow
def test_embed_into_a_bucket_and_evaluate_from_it_equal_the_local_runs(s3, tiny_shards, tmp_path, capsys):
    """In process (the s3 fixture points this process at the server), with a featuriser as the model: the
    bucket's part of the writing is the same for a checkpoint's embeddings."""
    from evaluate import embed as embed_job
    from evaluate import run as evaluate_job
    from micon.embeddings import load_embeddings

    def job(main, *args) -> str:
        assert main(list(map(str, args))) == 0
        out = capsys.readouterr()
        return out.out + out.err

    name = s3.bucket("embed-out")
    embed = ["ray=false", "batch_size=8"]
    job(embed_job.main, "image_stats", tiny_shards, tmp_path / "emb", *embed)
    url = f"s3://{name}/emb"
    said = job(embed_job.main, "image_stats", tiny_shards, url, *embed)
    (m0, e0), (m1, e1) = load_embeddings(tmp_path / "emb"), load_embeddings(url)
    pd.testing.assert_frame_equal(m1, m0)
    np.testing.assert_array_equal(e1, e0)
    info = json.loads(storage.read_bytes(f"{url}/embed.json"))
    assert info["checksum"] == json.loads((tmp_path / "emb" / "embed.json").read_text())["checksum"]
    # a run that stopped before embed.json, with one part lost: the rerun keeps the others
    fs, key = storage.filesystem(url)
    parts = sorted(fs.glob(f"{key}/parts/*.npz"))
    fs.rm_file(f"{key}/embed.json")
    fs.rm_file(parts[0])
    said += (rerun := job(embed_job.main, "image_stats", tiny_shards, url, *embed))
    assert f"{len(parts)} shards, {len(parts) - 1} already embedded, 1 to do" in rerun, rerun
    np.testing.assert_array_equal(load_embeddings(url)[1], e0)
    # evaluate reads the embeddings from the bucket and writes its outputs there, metrics.json last
    evaluate = ["ray=false", "wandb=false", "bootstrap=20", "null_size=200"]
    job(evaluate_job.main, f"out={tmp_path / 'eval'}", f"embeddings.image_stats={tmp_path / 'emb'}", *evaluate)
    out = f"s3://{name}/eval"
    said += (ev := job(evaluate_job.main, f"out={out}", f"embeddings.image_stats={url}", *evaluate))
    remote, local = json.loads(storage.read_bytes(f"{out}/metrics.json")), json.loads(
        (tmp_path / "eval" / "metrics.json").read_text())
    assert remote["methods"] == local["methods"] and remote["methods"]["image_stats"]["n_wells"] > 0
    got = bucket_files(out)
    assert set(got) == {str(p.relative_to(tmp_path / "eval")) for p in (tmp_path / "eval").rglob("*") if p.is_file()}
    assert got["profiles_image_stats.parquet"] == (tmp_path / "eval" / "profiles_image_stats.parquet").read_bytes()
    assert f"evaluate: metrics {out}/metrics.json, report {out}/report.md" in ev
    check_no_secret(said, {**got, **bucket_files(url)})


@pytest.mark.slow
def test_the_finished_model_is_exported_to_a_bucket(s3, tiny_shards, tmp_path, monkeypatch, capsys):
    import torch

    from micon.checkpoint import load_checkpoint
    from micon.config import ConfigError, load_config
    from micon.distributed import free_port
    from tests.s3server import SECRET_KEY
    from train.config import TrainConfig
    from train.trainer import EXIT_OK, train

    one_rank(monkeypatch)
    dest = f"s3://{s3.bucket('models')}/simclr"
    args = [f"data.shards={tiny_shards}", f"out={tmp_path / 'run'}", "method=simclr", "steps=2", "micro_batch=4",
            "progress=false", "wandb.enabled=false", "data.num_workers=0"]
    assert train(load_config(TrainConfig, None, [*args, f"export={dest}"])) == EXIT_OK
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert json.loads(storage.read_bytes(f"{dest}/final.json")) == final
    (tmp_path / "exported.pt").write_bytes(storage.read_bytes(f"{dest}/model.pt"))
    exported, local = load_checkpoint(tmp_path / "exported.pt"), load_checkpoint(tmp_path / "run")
    assert exported.record == local.record and exported.state["step"] == 2
    for k, v in local.weights.items():
        torch.testing.assert_close(exported.weights[k], v, rtol=0, atol=0, msg=k)
    # embed reads the exported model straight from the bucket: the embeddings of the run's own checkpoint
    from evaluate import embed as embed_job
    from micon.embeddings import load_embeddings

    for ckpt, emb in ((dest, tmp_path / "emb-bucket"), (tmp_path / "run", tmp_path / "emb-run")):
        assert embed_job.main([str(ckpt), str(tiny_shards), str(emb), "ray=false", "batch_size=8"]) == 0
    np.testing.assert_array_equal(load_embeddings(tmp_path / "emb-bucket")[1], load_embeddings(tmp_path / "emb-run")[1])
    assert json.loads((tmp_path / "emb-bucket" / "embed.json").read_text())["identity"]["model"]["path"] == \
        f"{dest}/model.pt"
    # a finished run rerun exports again (the export was lost); a URL with credentials is refused, unnamed
    storage.remove_tree(dest)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    assert train(load_config(TrainConfig, None, [*args, f"export={dest}"])) == EXIT_OK
    assert storage.path(f"{dest}/final.json").is_file() and storage.path(f"{dest}/model.pt").is_file()
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, None, [*args, f"export=s3://AKIA:{SECRET_KEY}@models/x"])
    assert SECRET_KEY not in str(e.value)
    said = capsys.readouterr()
    check_no_secret(said.out + said.err, bucket_files(dest))
