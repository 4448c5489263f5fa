"""Ray task failures reach a person as one line naming the job, the unit and the cause (the traceback in
a log file), and an unreachable RAY_ADDRESS fails in seconds with one line, not minutes of retries."""
from __future__ import annotations

import errno
import re
import socket
import time
from pathlib import Path

import pytest

from micon.raycluster import JobError, check_reachable, describe_failure, init_ray


def test_a_failed_ray_task_is_one_line_with_the_root_cause_and_a_log(tmp_path):
    def _disk_full(path):      # defined here so that Ray ships it by value to its worker
        raise OSError(errno.ENOSPC, "No space left on device", path)

    ray = init_ray(num_cpus=1)
    ref = ray.remote(max_retries=0)(_disk_full).remote("/data/out/parts/plate-0001.tar.npz")
    with pytest.raises(Exception) as err:
        ray.get(ref)
    assert len(str(err.value).splitlines()) > 2     # what a user saw before: Ray's whole wrapped report
    e = describe_failure("embed", "shard plate-0001.tar", err.value, tmp_path)
    msg = str(e)
    assert "\n" not in msg
    assert msg.startswith("embed: shard plate-0001.tar failed: OSError: [Errno 28] No space left on device")
    assert "the disk is full" in msg and f"traceback in {tmp_path / 'embed-errors.log'}" in msg
    log = (tmp_path / "embed-errors.log").read_text()
    assert "embed: shard plate-0001.tar" in log and "Traceback" in log and "_disk_full" in log


def test_a_plain_exception_and_an_unwritable_log_dir(tmp_path):
    e = describe_failure("featurize", "chunk part-00003", ValueError("bad\nsecond line"), tmp_path / "f" / "x")
    assert str(e).startswith("featurize: chunk part-00003 failed: ValueError: bad (traceback in")
    blocker = tmp_path / "file"
    blocker.write_text("")
    e = describe_failure("prep", "plate P1", KeyError("k"), blocker / "sub")    # the log cannot be written there
    assert str(e).startswith("prep: plate P1 failed: KeyError: 'k' (traceback in ") and e.log.parent.name == "micon-logs"


def test_an_unreachable_ray_address_fails_fast():
    with socket.socket() as s:           # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(JobError, match=rf"cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1:{port} "
                                        rf"\(.*refused.*\); start it .* or unset RAY_ADDRESS"):
        check_reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 30
    check_reachable("auto")               # nothing to check: Ray resolves it itself


@pytest.fixture()
def small_disk(tmp_path):
    """A 48 kB tmpfs: room for a few embedding parts, not for all (root only; skipped elsewhere)."""
    import subprocess

    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip()}): needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_disk_full_during_embed_is_one_line_and_a_rerun_finishes(tiny_shards, small_disk, tmp_path):
    import subprocess

    from tests.conftest import run_job

    out = small_disk / "emb"
    proc = run_job("evaluate.embed", "image_stats", tiny_shards, out, "workers=1", check=False)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("embed:")]
    assert any("failed: OSError: [Errno 28] No space left on device" in ln and "the disk is full" in ln
               and "traceback in" in ln for ln in lines), proc.stderr[-3000:]
    assert "UserCodeException" not in proc.stderr and "Traceback" not in proc.stderr
    kept = sorted(p.name for p in (out / "parts").glob("*.npz"))
    assert not any(".tmp" in name for name in kept)        # no half-written part left behind
    assert kept, "parts finished before the disk filled up are kept"
    log = Path(re.search(r"traceback in (\S+embed-errors\.log)", proc.stderr).group(1))
    assert log.parent.name in ("emb", "micon-logs")   # OUT, or the temp directory when OUT has no room left
    assert "No space left on device" in log.read_text()
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    rerun = run_job("evaluate.embed", "image_stats", tiny_shards, out, "workers=1")
    assert f"{len(kept)} already embedded" in rerun.stdout
    assert (out / "embed.json").is_file()


@pytest.mark.slow
def test_an_unreachable_ray_address_stops_a_job_with_one_line(tiny_screen, tmp_path):
    from tests.conftest import run_job

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_job("data_prep.featurize", tiny_screen / "metadata" / "compound.csv.gz", tmp_path / "g", check=False,
                   RAY_ADDRESS=f"127.0.0.1:{port}")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1:{port}")
    assert "Traceback" not in proc.stderr


def test_waiting_for_ray_nodes_stops_at_once_when_the_start_process_is_gone(capsys):
    """cluster.ray_nodes --pid: a `ray start` that exits before its nodes are up (Ray's start-up time missed
    on a busy node) is reported in seconds with exit 2, so the job script starts it again; with the process
    alive and nothing listening it waits out the timeout and exits 1."""
    import subprocess
    import time

    from cluster import ray_nodes

    gone = subprocess.Popen(["true"])
    gone.wait()
    t0 = time.monotonic()
    assert ray_nodes.main(["--address", "127.0.0.1:9", "--nodes", "1", "--timeout", "60", "--pid", str(gone.pid)]) == 2
    assert time.monotonic() - t0 < 30
    assert f"the Ray start process {gone.pid} exited before 1 node(s) were up" in capsys.readouterr().err
    zombie = subprocess.Popen(["true"])          # exited, not yet reaped: gone all the same
    time.sleep(0.5)
    assert ray_nodes.exited(zombie.pid)
    zombie.wait()
    alive = subprocess.Popen(["sleep", "30"])
    try:
        assert not ray_nodes.exited(alive.pid)
        assert ray_nodes.main(["--address", "127.0.0.1:9", "--nodes", "1", "--timeout", "3", "--pid", str(alive.pid)]) == 1
        assert "not ready after 3 s" in capsys.readouterr().err
    finally:
        alive.kill()
        alive.wait()
