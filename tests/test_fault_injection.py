"""Fault injection: each resumable job (prep, featurize, embed, train) is killed with SIGKILL at a
seeded random point of its progress, rerun, and its outputs compared with a clean run's (bytes for
shards, stores and embeddings; parameters within tolerance for training). Then each job is rerun
into the same output with changed options: it refuses, or redoes, and says which."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import REPO, job_env, run_job

pytestmark = pytest.mark.slow
SEED = 20261125


def kill_midway(args: list[str], progress, total: int, seed: int, env: dict | None = None,
                timeout: float = 240) -> int:
    """Start a job, wait until `progress()` reaches a seeded random point in [1, total - 1], SIGKILL its
    whole process group. Returns the progress seen at the kill."""
    target = random.Random(seed).randint(1, total - 1)
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=job_env(**(env or {})),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while progress() < target:
            assert proc.poll() is None, f"{args[0]} finished before reaching {target} of {total}"
            assert time.time() < deadline, f"{args[0]} did not reach {target} of {total} in {timeout} s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return progress()


def tar_digests(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.tar"))}


def test_prep_killed_midway_reruns_to_identical_shards_and_replicate_sets(tiny_screen, tiny_shards, tmp_path):
    out = tmp_path / "prep"
    args = ["data_prep.ingest", str(tiny_screen), str(out), "workers=1", "shard_mb=0.2"]
    seen = kill_midway(args, lambda: len(list((out / "plates").glob("*.json"))), 4, SEED,
                       env={"MICON_INGEST_TEST_DELAY_S": "0.5"})
    assert 1 <= seen < 4 and not (out / "manifest.json").exists()
    rerun = run_job(*args)
    assert f"{seen} already done, {4 - seen} to ingest" in rerun.stdout
    assert tar_digests(out / "shards") == tar_digests(tiny_shards / "shards")
    assert tar_digests(out / "replicate_sets") == tar_digests(tiny_shards / "replicate_sets")


def test_featurize_killed_midway_reruns_to_the_same_store(tiny_screen, tiny_graphs, tmp_path):
    import zarr

    out = tmp_path / "graphs"
    args = ["data_prep.featurize", str(tiny_screen / "metadata" / "compound.csv.gz"), str(out), "num_workers=1",
            "chunk_size=2"]
    n_chunks = -(-len(pd.read_csv(tiny_screen / "metadata" / "compound.csv.gz")) // 2)
    kill_midway(args, lambda: len(list((out / "parts").glob("part-*.npz"))), n_chunks, SEED + 1,
                env={"MICON_FEATURIZE_TEST_DELAY_S": "0.4"})
    run_job(*args)
    a, b = pd.read_parquet(out / "index.parquet"), pd.read_parquet(tiny_graphs / "index.parquet")
    pd.testing.assert_frame_equal(a, b)
    za, zb = zarr.open_group(str(out / "graphs.zarr"), mode="r"), zarr.open_group(str(tiny_graphs / "graphs.zarr"),
                                                                                  mode="r")
    for name, arr in zb.arrays():
        np.testing.assert_array_equal(za[name][:], arr[:], err_msg=name)
    # changed options into the same output: redone, not mixed
    proc = run_job("data_prep.featurize", str(tiny_screen / "metadata" / "compound.csv.gz"), str(out),
                   "num_workers=1", "radius=3")
    assert "0 already done" in proc.stderr or "chunks (0 already done)" in proc.stderr


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("fi") / "simclr"
    run_job("train.run", *train_args(tiny_shards, out, 10))
    return out


def train_args(shards, out, steps, *extra):
    return ["-", f"data.shards={shards}", f"out={out}", "method=simclr", f"steps={steps}", "micro_batch=4",
            "progress=false", "wandb.enabled=false", "ckpt_every=3", "data.num_workers=1", *extra]


def test_embed_killed_midway_reruns_to_the_same_embeddings(trained, tiny_shards, tmp_path):
    from micon.embeddings import load_embeddings

    clean, out = tmp_path / "clean", tmp_path / "killed"
    run_job("evaluate.embed", trained, tiny_shards, clean, "workers=1")
    args = ["evaluate.embed", str(trained), str(tiny_shards), str(out), "workers=1", "batch_size=4"]
    seen = kill_midway(args, lambda: len(list((out / "parts").glob("*.npz"))), 12, SEED + 2,
                       env={"MICON_EMBED_TEST_DELAY_S": "0.3"})
    assert not (out / "embed.json").exists()
    rerun = run_job(*args)
    assert f"{seen} already embedded" in rerun.stdout or seen >= 1
    (m1, e1), (m0, e0) = load_embeddings(out), load_embeddings(clean)
    pd.testing.assert_frame_equal(m1, m0)
    np.testing.assert_allclose(e1, e0, rtol=1e-5, atol=1e-6)


def test_train_killed_midway_resumes_to_the_same_parameters(trained, tiny_shards, tmp_path):
    from micon.checkpoint import load_checkpoint

    out = tmp_path / "killed"
    metrics = out / "metrics.jsonl"
    kill_midway(["train.run", *train_args(tiny_shards, out, 10)],
                lambda: len(metrics.read_text().splitlines()) if metrics.is_file() else 0, 10, SEED + 3)
    run_job("train.run", *train_args(tiny_shards, out, 10))
    a, b = load_checkpoint(out), load_checkpoint(trained)
    assert a.state["step"] == b.state["step"] == 10 and a.state["data_position"] == b.state["data_position"]
    for k, v in b.weights.items():
        torch.testing.assert_close(a.weights[k], v, rtol=1e-5, atol=1e-6, msg=f"parameter {k}")
    # changed model settings into the same output: refused, naming what differs
    proc = run_job("train.run", *train_args(tiny_shards, out, 12, "model.projection_dim=32"), check=False)
    assert proc.returncode == 1 and "was trained with other model settings (model:" in proc.stderr
    assert "pass resume=none to start over" in proc.stderr
    # steps may grow between resumes
    run_job("train.run", *train_args(tiny_shards, out, 12))
    assert json.loads((out / "final.json").read_text())["step"] == 12
