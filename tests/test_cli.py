"""The installed `micon` command runs the same jobs as ./launch.sh, from the one job table that launch.sh and
cluster/submit.py read; every job's --help lists its keys, defaults and meanings from its typed configuration."""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cluster import submit
from micon.cli import JOBS, main
from micon.config import config_keys
from micon.data.codecs import DEFAULT_CODEC
from micon.data.pipeline import Augment
from micon.synth import PRESETS
from tests.conftest import REPO, job_env

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
    assert set(JOBS) == {"synth", "prep", "rsets", "featurize", "train", "embed", "evaluate", "predict", "verify",
                         "slurm"}


# --------------------------------------------------------------------------- the one job table

def _config_class(job):
    module, name = job.config.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("name", [n for n, job in JOBS.items() if job.config])
def test_every_job_help_lists_each_key_with_its_default_and_meaning(name, capsys):
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    rows = config_keys(_config_class(JOBS[name]))
    assert rows and all(meaning for _, _, meaning in rows), [k for k, _, m in rows if not m]
    for key, default, meaning in rows:
        assert f"  {key}={default}" in out, key
        assert meaning in out, key


def test_help_comes_from_the_tables_themselves(capsys):
    assert main(["synth", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {preset} " in out for preset in PRESETS) and len(PRESETS) >= 7
    assert main(["prep", "SRC", "OUT", "--help"]) == 0          # --help anywhere
    assert f"  codec={DEFAULT_CODEC} " in capsys.readouterr().out
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "  model.preset=tiny " in out and "  data.augment.crop=0 " in out and "  optim.lr=0.001 " in out


def test_launch_sh_and_slurm_read_the_one_table(tmp_path):
    proc = subprocess.run([str(REPO / "launch.sh"), "help"], capture_output=True, text=True, env=job_env(),
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for cmd in [*JOBS, "setup", "demo", "test", "compare", "calibrate"]:
        assert re.search(rf"^  {cmd}\b", proc.stdout, re.M), cmd
    proc = subprocess.run([str(REPO / "launch.sh"), "trian"], capture_output=True, text=True, env=job_env(),
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "unknown command 'trian'" in proc.stderr
    proc = subprocess.run([str(REPO / "launch.sh"), "featurize", "--help"], capture_output=True, text=True,
                          env=job_env(), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and "  radius=2 " in proc.stdout, proc.stderr
    on_slurm = {n for n, job in JOBS.items() if job.slurm}
    assert set(submit.JOBS) == on_slurm and {"train", "prep", "rsets", "embed"} <= on_slurm
    assert all(submit.JOBS[n].module == JOBS[n].module for n in on_slurm)
    site = submit.load_site()
    assert all(getattr(site.jobs, n).cpus_per_task >= 1 for n in on_slurm)


@dataclass
class _Example:
    plain: int = 1                     # one line
    long: str = "x"                    # a meaning that goes on
                                       # over two lines
    items: list[str] = field(default_factory=lambda: ["a", "b"])  # a list
    nested: Augment = field(default_factory=lambda: Augment(crop=8))
    # a comment above a field is not its meaning
    bare: float = 0.5


def test_meanings_are_the_trailing_comments_and_nested_keys_are_dotted():
    rows = {k: (d, m) for k, d, m in config_keys(_Example)}
    assert rows["plain"] == ("1", "one line")
    assert rows["long"] == ("x", "a meaning that goes on over two lines")
    assert rows["items"] == ("a,b", "a list")
    assert rows["nested.crop"][0] == "8" and rows["nested.flip"] == ("true", "random horizontal and vertical flips")
    assert rows["bare"] == ("0.5", "")
