"""Slurm launch (cluster/) proven on a real Slurm: a one-node slurmctld + slurmd + munged on localhost
(tests/slurm_cluster.py), the featurisation job as Ray on Slurm, DeepSpeed training as 2 srun tasks,
USR1 -> checkpoint -> requeue -> resume; plus the rendered scripts of a 4-node x 8-GPU job checked
line by line, and secrets kept out of scripts and logs."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from cluster import submit
from tests.conftest import job_env
from tests.slurm_cluster import FINAL, PARTITION_2, SlurmCluster, SlurmUnavailable, read_log, start_cluster

REPO = Path(__file__).resolve().parents[1]
HAVE_TRAIN = (REPO / "train" / "run.py").exists()
STEPS_USR1 = 12  # long enough that USR1 arrives mid-run, short enough to finish soon after the resume
pytestmark = pytest.mark.slow

SECRET = "wandb-test-key-0123456789abcdef0123456789"


def dry_run(*argv: str, env: dict | None = None) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "cluster.submit", "--dry-run", *argv], cwd=REPO,
                          env=job_env(**(env or {})), capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


# --------------------------------------------------------------------------- rendering, no cluster needed

def test_site_yaml_documents_every_key_and_loads():
    site = submit.load_site()
    raw = yaml.safe_load(submit.DEFAULT_SITE.read_text())
    top = {f for f in submit.Site.__dataclass_fields__}
    assert set(raw) == top, "cluster/site.yaml and submit.Site must name the same keys"
    assert set(raw["ray"]) == set(submit.RaySettings.__dataclass_fields__)
    assert site.jobs.train.gpus_per_node == 8 and site.jobs.featurize.gpus_per_node == 0
    assert site.log_dir == "runs/slurm" and site.partition is None


def test_site_file_merges_over_defaults_and_errors_name_the_key(tmp_path):
    mine = tmp_path / "site.yaml"
    mine.write_text("partition: gpu\njobs:\n  train: {time: '48:00:00'}\nmodules: [cuda/12.4]\n")
    site = submit.load_site(mine)
    assert (site.partition, site.jobs.train.time, site.jobs.train.gpus_per_node) == ("gpu", "48:00:00", 8)
    mine.write_text("partiton: gpu\n")
    with pytest.raises(submit.ConfigError, match=r"site\.yaml: unknown key partiton \(did you mean partition\?\)"):
        submit.load_site(mine)


def test_dry_run_4_nodes_8_gpus(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("partition: gpu\naccount: jump\nmodules: [cuda/12.4]\nsetup: ['export NCCL_DEBUG=WARN']\n")
    rc, script, err = dry_run("train", "train/configs/tiny.yaml", "--nodes", "4", "--gpus-per-node", "8",
                              "--time", "04:00:00", "--site", str(site), "--", "steps=1000", "out=runs/x")
    assert rc == 0, err
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?$", script, re.M))
    assert sbatch["nodes"] == "4" and sbatch["ntasks-per-node"] == "8" and sbatch["gpus-per-node"] == "8"
    assert sbatch["time"] == "04:00:00" and sbatch["partition"] == "gpu" and sbatch["account"] == "jump"
    assert re.fullmatch(r"USR1@\d+", sbatch["signal"]) and "requeue" in sbatch
    assert sbatch["open-mode"] == "append"  # the requeued run's log follows the first one's
    assert "32 tasks" in err
    srun = re.search(r"^srun (.*?)-m train\.run (.*)$", script.replace("\\\n", " "), re.M)
    assert srun, script
    assert "--ntasks=32" in srun.group(1) and "--ntasks-per-node=8" in srun.group(1)
    assert srun.group(2).split() == [str(REPO / "train/configs/tiny.yaml"), "steps=1000", f"out={REPO / 'runs/x'}",
                                     "resume=latest"]
    assert "deepspeed " not in script and "torchrun" not in script  # plain srun, our own rank mapping
    assert 'first_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in script
    assert 'export MASTER_ADDR="${node_addr:-$first_node}"' in script   # Slurm's NodeAddr of it, else its name
    assert "export MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))" in script
    assert 'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"' in script
    assert "module load cuda/12.4\nexport NCCL_DEBUG=WARN" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and "$rc -eq 75" in script
    assert f"cd {REPO}" in script


def test_rank_mapping_of_32_tasks_is_done_by_micon_distributed():
    from micon.distributed import slurm_rank_env

    job_id = 123456
    seen = []
    for node in range(4):
        for local in range(8):
            env = dict(SLURM_PROCID=str(node * 8 + local), SLURM_NTASKS="32", SLURM_LOCALID=str(local),
                       SLURM_JOB_ID=str(job_id), MASTER_ADDR="gpu001", MASTER_PORT=str(10000 + job_id % 20000))
            mapped = slurm_rank_env(env)
            assert mapped["WORLD_SIZE"] == "32" and mapped["LOCAL_RANK"] == str(local)
            assert mapped["MASTER_PORT"] == "13456"
            seen.append(int(mapped["RANK"]))
    assert sorted(seen) == list(range(32))


def test_cpu_training_needs_explicit_tasks_and_ray_jobs_take_one_task_per_node():
    rc, script, err = dry_run("train", "-", "--gpus-per-node", "0", "--ntasks-per-node", "2", "--nodes", "1")
    assert rc == 0, err
    assert "#SBATCH --ntasks-per-node=2" in script and "gpus-per-node" not in script
    rc, _, err = dry_run("train", "-", "--gpus-per-node", "8", "--ntasks-per-node", "4")
    assert rc == 2 and "one task per GPU" in err
    rc, _, err = dry_run("featurize", "a.csv", "out", "--ntasks-per-node", "4")
    assert rc == 2 and "one task per node" in err
    rc, _, err = dry_run("train", "--", "steps=3")
    assert rc == 2 and "train needs CONFIG" in err


def test_ray_script_head_workers_ports_and_teardown():
    rc, script, err = dry_run("embed", "ckpt", "shards", "emb", "--nodes", "3", "--gpus-per-node", "4",
                              "--cpus-per-task", "48")
    assert rc == 0, err
    assert "#SBATCH --nodes=3" in script and "#SBATCH --ntasks-per-node=1" in script
    assert "#SBATCH --gpus-per-node=4" in script and "#SBATCH --cpus-per-task=48" in script
    flat = script.replace("\\\n", " ")
    head = re.search(r'^ *"\$\{RAY\[@\]\}" start --head (.*)$', flat, re.M).group(1)
    assert '--node-ip-address="$head_ip"' in head and '--port="$base"' in head
    assert '--dashboard-host="$head_ip"' in head and "0.0.0.0" not in script
    assert "--num-gpus=4" in script
    assert "base=$((40000 + (SLURM_JOB_ID % 20) * 1000))" in script
    for opt in ("node-manager-port", "object-manager-port", "min-worker-port", "max-worker-port",
                "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                "metrics-export-port"):
        assert f"--{opt}=$((base + " in script, opt
    workers = re.search(r"^ *srun (.*start --block.*)$", flat, re.M).group(1)
    assert '--exclude="$head_node"' in workers and '--address="$RAY_ADDRESS"' in workers
    assert "--nodes=$((SLURM_JOB_NUM_NODES - 1))" in workers and "--gpus-per-node=4" in workers
    assert "trap teardown EXIT" in script and "ray stop" not in script.replace("never `ray stop`", "")
    cleanup = re.search(r"^ *srun (.*)$", flat, re.M).group(1)  # in teardown: each worker node's temp dir
    assert cleanup.endswith('--exclude="$head_node" rm -rf "$ray_tmp"'), cleanup
    assert re.search(r"-m evaluate\.embed \S+/ckpt \S+/shards \S+/emb &$", flat, re.M)
    # a start that exits before its nodes are up is started again (3 attempts), not waited out
    assert "bring_up head start_head 1 || exit 1" in script
    assert 'bring_up workers start_workers "$SLURM_JOB_NUM_NODES" || exit 1' in script
    assert '--pid "${pids[-1]}"' in script and "for attempt in 1 2 3" in script


def test_secrets_never_reach_the_script(tmp_path):
    env = dict(WANDB_API_KEY=SECRET, WANDB_PROJECT="micon-tests", WANDB_MODE="online")
    rc, script, err = dry_run("train", "-", "--gpus-per-node", "0", "--ntasks-per-node", "2", env=env)
    assert rc == 0, err
    assert SECRET not in script and SECRET not in err
    assert "micon-tests" not in script  # wandb settings pass through the environment, not the script
    rc, script, err = dry_run("train", "-", "--", f"wandb.key={SECRET}", env=env)
    assert rc == 2 and "WANDB_API_KEY" in err and SECRET not in script + err
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"setup": [f"export WANDB_API_KEY={SECRET}"]}))
    rc, script, err = dry_run("featurize", "a.csv", "out", "--site", str(site), env=env)
    assert rc == 2 and "WANDB_API_KEY" in err and SECRET not in script + err


# --------------------------------------------------------------------------- on a real Slurm

@pytest.fixture(scope="module")
def slurm():
    try:
        cluster = start_cluster()
    except SlurmUnavailable as e:
        pytest.skip(f"no Slurm test cluster: {e}")
    if cluster.second_node_problem:
        warnings.warn(f"Slurm test cluster has one node: {cluster.second_node_problem}")
    yield cluster
    cluster.stop()
    if not os.environ.get("MICON_KEEP_SLURM"):
        shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="module")
def site(slurm, tmp_path_factory) -> Path:
    """Site settings for the test cluster: this interpreter, logs under a temporary directory, a small
    Ray object store, Ray ports and temp dir of this session only (other sessions may run beside it)."""
    d = tmp_path_factory.mktemp("slurm-site")
    ray_tmp = Path(tempfile.mkdtemp(prefix="mr-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    path = d / "site.yaml"
    path.write_text(yaml.safe_dump({
        "python": sys.executable, "log_dir": str(d / "logs"), "signal_seconds": 60,
        # below Linux's ephemeral range (32768-60999): a port another test's Ray or client picked at random
        # once took this block's ray_client_server port, and the head went down with it
        "ray": {"start_args": "--object-store-memory=100000000", "port_first": 20000 + os.getpid() % 12 * 1000,
                "port_blocks": 1, "tmp_dir": str(ray_tmp)},
    }))
    yield path
    shutil.rmtree(ray_tmp, ignore_errors=True)


def site_ray_tmp(site: Path) -> Path:
    return Path(yaml.safe_load(site.read_text())["ray"]["tmp_dir"])


@pytest.fixture(scope="module")
def train_data(request) -> tuple[Path, Path]:
    """conftest's tiny shards and graphs (skip while the training job or those fixtures are missing)."""
    if not HAVE_TRAIN:
        pytest.skip("train/run.py has not landed yet")
    try:
        return request.getfixturevalue("tiny_shards"), request.getfixturevalue("tiny_graphs")
    except pytest.FixtureLookupError:
        pytest.skip("tests/conftest.py has no tiny_shards / tiny_graphs fixtures yet")


def train_args(data: tuple[Path, Path], out: Path, steps: int, *extra: str) -> list[str]:
    shards, graphs = data
    return [f"data.shards={shards}", f"data.graphs={graphs}", f"out={out}", "method=micon", f"steps={steps}",
            "micro_batch=4", "progress=false", "optim.lr=2e-3", *extra]


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def assert_trained(out: Path, steps: int, log: str) -> None:
    final = json.loads((out / "final.json").read_text())
    assert final["step"] == steps and final["samples_seen"] == steps * 4 * 2, final
    assert (out / "checkpoints" / "latest").read_text().strip() == Path(final["checkpoint"]).name
    assert [m["step"] for m in metrics(out)][-1] == steps
    assert "training micon on 2 process(es) via slurm" in log, log[-3000:]
    # wandb settings came from the environment (offline here); the API key went nowhere
    assert list(out.glob("wandb/offline-run-*")), sorted(p.name for p in out.iterdir())
    for path in [p for p in out.rglob("*") if p.is_file()]:
        assert SECRET.encode() not in path.read_bytes(), f"WANDB_API_KEY written into {path}"
    assert SECRET not in log


def submit_job(slurm: SlurmCluster, *argv: str, env: dict | None = None, launcher: bool = False) -> str:
    """Submit as a user would; returns the job id printed by cluster.submit."""
    full_env = {**job_env(**(env or {})), "SLURM_CONF": str(slurm.conf)}
    cmd = ["./launch.sh", "slurm", *argv] if launcher else [sys.executable, "-m", "cluster.submit", *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    m = re.search(r"^submitted job (\d+) ", proc.stdout, re.M)
    assert m, proc.stdout
    assert re.search(rf"^  log: +\S+-{m.group(1)}\.out$", proc.stdout, re.M), proc.stdout
    return m.group(1)


def test_rendezvous_lines_under_real_scontrol(slurm, tmp_path):
    """The MASTER_ADDR/MASTER_PORT lines of the 4-node script, run by bash with Slurm's own scontrol: the first
    node's name where Slurm does not know it, its NodeAddr where it does (the test cluster's nodes)."""
    rc, script, err = dry_run("train", "-", "--nodes", "4", "--gpus-per-node", "8")
    assert rc == 0, err
    lines = "\n".join(l for l in script.splitlines() if l.startswith(("export MASTER_", "first_node=", "node_addr=")))
    for nodelist, addr in (("gpu[001-004]", "gpu001"), (",".join(n.name for n in slurm.nodes), slurm.nodes[0].addr)):
        env = dict(slurm.env, SLURM_JOB_NODELIST=nodelist, SLURM_JOB_ID="123456")
        out = subprocess.run(["bash", "-c", lines + '\necho "$MASTER_ADDR $MASTER_PORT"'], env=env,
                             capture_output=True, text=True, check=True).stdout
        assert out.split() == [addr, "13456"], (nodelist, out)


def test_featurize_as_ray_job_on_slurm(slurm, site, tiny_screen, tmp_path):
    """On two nodes where the test cluster has them (a Ray worker joins over srun from the second
    node's own network), else on one."""
    compounds = tiny_screen / "metadata" / "compound.csv.gz"
    out = tmp_path / "graphs"
    nodes = len(slurm.nodes)
    where = ["--nodes", str(nodes)] + (["--partition", PARTITION_2] if nodes > 1 else [])
    use_launcher = Path(sys.prefix).resolve() == (REPO / ".venv").resolve()  # launch.sh uses .venv
    job_id = submit_job(slurm, "featurize", str(compounds), str(out), *where, "--cpus-per-task", str(slurm.cpus),
                        "--time", "10:00", "--site", str(site), "--", "chunk_size=4",
                        env=dict(WANDB_API_KEY=SECRET), launcher=use_launcher)
    # while the cluster is up: the dashboard listens on the head node's address only
    running = slurm.wait(job_id, until=lambda j: f"{nodes} nodes up" in read_log(j) or j["JobState"] in FINAL,
                         timeout=240, poll=0.5)
    dashboard = re.search(r"Ray dashboard: http://(\S+):(\d+) ", read_log(running))
    assert dashboard, read_log(running)
    if shutil.which("ss") and running["JobState"] == "RUNNING":
        ss = subprocess.run(["ss", "-Hltn", f"sport = :{dashboard.group(2)}"], capture_output=True, text=True)
        listening = [line.split()[3] for line in ss.stdout.splitlines()]  # the local address column
        assert listening == [f"{dashboard.group(1)}:{dashboard.group(2)}"], ss.stdout
    job = slurm.wait(job_id, timeout=240)
    log = read_log(job)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log
    marker = json.loads((out / "featurize.json").read_text())
    n_compounds = len(pd.read_csv(compounds))
    assert marker["counts"]["compounds"] == n_compounds and marker["counts"]["ok"] > 0, marker
    assert (out / "graphs.zarr").is_dir() and (out / "index.parquet").is_file()

    head = re.search(r"Ray head on (\S+) \((\S+):(\d+)\)", log)
    assert head and head.group(1) == slurm.nodes[0].name and head.group(2) not in ("0.0.0.0", "127.0.0.1"), log
    assert re.search(rf"Ray dashboard: http://{re.escape(head.group(2))}:\d+ ", log), log
    up = re.findall(r"Ray cluster at \S+: (\d+) nodes up \((.*)\)", log)
    assert up and int(up[-1][0]) == nodes, log
    if nodes > 1:  # the worker registered from the second node's own address
        assert slurm.nodes[1].addr in up[-1][1].split(", "), log
    assert "data_prep.featurize exited 0" in log and "stopping the Ray cluster" in log
    # torn down on every node: no process of this job's Ray is left, and its temp dir is gone
    ray_tmp = site_ray_tmp(site) / f"ray-{job_id}"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(ray_tmp) not in ps and not ray_tmp.exists()
    script = site.parent / "logs" / f"micon-featurize-{job_id}.sbatch"
    assert script.is_file() and SECRET not in script.read_text()
    assert SECRET not in log


def submit_train(slurm, site, out: Path, args: list[str]) -> str:
    return submit_job(slurm, "train", "-", "--nodes", "1", "--gpus-per-node", "0", "--ntasks-per-node", "2",
                      "--cpus-per-task", "1", "--time", "15:00", "--site", str(site), "--", *args,
                      env=dict(WANDB_API_KEY=SECRET, WANDB_PROJECT="micon-slurm-test"))


def test_train_two_tasks_usr1_checkpoints_requeues_and_resumes(slurm, site, train_data, tmp_path):
    """Training as 2 srun tasks on the tiny shards; once it is under way Slurm's warning signal
    (`scancel --signal=USR1`, what `--signal=USR1@N` sends before the time limit) reaches the ranks:
    they checkpoint and exit 75, the script requeues the job, and the rerun resumes from that step
    and finishes with the same outputs a run without interruption has."""
    out = tmp_path / "run"
    steps = STEPS_USR1
    job_id = submit_train(slurm, site, out, train_args(train_data, out, steps, "ckpt_every=1000"))
    job = slurm.wait(job_id, until=lambda j: len(metrics(out)) >= 2 or j["JobState"] in FINAL, timeout=240, poll=0.1)
    assert job["JobState"] == "RUNNING", f"training ended before USR1 was sent (raise STEPS_USR1)\n{read_log(job)}"
    slurm.run("scancel", "--signal=USR1", job_id)  # to the job's steps (the ranks), not the batch shell
    job = slurm.wait(job_id, timeout=300)
    log = read_log(job)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "1", log
    assert f"job {job_id} (restart 0)" in log and "= 2 ranks" in log and "OMP_NUM_THREADS=1" in log
    saved = int(re.search(r"signal 10: checkpointed step (\d+)", log).group(1))
    assert 2 <= saved < steps, log
    assert "checkpointed (exit 75): requeueing job" in log and f"job {job_id} (restart 1)" in log
    assert re.search(rf"resumed from {re.escape(str(out))}/checkpoints/\S+ at step {saved} ", log), log
    assert [m["step"] for m in metrics(out)] == list(range(1, steps + 1))  # each step once: none lost or repeated
    assert_trained(out, steps=steps, log=log)


# --------------------------------------------------------------------------- the cpg0016 path (docs/DATA.md)

def guide_path_commands() -> list[str]:
    """The fenced block after `<!-- cpg0016-path -->` in docs/DATA.md (the README links it), one command per
    entry (continuations joined, comments and blank lines dropped)."""
    text = (REPO / "docs" / "DATA.md").read_text()
    block = text.split("<!-- cpg0016-path -->", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    joined = block.replace("\\\n", " ")
    return [line for line in (re.sub(r"\s+#.*$", "", raw).strip() for raw in joined.splitlines())
            if line and not line.startswith("#")]


def make_small(command: str, site: Path, cpus: int) -> str:
    """The guide's command with what only a real cluster and a real screen need made small: node shapes and
    time limits for the test cluster (one node, CPUs), the stored size, steps and batch (appended overrides win)."""
    command = command.replace("./launch.sh ", f"{sys.executable} -m micon.cli ", 1)
    command = re.sub(r"--time \S+", "--time 15:00", command)
    command = re.sub(r"--nodes \d+", "--nodes 1", command)
    if " slurm train " in command:
        command = command.replace("--gpus-per-node 8", "--gpus-per-node 0 --ntasks-per-node 1")
        command += " steps=2 micro_batch=2 data.num_workers=0 wandb.log_every=1 progress=false"
    command = command.replace("--gpus-per-node 8", "--gpus-per-node 0")
    command = command.replace("--wait", f"--wait --cpus-per-task {cpus} --site {site}")
    if " slurm embed " in command:
        command += " workers=1 batch_size=32"
    return command.replace("image_size=224", "image_size=64")


def test_reference_sources_and_featurisers_keep_their_kind_in_the_script(tmp_path):
    from micon.encoders import SOURCES

    assert set(submit.SOURCE_KINDS) == set(SOURCES)
    args = submit.absolute_args(["pretrained:resnet101:w/r101.safetensors", "pretrained:dinov2_vits14",
                                 "pretrained:resnet18:s3://b/w.pth", "untrained:runs/a", "cellprofiler", "shards"],
                                tmp_path)
    assert args == [f"pretrained:resnet101:{tmp_path}/w/r101.safetensors", "pretrained:dinov2_vits14",
                    "pretrained:resnet18:s3://b/w.pth", f"untrained:{tmp_path}/runs/a", "cellprofiler",
                    f"{tmp_path}/shards"]


def test_the_cpg0016_guide_runs_as_written(slurm, site, tiny_screen, tmp_path):
    """The cpg0016 guide's whole path (prep on Slurm -> featurize -> the official recipe trained on Slurm from a weights file
    -> embed the model and the reference rows on Slurm -> evaluate) on a synthetic screen in the cpg0016 layout."""
    from safetensors.torch import save_file

    from tests.test_pretrained import timm_weights

    commands = guide_path_commands()
    assert 8 <= len(commands) and len((REPO / "docs" / "DATA.md").read_text().split("<!-- cpg0016-path -->")[1]
                                      .split("```bash\n")[1].split("\n```")[0].splitlines()) <= 25
    weights = tmp_path / "resnet101.safetensors"
    save_file(timm_weights("resnet101"), weights)
    run = tmp_path / "jump"
    env = {**job_env(), "SLURM_CONF": str(slurm.conf), "MICON_SLURM_POLL_S": "1", "HF_HUB_OFFLINE": "1",
           "SRC": str(tiny_screen), "RUN": str(run), "W": str(weights)}
    assignments = [c for c in commands if re.fullmatch(r"(\w+=\S+\s*)+", c)]
    assert {a.split("=")[0] for c in assignments for a in c.split()} == {"SRC", "RUN", "W"}
    for command in commands:
        if command in assignments:    # the user's paths: the test's screen, run directory and weights file
            continue
        small = make_small(command, site, slurm.cpus)
        proc = subprocess.run(["bash", "-c", small], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{small}\nexited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        if " slurm " in command:
            assert re.search(r"ended COMPLETED \(exit 0:0\)", proc.stdout), proc.stdout
    final = json.loads((run / "official" / "final.json").read_text())
    assert final["step"] == 2
    metrics = json.loads((run / "eval" / "metrics.json").read_text())["methods"]
    assert set(metrics) == {"micon", "pretrained_resnet101", "cellprofiler"}
    assert all(0 <= m["nsb_top1"] <= 1 and m["n_wells"] > 0 for m in metrics.values())

# --------------------------------------------------------------------------- training across two nodes
# A 2-node job, one rank per node, submitted through the project's own path to the test cluster's `micon2`
# partition, whose second node runs in its own network namespace (tests/slurm_cluster.py). The ranks rendezvous
# across the two network stacks, train, checkpoint on Slurm's warning signal, are requeued and resume to the very
# weights of an uninterrupted 2-rank run. Here, beside the one-node tests, to share their cluster.
TWO_NODE_STEPS = 10

def final_weights_of(out: Path) -> tuple[dict, dict]:
    tag = (out / "checkpoints" / "latest").read_text().strip()
    ck = torch.load(out / "checkpoints" / tag / "model.pt", weights_only=False)
    return ck["model"], ck["state"]


@pytest.mark.slow
def test_two_nodes_rendezvous_across_network_stacks_preempted_and_resumed_exactly(slurm, site, train_data,
                                                                                    tmp_path):
    if len(slurm.nodes) < 2:
        pytest.skip(f"the test Slurm cluster has one node: {slurm.second_node_problem or 'no second node'}")
    args = train_args(train_data, tmp_path / "OUT", TWO_NODE_STEPS, "ckpt_every=1000", "data.num_workers=1",
                      "wandb.enabled=false")
    out = tmp_path / "slurm"
    t0 = time.time()
    job_id = submit_job(slurm, "train", "-", "--nodes", "2", "--partition", PARTITION_2, "--gpus-per-node", "0",
                        "--ntasks-per-node", "1", "--cpus-per-task", "1", "--time", "15:00", "--site", str(site),
                        "--", *[a.replace(str(tmp_path / "OUT"), str(out)) for a in args])
    job = slurm.wait(job_id, until=lambda j: len(metrics(out)) >= 2 or j["JobState"] in FINAL, timeout=240, poll=0.1)
    assert job["JobState"] == "RUNNING", f"training ended before USR1 was sent (raise TWO_NODE_STEPS)\n{read_log(job)}"
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
    assert 2 <= saved < TWO_NODE_STEPS, log
    assert "checkpointed (exit 75): requeueing job" in log and f"job {job_id} (restart 1)" in log
    assert re.search(rf"resumed from {re.escape(str(out))}/checkpoints/\S+ at step {saved} ", log), log
    assert [m["step"] for m in metrics(out)] == list(range(1, TWO_NODE_STEPS + 1))   # each step once

    # the same weights as the uninterrupted run
    w, state = final_weights_of(out)
    ref_w, ref_state = final_weights_of(ref)
    assert state["step"] == ref_state["step"] == TWO_NODE_STEPS and state["samples_seen"] == ref_state["samples_seen"]
    assert json.loads((out / "final.json").read_text())["counts"] == json.loads((ref / "final.json").read_text())["counts"]
    assert w.keys() == ref_w.keys()
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-5, atol=1e-6, msg=f"parameter {k} differs")
    print(f"2-node job {job_id}: USR1 at step {saved}, requeued, resumed, {TWO_NODE_STEPS} steps; "
          f"{len(ref_w)} tensors equal the 2-rank uninterrupted run's; {took:.0f} s in all")
