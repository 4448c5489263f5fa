"""Render a job's Slurm batch script from cluster/templates/ and submit it with sbatch.

    ./launch.sh slurm JOB [JOB ARGS ...] [--nodes N] [--gpus-per-node G] [--ntasks-per-node T]
                      [--cpus-per-task C] [--time T] [--mem M] [--partition P] [--account A]
                      [--job-name NAME] [--site SITE.yaml] [--dry-run] [--wait] [-- key=value ...]

JOB is train (DeepSpeed, one srun task per GPU) or a Ray job on Slurm: every job of the table in
micon/cli.py that names a batch script (prep, rsets, featurize, embed, evaluate).
JOB ARGS are the job's own positional arguments (train: CONFIG; featurize: COMPOUNDS OUT; prep:
SRC OUT; ...); everything after `--` is passed to the job as well. Site settings (partition,
account, modules, container, python) come from cluster/site.yaml merged with --site/MICON_SITE.
--dry-run prints the script; otherwise it is written to the log directory and submitted, and the
job id and log path are printed. This module only renders and calls sbatch: no job logic here.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Literal

import yaml

from micon.cli import JOBS as CLI_JOBS
from micon.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = Path(__file__).resolve().parent
DEFAULT_SITE = CLUSTER / "site.yaml"
TEMPLATES = CLUSTER / "templates"


@dataclass(frozen=True)
class JobSpec:
    template: str
    module: str
    positional: str  # what the job's positional arguments are, for help and errors


# The jobs that run on Slurm: those of the one job table (micon/cli.py) that name a batch script.
JOBS = {name: JobSpec(job.slurm, job.module, job.positional or "(key=value only)")
        for name, job in CLI_JOBS.items() if job.slurm}


# --------------------------------------------------------------------------- site settings

# What each value written into a batch script may look like. A value reaches `#SBATCH` lines or shell
# words, so a newline or a `;` would become a command of its own: every value is checked against its
# pattern (or shell-quoted), never pasted as given.
SLURM_PATTERNS = {
    "job_name": (r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}", "letters, digits and . _ + - (at most 128)"),
    "partition": (r"[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*", "a name (or names separated by commas) of letters, digits, . _ -"),
    "account": (r"[A-Za-z0-9._-]+", "letters, digits and . _ -"),
    "qos": (r"[A-Za-z0-9._-]+", "letters, digits and . _ -"),
    "mem": (r"\d+[KMGT]?", "a number with an optional unit K, M, G or T, e.g. 0 (all), 480G"),
    "time": (r"(\d+-)?\d+(:\d+){0,2}", "a Slurm time such as 30:00, 04:00:00 or 2-00:00:00"),
    "sbatch_args": (r"--?[A-Za-z][A-Za-z0-9-]*(=[^\s'\"`$;&|<>\\]+)?", "one option such as --exclusive or "
                    "--constraint=a100, with no spaces, quotes or shell characters"),
}
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_slurm_value(name: str, value) -> None:
    """Refuse a value that does not match its pattern (or holds a control character), naming the option."""
    if value is None:
        return
    text = str(value)
    if CONTROL.search(text):
        raise ConfigError(f"{name}={text!r}: holds a control character (newline, tab, ...); a batch script value "
                          f"must be one plain line")
    if name in SLURM_PATTERNS and not re.fullmatch(SLURM_PATTERNS[name][0], text):
        raise ConfigError(f"{name}={text!r}: use {SLURM_PATTERNS[name][1]}")


@dataclass
class JobResources:
    nodes: int = 1
    gpus_per_node: int = 0
    ntasks_per_node: int | None = None  # training: defaults to gpus_per_node (or 1); Ray jobs: always 1
    cpus_per_task: int = 8
    time: str = "24:00:00"
    mem: str | None = None

    def validate(self) -> None:
        for key in ("nodes", "cpus_per_task"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: must be at least 1")
        if self.gpus_per_node < 0:
            raise ConfigError(f"gpus_per_node={self.gpus_per_node}: must be 0 (CPU only) or more")
        if self.ntasks_per_node is not None and self.ntasks_per_node < 1:
            raise ConfigError(f"ntasks_per_node={self.ntasks_per_node}: must be at least 1")
        check_slurm_value("time", self.time)
        check_slurm_value("mem", self.mem)


# site.yaml `jobs:`: the resources of each Slurm job, one entry per job of the table
JobsTable = make_dataclass("JobsTable", [(name, JobResources, field(default_factory=JobResources)) for name in JOBS])


@dataclass
class RaySettings:
    node_ip_command: str = "hostname -I | awk '{print $1}'"
    port_first: int = 40000
    port_blocks: int = 20
    dashboard: bool = True
    tmp_dir: str = "/tmp"
    start_args: str = ""
    auth: Literal["token", "disabled"] = "token"

    def validate(self) -> None:
        last = self.port_first + self.port_blocks * 1000 - 1
        if self.port_first < 1024 or self.port_blocks < 1 or last > 65535:
            raise ConfigError(f"ray.port_first={self.port_first}, ray.port_blocks={self.port_blocks}: the port "
                              f"blocks must lie within 1024-65535 (they end at {last})")


@dataclass
class Site:
    """cluster/site.yaml; the file documents every key."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    log_dir: str = "runs/slurm"
    python: str = ".venv/bin/python"
    python_prefix: str = ""
    modules: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    sbatch_args: list[str] = field(default_factory=list)
    srun_args: list[str] = field(default_factory=list)
    signal_seconds: int = 300
    max_requeues: int = 50
    ray: RaySettings = field(default_factory=RaySettings)
    jobs: JobsTable = field(default_factory=JobsTable)

    def validate(self) -> None:
        if self.signal_seconds < 10:
            raise ConfigError(f"signal_seconds={self.signal_seconds}: give the job at least 10 s to checkpoint")
        for arg in self.sbatch_args + self.srun_args:
            if not arg.startswith("-"):
                raise ConfigError(f"sbatch_args/srun_args entry {arg!r}: write options such as --exclusive")
        for arg in self.sbatch_args:
            check_slurm_value("sbatch_args", arg)
        for name in ("partition", "account", "qos"):
            check_slurm_value(name, getattr(self, name))
        # shell words or lines by design (quoted where they are words), but always one line each
        for name, value in [("log_dir", self.log_dir), ("python", self.python), ("python_prefix", self.python_prefix),
                            ("ray.node_ip_command", self.ray.node_ip_command), ("ray.start_args", self.ray.start_args),
                            ("ray.tmp_dir", self.ray.tmp_dir), *[("modules", m) for m in self.modules],
                            *[("setup", line) for line in self.setup], *[("srun_args", a) for a in self.srun_args]]:
            check_slurm_value(name, value)


def load_site(path: str | Path | None = None) -> Site:
    """The shipped cluster/site.yaml, with the site file at `path` (or $MICON_SITE) merged over it."""
    defaults = yaml.safe_load(DEFAULT_SITE.read_text())
    path = path or os.environ.get("MICON_SITE") or None
    if path is not None and Path(path).resolve() == DEFAULT_SITE:
        path = None
    try:
        return load_config(Site, path, defaults=defaults)
    except ConfigError as e:
        raise ConfigError(f"site config {path or DEFAULT_SITE}: {e}") from None


# --------------------------------------------------------------------------- arguments

@dataclass
class Request:
    job: str
    args: list[str]
    nodes: int
    gpus_per_node: int
    ntasks_per_node: int
    cpus_per_task: int
    time: str
    mem: str | None
    partition: str | None
    account: str | None
    job_name: str

    @property
    def ntasks(self) -> int:
        return self.nodes * self.ntasks_per_node


# Keys whose values are paths: made absolute, because the job runs from the repository.
PATH_KEYS = {"out", "shards", "graphs", "dir", "path", "root", "ckpt", "checkpoint", "config", "embeddings",
             "compounds", "screen", "src", "weights", "export"}


# embed's reference sources, KIND:ARG (evaluate/embed.py SOURCES; tests/test_slurm.py keeps the two equal): the
# path inside is made absolute, the kind kept; pretrained:PRESET[:WEIGHTS] has its path after the preset
SOURCE_KINDS = ("untrained", "truth", "pretrained")


def _absolute(value: str, cwd: Path) -> str:
    if "://" in value or value in ("timm",) or value.startswith("timm:"):
        return value
    return str((cwd / Path(value).expanduser()).resolve())


def absolute_args(args: list[str], cwd: Path) -> list[str]:
    """Positional arguments (all paths for our jobs) and path-valued key=value made absolute; URLs
    (s3://bucket/prefix: data in object storage), a featuriser's name (embed's CKPT: cellprofiler) and the
    kind of a reference source (untrained:RUN, pretrained:PRESET:WEIGHTS) are left as they are."""
    from micon.eval.featurisers import FEATURISERS

    out = []
    for a in args:
        kind, _, rest = a.partition(":")
        if kind in SOURCE_KINDS and rest and "=" not in kind:
            if kind == "pretrained":
                preset, _, weights = rest.partition(":")
                a = f"{kind}:{preset}" + (f":{_absolute(weights, cwd)}" if weights else "")
            else:
                a = f"{kind}:{_absolute(rest, cwd)}"
        elif a in FEATURISERS and not (cwd / a).exists():
            pass
        elif "=" in a:
            key, value = a.split("=", 1)
            last = key.rsplit(".", 1)[-1]
            if value and "://" not in value and (last in PATH_KEYS or last.endswith(("_dir", "_path"))) and value not in ("latest", "none"):
                a = f"{key}={(cwd / Path(value).expanduser()).resolve()}"
        elif a != "-" and not a.startswith("-") and "://" not in a:
            a = str((cwd / Path(a).expanduser()).resolve())
        out.append(a)
    return out


def build_request(job: str, job_args: list[str], opts: argparse.Namespace, site: Site, cwd: Path) -> Request:
    if job not in JOBS:
        raise ConfigError(f"unknown job {job!r}; choose one of {', '.join(JOBS)}")
    res: JobResources = getattr(site.jobs, job)
    pick = lambda name: getattr(opts, name) if getattr(opts, name, None) is not None else getattr(res, name)
    nodes, gpus, cpus = pick("nodes"), pick("gpus_per_node"), pick("cpus_per_task")
    if job == "train":
        ntasks = pick("ntasks_per_node") or gpus or 1
        if gpus and ntasks != gpus:
            raise ConfigError(f"train runs one task per GPU: --ntasks-per-node {ntasks} with --gpus-per-node {gpus}; "
                              f"drop --ntasks-per-node (or use --gpus-per-node 0 for CPU tasks)")
    else:
        if getattr(opts, "ntasks_per_node", None) not in (None, 1):
            raise ConfigError(f"{job} is a Ray job with one task per node; use --cpus-per-task for its cores")
        ntasks = 1
    args = absolute_args(job_args, cwd)
    if job == "train":
        if not args or "=" in args[0]:
            raise ConfigError(f"train needs {JOBS['train'].positional} before any key=value, e.g. "
                              f"./launch.sh slurm train - -- out=runs/my-run data.shards=... data.graphs=...")
        keys = {a.split("=", 1)[0] for a in args if "=" in a}
        if "out" not in keys:
            args.append(f"out={REPO / 'runs' / 'train' / time.strftime('%Y%m%d-%H%M%S')}")
        if "resume" not in keys:
            args.append("resume=latest")  # a requeued or resubmitted job continues from its newest checkpoint
    req = Request(job=job, args=args, nodes=nodes, gpus_per_node=gpus, ntasks_per_node=ntasks, cpus_per_task=cpus,
                  time=pick("time"), mem=pick("mem"), partition=pick_site(opts, site, "partition"),
                  account=pick_site(opts, site, "account"), job_name=opts.job_name or f"micon-{job}")
    JobResources(nodes, gpus, ntasks, cpus, req.time, req.mem).validate()
    for name in ("job_name", "partition", "account"):
        check_slurm_value(name, getattr(req, name))
    for arg in req.args:   # shell-quoted in the script, but a newline would still split a log line
        check_slurm_value("job argument", arg)
    return req


def pick_site(opts, site: Site, name: str):
    value = getattr(opts, name, None)
    return value if value is not None else getattr(site, name)


# --------------------------------------------------------------------------- rendering

def repo_path(p: str) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else REPO / path


def python_command(site: Site) -> tuple[str, str]:
    """The python and ray commands as shell words (container prefix first)."""
    prefix = shlex.split(site.python_prefix)
    python = site.python if not ("/" in site.python) else str(repo_path(site.python))
    ray = str(Path(python).parent / "ray") if "/" in python else "ray"
    join = lambda words: " ".join(shlex.quote(w) for w in words)
    return join(prefix + [python]), join(prefix + [ray])


def setup_lines(site: Site) -> str:
    lines = [f"module load {shlex.quote(m)}" for m in site.modules] + list(site.setup)
    return "\n".join(lines) if lines else "# (no site set-up: add modules/setup lines in the site config)"


def sbatch_lines(req: Request, site: Site) -> str:
    opts = []
    if req.gpus_per_node:
        opts.append(f"--gpus-per-node={req.gpus_per_node}")
    for name in ("partition", "account"):
        if getattr(req, name):
            opts.append(f"--{name}={getattr(req, name)}")
    if site.qos:
        opts.append(f"--qos={site.qos}")
    if req.mem is not None:
        opts.append(f"--mem={req.mem}")
    opts += site.sbatch_args
    return "\n".join(f"#SBATCH {o}" for o in opts) if opts else "# (no partition/account/extra sbatch options set)"


def fill(template: str, values: dict[str, object]) -> str:
    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise KeyError(f"template placeholder {{{{{m.group(1)}}}}} has no value")
        return str(values[m.group(1)])
    return re.sub(r"\{\{(\w+)\}\}", sub, template)


def render(req: Request, site: Site) -> str:
    spec = JOBS[req.job]
    python, ray = python_command(site)
    srun = " ".join(shlex.quote(a) for a in site.srun_args)
    values = dict(
        job=req.job, job_name=req.job_name, module=spec.module, nodes=req.nodes, ntasks=req.ntasks,
        ntasks_per_node=req.ntasks_per_node, gpus_per_node=req.gpus_per_node, cpus_per_task=req.cpus_per_task,
        time=req.time, log_dir=shlex.quote(str(repo_path(site.log_dir))), repo=shlex.quote(str(REPO)),
        sbatch_site=sbatch_lines(req, site), setup=setup_lines(site), srun_site=srun + " " if srun else "",
        srun_gpus=f"--gpus-per-node={req.gpus_per_node} " if req.gpus_per_node else "",
        python=python, ray=ray, args=" ".join(shlex.quote(a) for a in req.args),
        signal_seconds=site.signal_seconds, max_requeues=site.max_requeues,
        node_ip_command=site.ray.node_ip_command, node_ip_command_quoted=shlex.quote(site.ray.node_ip_command),
        port_first=site.ray.port_first,
        port_blocks=site.ray.port_blocks, ray_tmp_dir=shlex.quote(site.ray.tmp_dir),
        ray_start_args=" ".join(shlex.quote(a) for a in shlex.split(site.ray.start_args)), ray_auth=site.ray.auth,
        ray_dashboard=('--include-dashboard=true --dashboard-host="$head_ip" --dashboard-port=$((base + 3))'
                       if site.ray.dashboard else "--include-dashboard=false"),
        ray_dashboard_note=('echo "[micon] Ray dashboard: http://$head_ip:$((base + 3)) (this node\'s address only;'
                            ' from your machine: ssh -L $((base + 3)):$head_ip:$((base + 3)) <login node>)"'
                            if site.ray.dashboard else "# (Ray dashboard disabled in the site config)"),
    )
    return fill((TEMPLATES / spec.template).read_text(), values)


SECRET_NAME = re.compile(r"API_KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY", re.I)


def check_no_secrets(text: str, environ: dict[str, str]) -> None:
    """Refuse a script that would carry the value of a secret-looking environment variable
    (WANDB_API_KEY, *_TOKEN, ...): jobs inherit those from the environment instead."""
    leaked = sorted(name for name, value in environ.items()
                    if SECRET_NAME.search(name) and len(value) >= 8 and value in text)
    if leaked:
        raise ConfigError(f"the rendered script would contain the value of {', '.join(leaked)}; remove it from the "
                          f"job arguments and site config (the job inherits it from your environment)")


# --------------------------------------------------------------------------- submission

def check_fits(req: Request, env: dict[str, str]) -> None:
    """Refuse a job no node of its partition can ever run (it would stay pending forever, e.g. the default
    --cpus-per-task on a small node): CPUs per node and the number of nodes, from sinfo. Best effort: without
    sinfo, or with output it cannot read, the job is submitted as asked."""
    if shutil.which("sinfo", path=env.get("PATH")) is None:
        return
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%P|%c"], capture_output=True, text=True, env=env,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return
    rows = [line.split("|") for line in proc.stdout.split() if line.count("|") == 2]
    if proc.returncode != 0 or not rows:
        return
    wanted = set(req.partition.split(",")) if req.partition else {p for _, p, _ in rows if p.endswith("*")}
    cpus: dict[str, int] = {}
    for node, part, count in rows:
        if part.rstrip("*") in {w.rstrip("*") for w in wanted} and count.isdigit():
            cpus[node] = max(cpus.get(node, 0), int(count))
    if not cpus:
        return
    where = f"partition {','.join(sorted(w.rstrip('*') for w in wanted))}"
    need = req.cpus_per_task * req.ntasks_per_node
    fitting = [n for n, c in cpus.items() if c >= need]
    if len(fitting) < req.nodes:
        most = max(cpus.values())
        fix = (f"pass --cpus-per-task {max(most // req.ntasks_per_node, 1)}" if most >= req.ntasks_per_node
               else f"pass --ntasks-per-node {most} --cpus-per-task 1")
        if len(cpus) < req.nodes:
            fix = f"pass --nodes {len(cpus)} (or another --partition)"
        raise ConfigError(f"{req.job} asks for {req.nodes} node(s) with {req.ntasks_per_node} task(s) x "
                          f"--cpus-per-task {req.cpus_per_task} = {need} CPUs each, but {where} has "
                          f"{len(fitting)} such node(s) ({len(cpus)} node(s), at most {most} CPUs each, says sinfo): "
                          f"the job would stay pending forever. {fix[0].upper() + fix[1:]}, or set "
                          f"jobs.{req.job}.cpus_per_task in the site config")


def sbatch(text: str, env: dict[str, str]) -> str:
    """Submit the script on stdin (Slurm keeps its own copy, which a requeued job runs again)."""
    if shutil.which("sbatch", path=env.get("PATH")) is None:
        raise ConfigError("sbatch is not on PATH: submit from a Slurm login node (or look with --dry-run)")
    proc = subprocess.run(["sbatch", "--parsable"], input=text, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise ConfigError(f"sbatch failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise ConfigError(f"sbatch --parsable printed {proc.stdout.strip()!r}, not a job id")
    return job_id


FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE")


def wait_for(job_id: str, env: dict[str, str], poll_s: float = 10.0) -> tuple[str, str]:
    """Poll `scontrol show job` until the job ends (a requeued job is followed through its restarts); returns
    (state, exit code). A job Slurm has already forgotten (MinJobAge) is looked up in sacct."""
    last = ""
    while True:
        proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, env=env)
        fields = dict(re.findall(r"(\w+)=(\S*)", proc.stdout)) if proc.returncode == 0 else {}
        state = fields.get("JobState", "")
        if not fields:
            acct = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State,ExitCode", "-j", job_id],
                                  capture_output=True, text=True, env=env)
            line = (acct.stdout.strip().splitlines() or ["UNKNOWN|?"])[-1]
            state, _, code = line.partition("|")
            return state.split()[0] if state else "UNKNOWN", code
        if state != last:
            print(f"  job {job_id}: {state}" + (f" (restart {fields.get('Restarts')})"
                                               if fields.get("Restarts", "0") != "0" else ""), flush=True)
            last = state
        if state in FINAL_STATES:
            return state, fields.get("ExitCode", "?")
        time.sleep(poll_s)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="./launch.sh slurm", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", choices=list(JOBS))
    p.add_argument("job_args", nargs="*", help="the job's positional arguments and key=value overrides")
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int, help="0 = CPU only (training then needs --ntasks-per-node)")
    p.add_argument("--ntasks-per-node", type=int, help="training on CPUs: processes per node")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--time", help="wall-clock limit, e.g. 04:00:00")
    p.add_argument("--mem", help="memory per node, e.g. 0 (all), 480G")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--job-name")
    p.add_argument("--site", help=f"site settings merged over {DEFAULT_SITE.relative_to(REPO)} (or $MICON_SITE)")
    p.add_argument("--dry-run", action="store_true", help="print the batch script; submit nothing")
    p.add_argument("--wait", action="store_true", help="return when the job ends (through requeues): exit 0 if "
                   "it COMPLETED, else 1; for scripts that run the next step after it")
    opts = p.parse_intermixed_args(argv)
    ours = {o for a in p._actions for o in a.option_strings if o.startswith("--")}
    misplaced = [a for a in extra if a.split("=", 1)[0] in ours]
    if misplaced:
        p.error(f"{' '.join(misplaced)} after `--` would go to the job; put options before `--`")
    return opts, opts.job_args + extra


def main(argv: list[str], environ: dict[str, str] | None = None, cwd: Path | None = None) -> int:
    environ = dict(os.environ if environ is None else environ)
    try:
        opts, job_args = parse_args(argv)
        site = load_site(opts.site)
        req = build_request(opts.job, job_args, opts, site, cwd or Path.cwd())
        text = render(req, site)
        check_no_secrets(text, environ)
        python = shlex.split(python_command(site)[0])[-1]
        if not site.python_prefix and "/" in python and not Path(python).exists():
            msg = (f"python {python} does not exist here; run ./launch.sh setup first, or set `python:` "
                   f"in the site config")
            if not opts.dry_run:
                raise ConfigError(msg)
            print(f"# warning: {msg}", file=sys.stderr)
    except ConfigError as e:
        print(f"slurm: {e}", file=sys.stderr)
        return 2
    if opts.dry_run:
        sys.stdout.write(text)
        print(f"# dry run: {req.job_name}, {req.nodes} nodes x {req.ntasks_per_node} tasks = {req.ntasks} tasks; "
              f"not submitted", file=sys.stderr)
        return 0

    try:
        check_fits(req, environ)
    except ConfigError as e:
        print(f"slurm: {e}", file=sys.stderr)
        return 2
    log_dir = repo_path(site.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output directory
    try:
        job_id = sbatch(text, environ)
    except ConfigError as e:
        print(f"slurm: {e}", file=sys.stderr)
        return 1
    script = log_dir / f"{req.job_name}-{job_id}.sbatch"
    script.write_text(text)
    log = log_dir / f"{req.job_name}-{job_id}.out"
    print(f"submitted job {job_id} ({req.job_name}): {req.nodes} nodes x {req.ntasks_per_node} tasks"
          f"{f' x {req.gpus_per_node} GPUs per node' if req.gpus_per_node else ''}, {req.cpus_per_task} CPUs per task")
    print(f"  script: {script}")
    print(f"  log:    {log}")
    print(f"  watch:  squeue -j {job_id}; tail -f {log}; cancel: scancel {job_id}")
    if req.job == "train":
        out = next(a.split("=", 1)[1] for a in req.args if a.startswith("out="))
        print(f"  out:    {out} (resubmit with -- out={out} to continue from its newest checkpoint)")
    if opts.wait:
        state, code = wait_for(job_id, environ, float(environ.get("MICON_SLURM_POLL_S", "10")))
        print(f"job {job_id} ended {state} (exit {code}); log: {log}", flush=True)
        return 0 if state == "COMPLETED" else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
