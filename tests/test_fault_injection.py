"""Fault injection: each resumable job (prep, featurize, embed, train) is killed with SIGKILL at a
seeded random point of its progress, rerun, and its outputs compared with a clean run's (bytes for
shards, stores and embeddings; parameters within tolerance for training). Then each job is rerun
into the same output with changed options: it refuses, or redoes, and says which."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
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
    import tempfile

    target = random.Random(seed).randint(1, total - 1)
    log = tempfile.TemporaryFile("w+")        # the job's own words when it ends before the kill
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=job_env(**(env or {})),
                            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    deadline = time.time() + timeout

    def tail() -> str:
        log.seek(0)
        return log.read()[-3000:]

    try:
        while progress() < target:
            if proc.poll() is not None and progress() < target:
                raise AssertionError(f"{args[0]} finished (exit {proc.returncode}) before reaching {target} of "
                                     f"{total}; its log ends:\n{tail()}")
            assert time.time() < deadline, f"{args[0]} did not reach {target} of {total} in {timeout} s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return progress()


def already(pattern: str, text: str, seen: int) -> int:
    """The rerun's count of finished work: at least what was finished at the kill (a task of the killed
    run's Ray workers may still have finished its unit, atomically, before they noticed)."""
    m = re.search(pattern, text)
    assert m, text[-2000:]
    assert int(m.group(1)) >= seen, (m.group(0), seen)
    return int(m.group(1))


def tar_digests(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.tar"))}


def test_prep_killed_midway_reruns_to_identical_shards_and_replicate_sets(tiny_screen, tiny_shards, tmp_path):
    out = tmp_path / "prep"
    args = ["data_prep.ingest", str(tiny_screen), str(out), "workers=1", "shard_mb=0.2"]
    seen = kill_midway(args, lambda: len(list((out / "plates").glob("*.json"))), 4, SEED,
                       env={"MICON_INGEST_TEST_DELAY_S": "0.5"})
    assert 1 <= seen < 4 and not (out / "manifest.json").exists()
    rerun = run_job(*args)
    done = already(r"(\d+) already done, (\d+) to ingest", rerun.stdout, seen)
    assert f"{done} already done, {4 - done} to ingest" in rerun.stdout
    assert tar_digests(out / "shards") == tar_digests(tiny_shards / "shards")
    assert tar_digests(out / "replicate_sets") == tar_digests(tiny_shards / "replicate_sets")


def test_replicate_set_build_killed_midway_reruns_to_identical_shards(tiny_shards, tmp_path):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    shutil.rmtree(shards / "replicate_sets")
    clean = json.loads((tiny_shards / "replicate_sets" / "manifest.json").read_text())
    n = len(clean["shards"])
    args = ["data_prep.replicate_sets", str(shards)]
    seen = kill_midway(args, lambda: len(list((shards / "replicate_sets").glob("rset-*.tar"))), n, SEED + 4,
                       env={"MICON_RSETS_TEST_DELAY_S": "0.4"})
    assert 1 <= seen < n and not (shards / "replicate_sets" / "manifest.json").exists()
    rerun = run_job(*args)
    done = already(r"(\d+) already written, \d+ to write", rerun.stdout, seen)
    assert f"{done} already written, {n - done} to write" in rerun.stdout
    assert tar_digests(shards / "replicate_sets") == tar_digests(tiny_shards / "replicate_sets")
    again = json.loads((shards / "replicate_sets" / "manifest.json").read_text())
    assert again["shards"] == clean["shards"] and again["fingerprint"] == clean["fingerprint"]


def test_featurize_killed_midway_reruns_to_the_same_store(tiny_screen, tiny_graphs, tmp_path):
    import zarr

    out = tmp_path / "graphs"
    args = ["data_prep.featurize", str(tiny_screen / "metadata" / "compound.csv.gz"), str(out), "workers=1",
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
    # changed options into the same output: every chunk redone (none reused), equal to a clean run of them
    radius3 = [str(tiny_screen / "metadata" / "compound.csv.gz"), "workers=1", "chunk_size=2", "radius=3"]
    proc = run_job("data_prep.featurize", radius3[0], str(out), *radius3[1:])
    assert f"{n_chunks} chunks (0 already done)" in proc.stderr, proc.stderr[-2000:]
    run_job("data_prep.featurize", radius3[0], str(tmp_path / "clean3"), *radius3[1:])
    za, zc = zarr.open_group(str(out / "graphs.zarr"), mode="r"), zarr.open_group(str(tmp_path / "clean3" /
                                                                                  "graphs.zarr"), mode="r")
    assert za.attrs["radius"] == 3
    for name, arr in zc.arrays():
        np.testing.assert_array_equal(za[name][:], arr[:], err_msg=name)


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
    args = [str(trained), str(tiny_shards), "workers=1", "batch_size=4"]
    run_job("evaluate.embed", args[0], args[1], clean, *args[2:])
    seen = kill_midway(["evaluate.embed", args[0], args[1], str(out), *args[2:]],
                       lambda: len(list((out / "parts").glob("*.npz"))), 12, SEED + 2,
                       env={"MICON_EMBED_TEST_DELAY_S": "0.3"})
    assert not (out / "embed.json").exists()
    rerun = run_job("evaluate.embed", args[0], args[1], out, *args[2:])
    already(r"(\d+) already embedded", rerun.stdout, seen)
    (m1, e1), (m0, e0) = load_embeddings(out), load_embeddings(clean)
    pd.testing.assert_frame_equal(m1, m0)
    np.testing.assert_array_equal(e1, e0)       # the same bytes: parts of the killed run and the rerun
    assert json.loads((out / "embed.json").read_text())["checksum"] == json.loads((clean / "embed.json").read_text())[
        "checksum"]
    # changed options into the same output: another checkpoint is refused, naming what differs
    other = tmp_path / "other-model"
    run_job("train.run", *train_args(tiny_shards, other, 2))
    proc = run_job("evaluate.embed", other, tiny_shards, out, "workers=1", check=False)
    assert proc.returncode == 1 and "Use another output directory, or pass overwrite=true" in proc.stderr


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
    assert proc.returncode == 1 and "model.projection_dim: 128 there, 32 now" in proc.stderr
    assert "pass resume=none to start over" in proc.stderr
    # steps may grow between resumes
    run_job("train.run", *train_args(tiny_shards, out, 12))
    assert json.loads((out / "final.json").read_text())["step"] == 12
