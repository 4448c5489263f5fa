"""Issue 32, training's faults: each one ends with one clear line naming the cause and the fix, the right exit
code (75 checkpointed, requeue; 2 bad configuration; 1 stopped), and the finished work intact and resumable.

In-process runs use one rank (conftest's one_rank); the cases that need two ranks, a signal or Slurm run jobs
as a user would and are marked slow."""
from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path

import pytest

from micon.config import load_config
from tests.test_slurm import site, slurm, train_data   # the real Slurm test cluster's fixtures
from train.config import TrainConfig
from train.trainer import EXIT_OK, EXIT_STOPPED, train

SLURM_FIXTURES = (site, slurm, train_data)


def _cfg(shards, out, *extra):
    return load_config(TrainConfig, None, [f"data.shards={shards}", f"out={out}", "method=simclr", "micro_batch=4",
                                           "progress=false", "wandb.enabled=false", "optim.lr=1e-3",
                                           "optim.warmup_steps=2", "ckpt_every=10", *extra])


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _tags(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step*"))


@pytest.fixture(scope="module")
def trained_20(tiny_shards, tmp_path_factory):
    """A finished 20-step run with checkpoints at 10 and 20 (copied by each test that damages it)."""
    import os

    from micon.distributed import free_port

    out = tmp_path_factory.mktemp("faults") / "run20"
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert train(_cfg(tiny_shards, out, "steps=20")) == EXIT_OK
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return out


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# --------------------------------------------------------------------------- 2. metrics after a rerun

def test_a_rerun_after_a_kill_logs_each_step_once(tiny_shards, trained_20, tmp_path, one_rank, caplog):
    """A run killed at step 15 (its last checkpoint at 10, rows 1-15 logged) reruns from 10: metrics.jsonl holds
    each step once, the rows past the checkpoint rewritten by the rerun."""
    out = _copy(trained_20, tmp_path / "run")
    shutil.rmtree(out / "checkpoints" / "step00000020")
    (out / "checkpoints" / "latest").write_text("step00000010")
    rows = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(rows[:15]) + '\n{"step": 16, "loss/lo')   # cut mid-row by the kill
    (out / "final.json").unlink()
    with caplog.at_level(logging.INFO, logger="micon.train"):
        assert train(_cfg(tiny_shards, out, "steps=20")) == EXIT_OK
    assert _steps(out) == list(range(1, 21))
    assert "metrics.jsonl: dropped 6 row(s) logged after step 10" in caplog.text


# --------------------------------------------------------------------------- 3. a damaged newest checkpoint

def test_a_deleted_model_file_in_the_newest_checkpoint_falls_back_to_the_one_before(
        tiny_shards, trained_20, tmp_path, one_rank, caplog):
    out = _copy(trained_20, tmp_path / "run")
    (out / "checkpoints" / "step00000020" / "mp_rank_00_model_states.pt").unlink()
    with caplog.at_level(logging.INFO, logger="micon.train"):
        assert train(_cfg(tiny_shards, out, "steps=25")) == EXIT_OK
    assert ("checkpoint step00000020 is damaged (" in caplog.text and "mp_rank_00_model_states.pt is missing): "
            "resuming from step00000010, the newest whole one, instead" in caplog.text)
    assert "resumed from" in caplog.text and "at step 10 " in caplog.text
    assert _steps(out) == list(range(1, 26))
    assert json.loads((out / "final.json").read_text())["step"] == 25


def test_a_truncated_optimiser_state_named_is_refused_naming_the_whole_one_before(
        tiny_shards, trained_20, tmp_path, one_rank, capsys):
    out = _copy(trained_20, tmp_path / "run")
    optim = out / "checkpoints" / "step00000020" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])
    assert train(_cfg(tiny_shards, out, "steps=25", "resume=step00000020")) == EXIT_STOPPED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert (f"checkpoint {out}/checkpoints/step00000020 is damaged: {optim} is truncated or changed" in err[0]
            and "pass resume=step00000010 to resume from the newest whole one before it" in err[0]), err
    assert "resume=force" not in err[0]
    # the whole one resumes exactly where the message says
    assert train(_cfg(tiny_shards, out, "steps=25", "resume=step00000010")) == EXIT_OK
    assert _steps(out) == list(range(1, 26))


def test_a_damaged_checkpoint_without_a_file_list_names_the_file_not_a_traceback(
        tiny_shards, trained_20, tmp_path, one_rank, capsys):
    """A checkpoint written before tags listed their files: the loader's error becomes one line with the advice."""
    out = _copy(trained_20, tmp_path / "run")
    tag = out / "checkpoints" / "step00000020"
    (tag / "files.json").unlink()
    optim = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:1000])
    assert train(_cfg(tiny_shards, out, "steps=25")) == EXIT_STOPPED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"checkpoint {tag} could not be read (" in err[0], err
    assert "it is damaged: pass resume=step00000010" in err[0] and "resume=force" not in err[0], err


# --------------------------------------------------------------------------- 4. disk full while a checkpoint is written

def test_a_full_disk_while_checkpointing_names_enospc_and_keeps_the_previous_checkpoint(
        tiny_shards, trained_20, tmp_path, one_rank, capsys, monkeypatch):
    import deepspeed

    out = _copy(trained_20, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (out / "checkpoints" / "step00000020").iterdir()}
    real = deepspeed.DeepSpeedEngine.save_checkpoint

    def full(self, save_dir, tag=None, **kw):
        real(self, save_dir, tag=tag, **kw)     # the files start, then the disk fills
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(save_dir) / tag / "model.pt"))

    monkeypatch.setattr(deepspeed.DeepSpeedEngine, "save_checkpoint", full)
    assert train(_cfg(tiny_shards, out, "steps=30")) == EXIT_STOPPED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith(f"train: checkpoint step 30 could not be written: no space left on device writing "
                             f"{out}/checkpoints/.staging/step00000030/model.pt (")
    assert f"MB free on {out}/checkpoints); the previous checkpoint {out}/checkpoints/step00000020 is intact" in err[0]
    assert _tags(out) == ["step00000010", "step00000020"]          # the half-written one is gone
    assert not list((out / "checkpoints" / ".staging").glob("step*"))
    assert (out / "checkpoints" / "latest").read_text() == "step00000020"
    assert {p.name: p.read_bytes() for p in (out / "checkpoints" / "step00000020").iterdir()} == before
    monkeypatch.setattr(deepspeed.DeepSpeedEngine, "save_checkpoint", real)
    assert train(_cfg(tiny_shards, out, "steps=30")) == EXIT_OK      # space freed: it resumes from 20
    assert _steps(out) == list(range(1, 31))


# --------------------------------------------------------------------------- 1. two trainings into one out=

HOLD = ("import sys, time\nfrom micon.locks import run_lock\n"
        "with run_lock(sys.argv[1], job='train'):\n    print('held', flush=True)\n    time.sleep(120)\n")


def test_a_second_training_into_a_live_runs_out_is_refused_and_leaves_it_whole(
        tiny_shards, trained_20, tmp_path, one_rank, capsys):
    """Another live training holds out= (its lock, as train takes it): this one exits 2 in one line naming that
    run, before writing anything; the first run's checkpoints, config and metrics are untouched."""
    import os
    import subprocess
    import sys

    out = _copy(trained_20, tmp_path / "run")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    try:
        assert other.stdout.readline().strip() == "held"
        assert train(_cfg(tiny_shards, out, "steps=30", "seed=1")) == 2
    finally:
        other.kill()
        other.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"train: {out} is in use by another train run (pid {other.pid} on "
                                               f"host {os.uname().nodename}, started "), err
    assert "Wait for it to finish, stop it, or write to another output" in err[0]
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".micon-lock.json"}
    assert after == before
    # the holder gone (killed), the lock is taken over and the run resumes
    assert train(_cfg(tiny_shards, out, "steps=30")) == EXIT_OK
    assert _steps(out) == list(range(1, 31)) and not (out / ".micon-lock.json").exists()


# --------------------------------------------------------------------------- 10. a read-only out=

def test_resuming_into_a_read_only_out_is_refused_before_loading(tiny_shards, trained_20, tmp_path, one_rank,
                                                                   capsys):
    import subprocess

    out = _copy(trained_20, tmp_path / "run")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    made = subprocess.run(["mount", "--bind", "-o", "ro", str(out), str(out)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {made.stderr.strip()}")
    try:
        assert train(_cfg(tiny_shards, out, "steps=30")) == 2
    finally:
        subprocess.run(["umount", str(out)], check=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"train: out={out} cannot be written ({out}"), err
    assert "Read-only file system); nothing was changed in it. Make it writable" in err[0], err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# --------------------------------------------------------------------------- 5. another number of ranks

def _torchrun(*args: str, nproc: int = 2, timeout: float = 300):
    import subprocess
    import sys

    from tests.conftest import REPO, job_env

    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), "-m", "train.run", "-", *args], cwd=REPO, env=job_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=timeout)


def _args(shards, out, *extra):
    return [f"data.shards={shards}", f"out={out}", "method=simclr", "micro_batch=4", "progress=false",
            "wandb.enabled=false", "optim.lr=1e-3", "optim.warmup_steps=2", "ckpt_every=10", *extra]


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_one_rank_and_back_on_two(tiny_shards, tmp_path, one_rank, caplog):
    """ZeRO-1 optimizer state saved by 2 ranks continues on 1 (DeepSpeed's universal form, resharded): weights,
    AdamW moments and the schedule exactly as saved; and a 1-rank checkpoint continues on 2."""
    import torch

    from micon.checkpoint import load_checkpoint
    from train.trainer import Trainer

    out = tmp_path / "run"
    first = _torchrun(*_args(tiny_shards, out, "steps=10"))
    assert first.returncode == 0, first.stderr[-3000:]
    tag = out / "checkpoints" / "step00000010"
    parts = [torch.load(tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", weights_only=False)
             ["optimizer_state_dict"]["base_optimizer_state"]["state"][0] for r in (0, 1)]
    with caplog.at_level(logging.INFO, logger="micon.train"):
        trainer = Trainer(_cfg(tiny_shards, out, "steps=12")).setup()
        trainer.resume()
    assert f"{tag} was saved by 2 ranks, this run has 1: converting it to DeepSpeed's universal" in caplog.text
    assert trainer.state.step == 10 and trainer.engine.global_steps == 10
    assert trainer.scheduler.last_epoch == 10
    state = next(iter(trainer.engine.optimizer.optimizer.state.values()))
    for k in ("exp_avg", "exp_avg_sq"):
        merged = torch.cat([p[k] for p in parts])[: state[k].numel()]
        assert torch.equal(state[k], merged), k
    saved = load_checkpoint(tag).weights
    for k, v in trainer.engine.module.state_dict().items():
        assert torch.equal(v.float(), saved[k]), k
    code = trainer.fit()     # resumes (and converts) again, then trains
    assert trainer.finish(code) == EXIT_OK and trainer.state.step == 12
    assert not list((out / "checkpoints" / ".staging" / "universal").glob("step*"))   # the conversion is removed
    back = _torchrun(*_args(tiny_shards, out, "steps=14"))
    assert back.returncode == 0, back.stderr[-3000:]
    assert "step00000012 was saved by 1 ranks, this run has 2" in back.stderr
    assert json.loads((out / "final.json").read_text())["step"] == 14 and _steps(out) == list(range(1, 15))


# --------------------------------------------------------------------------- 6. a hung rank

@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGSTOP", "SIGKILL"])
def test_a_stopped_rank_ends_the_other_within_the_configured_timeout(tiny_shards, tmp_path, how):
    """Two gloo ranks with engine.dist_timeout_s=5; rank 1 is stopped (SIGSTOP) mid-run: rank 0 stops within the
    timeout and a margin (not torch's 30 min default that DeepSpeed's own groups had) with one line naming it;
    the checkpoint before is whole. Rank 1 killed (SIGKILL): one line, not a gloo traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from micon.distributed import free_port
    from tests.conftest import REPO, job_env

    out = tmp_path / "run"
    args = _args(tiny_shards, out, "steps=400", "ckpt_every=3", "engine.dist_timeout_s=5")
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, "-m", "train.run", "-", *args], cwd=REPO, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=job_env(OMP_NUM_THREADS="1", RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                          MASTER_ADDR="127.0.0.1", MASTER_PORT=port)) for r in (0, 1)]
    try:
        deadline = time.time() + 120
        while not ((out / "metrics.jsonl").is_file() and len(_steps(out)) >= 4) and time.time() < deadline:
            assert ranks[0].poll() is None, ranks[0].stderr.read()[-3000:]
            time.sleep(0.2)
        os.kill(ranks[1].pid, getattr(signal, how))
        t0 = time.time()
        _, err = ranks[0].communicate(timeout=60)
        waited = time.time() - t0
    finally:
        for p in ranks:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
    lines = [ln for ln in err.splitlines() if ln.startswith("train: ")]
    assert ranks[0].returncode == EXIT_STOPPED and len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("train: rank 0 at step ") and (
        "no answer from another rank within engine.dist_timeout_s=5" if how == "SIGSTOP" else
        "another rank's connection closed (that rank died or was killed)") in lines[0], lines
    assert waited < 5 * 3, waited            # the bound: about 3x the timeout
    print(f"rank 0 stopped {waited:.1f} s after rank 1 got {how}")
    from train.checkpoint import damage, find_latest
    tag = find_latest(out / "checkpoints")
    assert tag and damage(out / "checkpoints", tag) is None


# --------------------------------------------------------------------------- 7. TERM to a Slurm training job

@pytest.mark.slow
def test_scancel_full_term_checkpoints_requeues_and_resumes(slurm, site, train_data, tmp_path):
    """`scancel --full --signal=TERM` (the batch shell and the ranks, as a preemption sends it): the ranks
    checkpoint and exit 75, the batch script lives through the TERM, requeues the job, and the rerun resumes and
    finishes with each step once."""
    import re

    from tests.slurm_cluster import FINAL, read_log
    from tests.test_slurm import metrics, submit_train, train_args

    out = tmp_path / "run"
    steps = 12
    job_id = submit_train(slurm, site, out, train_args(train_data, out, steps, "ckpt_every=1000"))
    job = slurm.wait(job_id, until=lambda j: len(metrics(out)) >= 2 or j["JobState"] in FINAL, timeout=240, poll=0.1)
    assert job["JobState"] == "RUNNING", f"training ended before TERM was sent\n{read_log(job)}"
    slurm.run("scancel", "--full", "--signal=TERM", job_id)
    job = slurm.wait(job_id, timeout=300)
    log = read_log(job)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "1", log
    assert f"job {job_id} got SIGTERM: passing it to the ranks" in log
    saved = int(re.search(r"signal 15: checkpointed step (\d+)", log).group(1))
    assert "checkpointed (exit 75): requeueing job" in log and f"job {job_id} (restart 1)" in log
    assert re.search(rf"resumed from {re.escape(str(out))}/checkpoints/\S+ at step {saved} ", log), log
    assert [m["step"] for m in metrics(out)] == list(range(1, steps + 1))
    assert json.loads((out / "final.json").read_text())["step"] == steps


# --------------------------------------------------------------------------- 9. online wandb that cannot reach its server

SECRET = "0123456789abcdef0123456789abcdef01234567"


def test_online_wandb_without_a_server_falls_back_to_offline_within_seconds(
        tiny_shards, tmp_path, one_rank, monkeypatch, caplog, capfd):
    import time

    from micon.distributed import free_port

    port = free_port()      # nothing listens there
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    out = tmp_path / "run"
    t0 = time.time()
    with caplog.at_level(logging.INFO, logger="micon.train"):
        assert train(_cfg(tiny_shards, out, "steps=2", "wandb.enabled=true")) == EXIT_OK
    took = time.time() - t0
    assert (f"WANDB_MODE=online but the wandb server 127.0.0.1:{port} cannot be reached (Connection refused): "
            f"logging offline instead; upload the run later with `wandb sync {out}/wandb/offline-run-*`") in caplog.text
    assert list(out.glob("wandb/offline-run-*")) and _steps(out) == [1, 2]
    assert took < 40, took
    captured = capfd.readouterr()
    assert SECRET not in caplog.text + captured.out + captured.err
    for path in [p for p in out.rglob("*") if p.is_file()]:
        assert SECRET.encode() not in path.read_bytes(), path


def test_online_wandb_demanded_in_the_config_without_a_key_exits_2(tiny_shards, tmp_path, one_rank, monkeypatch,
                                                                     capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))       # no ~/.netrc: no wandb login
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert train(_cfg(tiny_shards, tmp_path / "run", "steps=2", "wandb.enabled=true", "wandb.mode=online")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["train: wandb.mode=online but no API key (WANDB_API_KEY unset and no wandb login for 127.0.0.1); "
                   "set WANDB_API_KEY (or wandb login) and check that the server is reachable from this node, or "
                   "drop wandb.mode to log offline"], err


# --------------------------------------------------------------------------- 8. stop signals: one rank, or too early

def _wait_for_rows(out: Path, n: int, proc, timeout: float = 300) -> None:
    import time

    deadline = time.time() + timeout
    while not ((out / "metrics.jsonl").is_file() and len(_steps(out)) >= n):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no metrics rows"
        time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_to_one_rank_of_nproc_2_checkpoints_and_the_launcher_exits_75(tiny_shards, tmp_path):
    import signal
    import subprocess

    import psutil

    from tests.conftest import REPO, job_env

    out = tmp_path / "run"
    launcher = subprocess.Popen(["./launch.sh", "train", "--nproc", "2", "-", *_args(tiny_shards, out, "steps=400",
                                                                                 "ckpt_every=1000")],
                                cwd=REPO, env=job_env(OMP_NUM_THREADS="1"), text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    try:
        _wait_for_rows(out, 2, launcher)
        ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "train.run" in " ".join(p.cmdline())]
        assert len(ranks) == 2, [p.cmdline() for p in ranks]
        ranks[1].send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 75, err[-3000:]
    assert "train: the 2 ranks checkpointed on a stop signal and exited 75 (rerun the same command to resume)" in err
    assert "FAILED" not in err
    from train.checkpoint import damage, find_latest
    tag = find_latest(out / "checkpoints")
    assert tag and damage(out / "checkpoints", tag) is None and int(tag[4:]) == _steps(out)[-1]


@pytest.mark.slow
def test_sigusr1_during_start_up_is_kept_and_the_run_checkpoints_at_its_first_step(tiny_shards, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO, job_env

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "train.run", "-", *_args(tiny_shards, out, "steps=50")], cwd=REPO,
                            env=job_env(OMP_NUM_THREADS="1"), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    time.sleep(1.0)        # importing torch and DeepSpeed: seconds before the Trainer exists
    assert proc.poll() is None
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "signal 10: checkpointed step 1 in " in err
    assert (out / "checkpoints" / "latest").read_text() == "step00000001"


# --------------------------------------------------------------------------- 11. a Slurm job no node can run

def test_a_slurm_job_asking_more_cpus_than_any_node_has_is_refused_before_sbatch(tmp_path, capsys):
    import os

    from cluster import submit

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sinfo").write_text("#!/bin/sh\nprintf 'vm|micon*|2\\nvm|micon2|2\\nvm-n2|micon2|2\\n'\n")
    (fake / "sbatch").write_text("#!/bin/sh\necho submitted >> \"$0.log\"; echo 42\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
    site = tmp_path / "site.yaml"
    site.write_text(f"log_dir: {tmp_path / 'logs'}\n")
    rc = submit.main(["featurize", "a.csv", "out", "--site", str(site)], environ=env, cwd=tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    default = submit.load_site().jobs.featurize.cpus_per_task     # the shipped default (cluster/site.yaml)
    assert err[0] == (f"slurm: featurize asks for 1 node(s) with 1 task(s) x --cpus-per-task {default} = {default} "
                      f"CPUs each, but "
                      "partition micon has 0 such node(s) (1 node(s), at most 2 CPUs each, says sinfo): the job would "
                      "stay pending forever. Pass --cpus-per-task 2, or set jobs.featurize.cpus_per_task in the site "
                      "config"), err
    assert not (fake / "sbatch.log").exists()
    rc = submit.main(["train", "-", "--nodes", "3", "--partition", "micon2", "--gpus-per-node", "0",
                      "--ntasks-per-node", "1", "--cpus-per-task", "1", "--site", str(site)], environ=env, cwd=tmp_path)
    assert rc == 2 and "Pass --nodes 2 (or another --partition)" in capsys.readouterr().err
    rc = submit.main(["featurize", "a.csv", "out", "--cpus-per-task", "2", "--site", str(site)], environ=env,
                     cwd=tmp_path)
    assert rc == 0 and (fake / "sbatch.log").read_text() == "submitted\n"


@pytest.mark.slow
def test_the_default_cpus_per_task_on_the_real_test_slurm_is_refused(slurm, site, tmp_path, capsys):
    from cluster import submit

    env = {**slurm.env}
    rc = submit.main(["featurize", "a.csv", "out", "--cpus-per-task", str(slurm.cpus + 10), "--site", str(site)],
                     environ=env, cwd=tmp_path)
    err = capsys.readouterr().err
    assert rc == 2 and "the job would stay pending forever. Pass --cpus-per-task" in err, err


def test_the_launchers_exit_code_is_the_ranks_own():
    from train.launch import exit_code

    assert exit_code([75, 75]) == 75
    assert exit_code([75, -15]) == 75            # torchrun stopped the second rank while it was exiting
    assert exit_code([2, 2]) == 2 and exit_code([-15, 1]) == 1
    assert exit_code([-9]) == 137                # a rank killed: as a shell reports it
