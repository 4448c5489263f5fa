"""Training across two nodes (issue 32): a 2-node job, one rank per node, submitted through the project's own
path to the test Slurm cluster's `micon2` partition, whose second node runs in its own network namespace
(tests/slurm_cluster.py). The ranks rendezvous across the two network stacks, train, checkpoint on Slurm's
warning signal, are requeued and resume to the very weights of an uninterrupted 2-rank run."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import job_env
from tests.slurm_cluster import FINAL, PARTITION_2, read_log
from tests.test_slurm import metrics, site, slurm, submit_job, train_args, train_data   # the cluster's fixtures

FIXTURES = (site, slurm, train_data)
REPO = Path(__file__).resolve().parents[1]
STEPS = 10
pytestmark = pytest.mark.slow


def final_weights(out: Path) -> tuple[dict, dict]:
    tag = (out / "checkpoints" / "latest").read_text().strip()
    ck = torch.load(out / "checkpoints" / tag / "model.pt", weights_only=False)
    return ck["model"], ck["state"]


def test_two_nodes_rendezvous_across_network_stacks_preempted_and_resumed_exactly(slurm, site, train_data,
                                                                                    tmp_path):
    if len(slurm.nodes) < 2:
        pytest.skip(f"the test Slurm cluster has one node: {slurm.second_node_problem or 'no second node'}")
    args = train_args(train_data, tmp_path / "OUT", STEPS, "ckpt_every=1000", "data.num_workers=1",
                      "wandb.enabled=false")
    out = tmp_path / "slurm"
    t0 = time.time()
    job_id = submit_job(slurm, "train", "-", "--nodes", "2", "--partition", PARTITION_2, "--gpus-per-node", "0",
                        "--ntasks-per-node", "1", "--cpus-per-task", "1", "--time", "15:00", "--site", str(site),
                        "--", *[a.replace(str(tmp_path / "OUT"), str(out)) for a in args])
    job = slurm.wait(job_id, until=lambda j: len(metrics(out)) >= 2 or j["JobState"] in FINAL, timeout=240, poll=0.1)
    assert job["JobState"] == "RUNNING", f"training ended before USR1 was sent (raise STEPS)\n{read_log(job)}"
    slurm.run("scancel", "--signal=USR1", job_id)  # to the job's steps: one rank on each node
    ref = tmp_path / "ref"                          # meanwhile: the same training as 2 local ranks, uninterrupted
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node=2", "-m",
                "train.run", "-", *[a.replace(str(tmp_path / "OUT"), str(ref)) for a in args]]
    local = subprocess.run(torchrun, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr[-4000:]
    job = slurm.wait(job_id, timeout=300)
    took = time.time() - t0
    log = read_log(job)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "1", log

    # two nodes, one rank each, meeting at the first node's address on the link between the network stacks
    first, second = slurm.nodes
    assert f"on {first.name},{second.name}: 2 nodes x 1 tasks = 2 ranks, rendezvous {first.addr}:" in log, log
    assert log.count("2 nodes x 1 tasks = 2 ranks") == 2, log    # the first run and the requeued one
    saved = int(re.search(r"signal 10: checkpointed step (\d+)", log).group(1))
    assert 2 <= saved < STEPS, log
    assert "checkpointed (exit 75): requeueing job" in log and f"job {job_id} (restart 1)" in log
    assert re.search(rf"resumed from {re.escape(str(out))}/checkpoints/\S+ at step {saved} ", log), log
    assert [m["step"] for m in metrics(out)] == list(range(1, STEPS + 1))   # each step once

    # the same weights as the uninterrupted run
    w, state = final_weights(out)
    ref_w, ref_state = final_weights(ref)
    assert state["step"] == ref_state["step"] == STEPS and state["samples_seen"] == ref_state["samples_seen"]
    assert json.loads((out / "final.json").read_text())["counts"] == json.loads((ref / "final.json").read_text())["counts"]
    assert w.keys() == ref_w.keys()
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-5, atol=1e-6, msg=f"parameter {k} differs")
    print(f"2-node job {job_id}: USR1 at step {saved}, requeued, resumed, {STEPS} steps; "
          f"{len(ref_w)} tensors equal the 2-rank uninterrupted run's; {took:.0f} s in all")
