"""The installed `micon` command runs the same jobs as ./launch.sh."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from micon.cli import JOBS, main
from tests.conftest import job_env

MICON = str(Path(sys.executable).with_name("micon"))


def test_console_script_lists_the_jobs(tmp_path):
    proc = subprocess.run([MICON, "--help"], capture_output=True, text=True, env=job_env(), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for job in ("synth", "prep", "rsets", "featurize", "train", "embed", "evaluate", "slurm"):
        assert f"  {job} " in proc.stdout


def test_console_script_runs_a_job_from_anywhere(tmp_path):
    # outside the checkout: the jobs are part of the installed project
    proc = subprocess.run([MICON, "train", "--help"], capture_output=True, text=True, env=job_env(), cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Train MICON or a baseline with DeepSpeed" in proc.stdout


def test_unknown_job_and_bad_configuration(capsys):
    assert main(["trian"]) == 2
    assert "unknown job 'trian'" in capsys.readouterr().err
    assert main(["train", "-", "method=nope", "data.shards=x"]) == 2
    assert "method='nope': choose one of micon, paclr, clip, simclr" in capsys.readouterr().err
    assert set(JOBS) == {"synth", "prep", "rsets", "featurize", "train", "embed", "evaluate", "slurm"}
