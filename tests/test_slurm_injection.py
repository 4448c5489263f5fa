"""Batch scripts we generate are injection-safe: every hostile value of every option reaching a Slurm
script (command line or site file) is refused with one line naming the option, or shell-quoted; nothing
a value holds ever becomes a line of the script. Rendering only (no cluster, in-process)."""
from __future__ import annotations

import shlex

import pytest

from cluster import submit

HOSTILE = ["a\ntouch /tmp/pwned", "a\rtouch /tmp/pwned", "a;touch /tmp/pwned", "$(touch /tmp/pwned)",
           "`touch /tmp/pwned`", "a b", "a\x00b", "a|touch /tmp/pwned", "a&&touch /tmp/pwned", "'a'", "a\tb"]
OPTIONS = ["--job-name", "--partition", "--account", "--mem", "--time"]


def render(capsys, *argv, site=None) -> tuple[int, str, str]:
    rc = submit.main(["--dry-run", *(["--site", str(site)] if site else []), *argv], environ={})
    out, err = capsys.readouterr()
    return rc, out, err


def no_injected_line(script: str) -> None:
    for line in script.splitlines():
        assert not line.lstrip().startswith("touch"), line
        assert "\r" not in line and "\x00" not in line


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_command_line_values_are_refused(capsys, option, value):
    rc, script, err = render(capsys, "featurize", "c.csv", "out", option, value)
    assert rc == 2 and script == ""
    name = option[2:].replace("-", "_")
    assert err.startswith(f"slurm: {name}=") and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("key,value", [("partition", "gpu\ntouch /tmp/pwned"), ("account", "a;b"),
                                       ("qos", "$(id)"), ("sbatch_args", ["--exclusive\ntouch /tmp/pwned"]),
                                       ("sbatch_args", ["--comment=a;touch /tmp/pwned"]),
                                       ("modules", ["cuda\ntouch /tmp/pwned"]), ("setup", ["export A=1\rtouch x"]),
                                       ("srun_args", ["--mpi=pmix\ntouch /tmp/pwned"]),
                                       ("log_dir", "runs\ntouch /tmp/pwned"),
                                       ("python_prefix", "apptainer exec\ntouch /tmp/pwned"),
                                       ("ray", {"start_args": "--num-gpus=1\ntouch /tmp/pwned"}),
                                       ("ray", {"node_ip_command": "hostname -i\ntouch /tmp/pwned"}),
                                       ("ray", {"tmp_dir": "/tmp\ntouch /tmp/pwned"})])
def test_hostile_site_values_are_refused(capsys, tmp_path, key, value):
    import yaml

    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({key: value}))
    rc, script, err = render(capsys, "featurize", "c.csv", "out", site=site)
    assert rc == 2 and script == "" and len(err.strip().splitlines()) == 1, err
    assert "site config" in err


def test_shell_characters_in_job_arguments_stay_one_quoted_word(capsys, tmp_path):
    hostile = "out=/tmp/a;touch /tmp/pwned $(id) `id` 'q'"
    rc, script, err = render(capsys, "featurize", "c.csv", "outdir", "--", hostile)
    assert rc == 0, err
    no_injected_line(script)
    line = next(ln for ln in script.replace("\\\n", " ").splitlines() if "-m data_prep.featurize" in ln)
    words = shlex.split(line)
    assert any(w.endswith("a;touch /tmp/pwned $(id) `id` 'q'") for w in words)
    rc, script, err = render(capsys, "featurize", "c.csv", "outdir", "--", "out=/tmp/a\ntouch /tmp/pwned")
    assert rc == 2 and "job argument=" in err


def test_ray_start_args_are_quoted_words(capsys, tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("ray: {start_args: '--num-gpus=1 --system-config=$(id)'}\n")
    rc, script, err = render(capsys, "featurize", "c.csv", "out", site=site)
    assert rc == 0, err
    assert "--num-gpus=1 '--system-config=$(id)'" in script


@pytest.mark.parametrize("option,value", [("--job-name", "micon-train.v2"), ("--partition", "gpu,gpu-long"),
                                          ("--mem", "480G"), ("--mem", "0"), ("--time", "2-00:00:00"),
                                          ("--account", "jump_cp")])
def test_ordinary_values_still_render(capsys, option, value):
    rc, script, err = render(capsys, "featurize", "c.csv", "out", option, value)
    assert rc == 0, err
    assert f"={value}" in script
