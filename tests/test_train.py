"""The DeepSpeed training job: 2-process runs of every method, exact resume after SIGTERM and after a
killed rank, wandb offline records, corrupt shards, non-finite losses and missing graphs."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from tests.conftest import REPO, job_env, run_job
from tests.wandb_records import history_and_config

pytestmark = pytest.mark.slow
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def train_args(shards, graphs, out, method, steps, *extra):
    return ["-", f"data.shards={shards}", f"data.graphs={graphs}", f"out={out}", f"method={method}",
            f"steps={steps}", "micro_batch=4", "progress=false", *extra]


def torchrun(*args, nproc=2):
    return [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", "-m", "train.run", *map(str, args)]


def run_torchrun(*args, timeout=600, nproc=2, check=True):
    proc = subprocess.run(torchrun(*args, nproc=nproc), cwd=REPO, env=job_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out):
    ck = torch.load(out / "checkpoints" / (out / "checkpoints" / "latest").read_text() / "model.pt",
                    weights_only=False)
    return ck["model"], ck["state"]


@pytest.mark.parametrize("method", ["micon", "paclr", "clip", "simclr"])
def test_two_processes_learn(tiny_shards, tiny_graphs, tmp_path, method):
    out = tmp_path / method
    run_torchrun(*train_args(tiny_shards, tiny_graphs, out, method, 40, "micro_batch=6", "optim.lr=5e-3",
                             "optim.warmup_steps=3", "ckpt_every=100", "wandb.enabled=false"))
    m = metrics(out)
    assert [r["step"] for r in m] == list(range(1, 41))
    loss = np.array([r["loss/loss"] for r in m])
    assert np.isfinite(loss).all()
    # the loss goes down: a significant negative rank correlation with the step, and a lower last quarter.
    # (On 12 compounds most of which are inactive, contrastive losses have a high floor, so the drop is
    # small for micon/paclr/clip; simclr falls fast.)
    rho, p = stats.spearmanr(np.arange(len(loss)), loss)
    assert rho < 0 and p / 2 < 0.05, (rho, p, loss.round(3))
    assert loss[-10:].mean() < loss[:10].mean(), loss.round(3)
    final = json.loads((out / "final.json").read_text())
    assert final["step"] == 40 and final["samples_seen"] == 40 * 6 * 2
    counts = final["counts"]
    if method in ("micon", "paclr"):   # replicate sets: every control from the treated site's own plate
        assert counts["controls_plate"] > 0 and counts["controls_batch"] == counts["controls_source"] == 0
    if method != "simclr":             # pairs across sources where the screen allows it (tiny: 2 sources)
        assert counts["pairs_across_source"] >= 0.85 * counts["examples"]
    assert counts["images_used"] <= counts["images_read"] and counts["bytes_read"] > 0


def _wait_for_step(out, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").is_file() and len(metrics(out)) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError("run did not reach step %d" % step)


def test_sigterm_and_killed_rank_resume_to_the_same_parameters(tiny_shards, tiny_graphs, tmp_path):
    steps = 8
    common = ("optim.lr=2e-3", "ckpt_every=3", "wandb.enabled=false", "data.num_workers=1")
    ref = tmp_path / "ref"
    run_torchrun(*train_args(tiny_shards, tiny_graphs, ref, "micon", steps, *common))
    ref_w, ref_state = final_weights(ref)

    # SIGTERM (what Slurm sends on preemption) to every rank: checkpoint, exit 75, resume
    out = tmp_path / "sigterm"
    proc = subprocess.Popen(torchrun(*train_args(tiny_shards, tiny_graphs, out, "micon", steps, *common)),
                            cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for_step(out, 4, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    t0 = time.time()
    _, err = proc.communicate(timeout=120)
    assert time.time() - t0 < 120
    saved = json.loads(json.dumps(final_weights(out)[1]))
    assert 4 <= saved["step"] < steps, saved
    assert f"checkpointed step {saved['step']}" in err
    resumed = run_torchrun(*train_args(tiny_shards, tiny_graphs, out, "micon", steps, *common))
    assert f"resumed from {out / 'checkpoints'}" in resumed.stderr and f"at step {saved['step']}" in resumed.stderr
    assert "data: replicate-set shards" in resumed.stderr
    # the data counters continue: what the resumed stream re-read to fast-forward is not counted twice
    ref_counts = json.loads((ref / "final.json").read_text())["counts"]
    assert json.loads((out / "final.json").read_text())["counts"] == ref_counts
    w, state = final_weights(out)
    assert state["step"] == steps and state["samples_seen"] == ref_state["samples_seen"]
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-5, atol=1e-6, msg=f"parameter {k} differs")

    # SIGKILL of one rank: the others must not hang; the rerun resumes from the last checkpoint
    out = tmp_path / "killed"
    proc = subprocess.Popen(torchrun(*train_args(tiny_shards, tiny_graphs, out, "micon", steps, *common)),
                            cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for_step(out, 4, proc)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2, children
    os.kill(int(children[-1]), signal.SIGKILL)
    t0 = time.time()
    proc.communicate(timeout=180)
    assert proc.returncode != 0 and time.time() - t0 < 180
    last = (out / "checkpoints" / "latest").read_text()
    assert last == "step00000003"
    resumed = run_torchrun(*train_args(tiny_shards, tiny_graphs, out, "micon", steps, *common))
    assert "at step 3" in resumed.stderr
    # rows the killed run logged after step 3 are dropped before they are logged again: each step once, in order
    assert [r["step"] for r in metrics(out)] == [r["step"] for r in metrics(ref)]
    w, _ = final_weights(out)
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-5, atol=1e-6, msg=f"parameter {k} differs")
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step00000006", "step00000008"]
    assert json.loads((out / "final.json").read_text())["counts"] == ref_counts


def test_a_rank_with_nothing_readable_stops_every_rank_with_its_message(tiny_shards, tiny_graphs, tmp_path):
    """Rank 1's shards are all truncated: both ranks stop at once (none waits in a collective) and the
    message that names rank 1's shards reaches the user through rank 0."""
    from micon.data.pipeline import shard_slot
    from micon.data.shards import Manifest

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    mine = [Path(p) for p in shard_slot(Manifest.load(shards).shard_paths(), 0, 0, 1, 2, False)]
    for p in mine:
        p.write_bytes(p.read_bytes()[:700])          # a header and a little of the first member
    t0 = time.time()
    proc = run_torchrun(*train_args(shards, tiny_graphs, tmp_path / "run", "simclr", 5, "wandb.enabled=false",
                                    "engine.dist_timeout_s=600"), check=False, timeout=300)
    assert proc.returncode != 0 and time.time() - t0 < 200
    assert "train: epoch 0 of data stream 1 (rank 1) read no usable sample" in proc.stderr, proc.stderr[-3000:]
    assert all(p.name in proc.stderr for p in mine[:5])
    # one line from the job, no traceback of ours (torchrun adds its own summary of the failed ranks)
    assert "micon/data/pipeline.py" not in proc.stderr and "train/trainer.py" not in proc.stderr


def test_wandb_offline_run_holds_the_metrics(tiny_shards, tiny_graphs, tmp_path):
    out = tmp_path / "wb"
    # an unreachable server: an offline run must not need (or try) it
    run_job("train.run", *train_args(tiny_shards, tiny_graphs, out, "simclr", 4), WANDB_MODE="offline",
            WANDB_BASE_URL="http://127.0.0.1:9", WANDB_API_KEY="")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and not list((out / "wandb").glob("run-*"))
    history, config = history_and_config(next(runs[0].glob("run-*.wandb")))
    logged = metrics(out)
    assert len(history) == 4
    for h, m in zip(history, logged):
        assert h["loss/loss"] == pytest.approx(m["loss/loss"])
        for key in ("lr", "samples_per_second", "samples_per_second_per_device", "data_wait_share", "memory_mb"):
            assert key in h
    assert config["method"] == "simclr" and config["steps"] == 4
    # rerunning a finished run (e.g. the demo again) does nothing and keeps its summary
    final = (out / "final.json").read_text()
    again = run_job("train.run", *train_args(tiny_shards, tiny_graphs, out, "simclr", 4, "wandb.enabled=false"))
    assert "already finished: 4 of 4 steps" in again.stderr and (out / "final.json").read_text() == final


def complete_samples(tar_path: Path) -> int:
    """Samples of a (truncated) shard whose members are all whole: the reference count, by tarfile."""
    import tarfile

    members: dict[str, set] = {}
    with open(tar_path, "rb") as fh:
        tf = tarfile.open(fileobj=fh, mode="r|")
        try:
            for m in tf:
                data = tf.extractfile(m).read()
                if len(data) == m.size:
                    key, ext = m.name.split(".", 1)
                    members.setdefault(key, set()).add(ext)
        except (tarfile.ReadError, OSError, EOFError):
            pass
    return sum(1 for exts in members.values() if "json" in exts and len(exts) >= 2)


def test_truncated_shard_warns_and_counts(tiny_shards, tiny_graphs, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    from micon.data.pipeline import shard_slot
    from micon.data.shards import Manifest

    victim = Path(shard_slot(Manifest.load(shards).shard_paths(), 0, 0, 0, 1, False)[0])
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2 + 100])
    out = tmp_path / "run"
    proc = run_job("train.run", *train_args(shards, tiny_graphs, out, "simclr", 3, "wandb.enabled=false",
                                            "data.shuffle_buffer=4"))
    counts = json.loads((out / "final.json").read_text())["counts"]
    # the loss is counted in samples (what a person cares about), not tar members; the shard no longer
    # matches its checksum, so none of it is used, not even the samples before the cut that are whole
    n_victim = next(s["n_samples"] for s in Manifest.load(shards).data["shards"] if s["name"] == victim.name)
    whole = complete_samples(victim)
    assert 0 < whole < n_victim - 1       # more than one sample lost: a count of tar members would say 1
    assert counts["samples_lost"] == n_victim and counts["shards_failed_checksum"] >= 1
    assert "samples lost to unreadable, truncated or damaged shards so far" in proc.stderr
    assert f"shard {victim} does not match the checksum" in proc.stderr


def test_nonfinite_loss_stops_with_the_step(tiny_shards, tiny_graphs, tmp_path):
    out = tmp_path / "nan"
    proc = run_job("train.run", *train_args(tiny_shards, tiny_graphs, out, "simclr", 20, "optim.lr=1e15",
                                            "optim.grad_clip=0", "optim.warmup_steps=0", "wandb.enabled=false"),
                   check=False)
    assert proc.returncode == 1
    assert "train: non-finite loss at step" in proc.stderr and "set on_nonfinite=skip" in proc.stderr


def test_compound_without_graph_is_refused(tiny_screen, tiny_shards, tmp_path):
    import pandas as pd

    table = pd.read_csv(tiny_screen / "metadata" / "compound.csv.gz")
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    train_cpd = next(c["Metadata_JCP2022"] for c in manifest["compounds"] if c["Metadata_Role"] == "treated"
                     and c["Metadata_JCP2022"] not in manifest["splits"]["heldout_compounds"])
    table.loc[table.Metadata_JCP2022 == train_cpd, "Metadata_SMILES"] = "C1CC"
    table.loc[table.Metadata_JCP2022 == train_cpd, "Metadata_InChI"] = ""
    table.to_csv(tmp_path / "compound.csv.gz", index=False)
    run_job("data_prep.featurize", tmp_path / "compound.csv.gz", tmp_path / "graphs", "workers=1")
    proc = run_job("train.run", *train_args(tiny_shards, tmp_path / "graphs", tmp_path / "run", "micon", 2),
                   check=False)
    assert proc.returncode == 1
    assert f"train: 1 training compound(s) have no graph in {tmp_path / 'graphs'}: {train_cpd} (" in proc.stderr


def test_two_processes_zero2_bf16(tiny_shards, tiny_graphs, tmp_path):
    """ZeRO stage 2 (optimizer state and gradients partitioned over the ranks) in bf16, as on GPUs."""
    out = tmp_path / "z2"
    run_torchrun(*train_args(tiny_shards, tiny_graphs, out, "micon", 12, "micro_batch=6", "optim.lr=5e-3",
                             "optim.warmup_steps=2", "ckpt_every=100", "wandb.enabled=false",
                             "engine.zero_stage=2", "engine.precision=bf16"))
    final = json.loads((out / "final.json").read_text())
    assert (final["precision"], final["zero_stage"], final["world_size"], final["step"]) == ("bf16", 2, 2, 12)
    loss = np.array([r["loss/loss"] for r in metrics(out)])
    assert np.isfinite(loss).all() and loss[-4:].mean() < loss[:4].mean(), loss.round(3)
    tag = out / "checkpoints" / "step00000012"
    # one optimizer partition per rank: the state really is sharded
    parts = sorted(p.name for p in tag.glob("*zero_pp_rank_*_optim_states.pt"))
    assert len(parts) == 2 and parts[0].startswith("bf16_zero_pp_rank_0"), parts
    from micon.checkpoint import load_checkpoint
    ck = load_checkpoint(out)
    assert ck.record.method == "micon" and all(v.dtype == torch.float32 for v in ck.weights.values())

