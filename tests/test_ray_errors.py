"""Ray task failures reach a person as one line naming the job, the unit and the cause (the traceback in
a log file), and an unreachable RAY_ADDRESS fails in seconds with one line, not minutes of retries."""
from __future__ import annotations

import errno
import socket
import time

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
    e = describe_failure("prep", "plate P1", KeyError("k"), blocker / "sub")    # the log cannot be written
    assert str(e) == "prep: plate P1 failed: KeyError: 'k'" and e.log is None


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
