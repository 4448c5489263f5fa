"""Shared fixtures: the tiny synthetic screen every test ingests, and a runner for the jobs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def job_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_job(module: str, *args: str, timeout: float = 600, check: bool = True, **env) -> subprocess.CompletedProcess:
    """Run `python -m module args...` from the repository root, as launch.sh does."""
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=job_env(**env),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_screen(tmp_path_factory) -> Path:
    """The `tiny` synthetic screen (seed 0), written once per test session."""
    out = tmp_path_factory.mktemp("screen") / "tiny"
    run_job("data_prep.synth", out, "preset=tiny", "seed=0")
    return out


@pytest.fixture(scope="session")
def tiny_shards(tiny_screen, tmp_path_factory) -> Path:
    """The tiny screen ingested into small shards (3 per plate, so 2 ranks x 2 workers can stream)."""
    out = tmp_path_factory.mktemp("shards") / "tiny"
    run_job("data_prep.ingest", tiny_screen, out, "workers=2", "shard_mb=0.2")
    return out


@pytest.fixture(scope="session")
def tiny_graphs(tiny_screen, tmp_path_factory) -> Path:
    """Molecular graphs of the tiny screen's compounds."""
    out = tmp_path_factory.mktemp("graphs") / "tiny"
    run_job("data_prep.featurize", tiny_screen / "metadata" / "compound.csv.gz", out, "workers=1")
    return out


@pytest.fixture
def one_rank(monkeypatch):
    """One DeepSpeed rank in this process: the rendezvous environment on a free local port."""
    from micon.distributed import free_port

    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
