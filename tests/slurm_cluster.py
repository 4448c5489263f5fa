"""A real Slurm cluster on this machine for the tests: munged, slurmctld and slurmd under a temporary
directory, with their own munge socket and ports, so nothing of the machine's own Slurm or munge (if
any) is touched. Partition `micon` is one node with this machine's CPUs. Where network namespaces
work (root, iproute2), partition `micon2` adds a second node: another slurmd in its own network
namespace behind a veth pair, so multi-node jobs (Ray head + srun workers) really run across two
network stacks; it is left out, and said why, where that fails.

Installs slurm-wlm and munge with apt-get when they are missing (root only). Stops exactly the
daemons it started, by pid, after cancelling the jobs still running; removes the namespace and veth.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SLURM_COMMANDS = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
PARTITION = "micon"      # one node
PARTITION_2 = "micon2"   # two nodes, where the second one could be made


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed and cannot be (no root or no apt-get); tests skip with this message."""


class SlurmStartError(RuntimeError):
    """Slurm is installed but the test cluster did not come up: a failure, with the daemons' logs."""


def _missing() -> list[str]:
    return [c for c in SLURM_COMMANDS if shutil.which(c) is None]


def ensure_installed(timeout: float = 600) -> None:
    """`apt-get install slurm-wlm munge` when a command is missing; a no-op when all are there."""
    if not _missing():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"Slurm commands {', '.join(_missing())} are missing and apt-get is not usable "
                               f"here (needs root and apt-get); install slurm-wlm and munge to run these tests")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:  # stale package lists on a fresh machine: refresh once, then retry
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=timeout)
        proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or _missing():
        raise SlurmUnavailable(f"apt-get install slurm-wlm munge failed (exit {proc.returncode}); "
                               f"still missing: {', '.join(_missing()) or 'none'}\n{proc.stderr[-1500:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_hardware() -> dict[str, str]:
    """What slurmd detects on this machine (CPUs, sockets, cores, threads, RealMemory)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0]))
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    return {k: fields[k] for k in keep if k in fields}


@dataclass
class Node:
    name: str
    addr: str
    netns: str | None = None  # the second node's network namespace


@dataclass
class SlurmCluster:
    """One controller, one or two nodes; `env` is what a Slurm client needs (SLURM_CONF)."""

    root: Path
    host: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    nodes: list[Node] = field(default_factory=list)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    # Job ids start at a random number: the training port derives from the job id, and two test
    # sessions on one machine must not both run a job 1.
    first_job_id: int = field(default_factory=lambda: random.randrange(1000, 900000))
    second_node_problem: str = ""
    _netns_made: list[tuple[str, str]] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge-socket" / "munge.socket.2"

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    @property
    def cpus(self) -> int:
        return int(self.hardware["CPUs"])

    # ------------------------------------------------------------------ bring-up

    def start(self, two_nodes: bool = True, timeout: float = 90) -> "SlurmCluster":
        ensure_installed()
        self.hardware = node_hardware()
        try:
            self._start_munge()
            self.nodes = [Node(self.host, "127.0.0.1")]
            if two_nodes:
                try:
                    host_addr, node_addr, netns = self._make_netns()
                    self.nodes = [Node(self.host, host_addr), Node(f"{self.host}-n2", node_addr, netns)]
                except (OSError, subprocess.SubprocessError) as e:
                    self.second_node_problem = f"no second node (network namespace set-up failed: {e})"
                    self._remove_netns()
            self._write_conf()
            log = self.root / "log"
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)], log / "slurmctld.stdout")
            for node in self.nodes:
                cmd = ["slurmd", "-D", "-f", str(self.conf), "-N", node.name]
                if node.netns:  # nsenter switches only the network (ip netns exec would remount /sys,
                    # hiding the cgroup file system slurmd needs); it execs slurmd, so the pid is slurmd's
                    cmd = ["nsenter", f"--net=/run/netns/{node.netns}", *cmd]
                self._spawn(f"slurmd-{node.name}", cmd, log / f"slurmd-{node.name}.stdout")
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _make_netns(self) -> tuple[str, str, str]:
        """A network namespace joined to this one by a veth pair on a free 10.x.y.0/30."""
        if shutil.which("ip") is None:
            raise OSError("iproute2's `ip` is not installed")
        used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
        while True:
            net = f"10.{random.randrange(64, 250)}.{random.randrange(0, 256)}"
            if f" {net}." not in used:
                break
        tag = f"{random.randrange(16 ** 6):06x}"
        netns, veth, peer = f"micon-slurm-{tag}", f"msl{tag}", f"msl{tag}p"
        host_addr, node_addr = f"{net}.1", f"{net}.2"
        self._netns_made.append((netns, veth))
        for cmd in (["ip", "netns", "add", netns],
                    ["ip", "link", "add", veth, "type", "veth", "peer", "name", peer],
                    ["ip", "link", "set", peer, "netns", netns],
                    ["ip", "addr", "add", f"{host_addr}/30", "dev", veth],
                    ["ip", "link", "set", veth, "up"],
                    ["ip", "-n", netns, "addr", "add", f"{node_addr}/30", "dev", peer],
                    ["ip", "-n", netns, "link", "set", peer, "up"],
                    ["ip", "-n", netns, "link", "set", "lo", "up"],
                    ["ip", "-n", netns, "route", "add", "default", "via", host_addr]):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise OSError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
        return host_addr, node_addr, netns

    def _remove_netns(self) -> None:
        for netns, veth in self._netns_made:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
            subprocess.run(["ip", "link", "del", veth], capture_output=True)
        self._netns_made.clear()

    def _spawn(self, name: str, cmd: list[str], log: Path, **kw) -> None:
        with open(log, "ab") as fh:
            self.procs[name] = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env,
                                                start_new_session=True, **kw)

    def _start_munge(self) -> None:
        """munged as user munge with its own key and a socket directory others can reach (mode 755)."""
        import pwd

        try:
            user = pwd.getpwnam("munge")
        except KeyError:
            raise SlurmStartError("the munge package is installed but there is no 'munge' user") from None
        state = self.root / "munge"
        sock_dir = self.munge_socket.parent
        for d, mode in ((state, 0o700), (sock_dir, 0o755)):
            d.mkdir(mode=mode)
            os.chown(d, user.pw_uid, user.pw_gid)
            d.chmod(mode)
        key = state / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chown(key, user.pw_uid, user.pw_gid)
        key.chmod(0o400)
        self._spawn("munged", ["munged", "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={state / 'munged.pid'}", f"--log-file={state / 'munged.log'}",
                               f"--seed-file={state / 'munged.seed'}"],
                    self.root / "log" / "munged.stdout", user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        deadline = time.time() + 20
        while time.time() < deadline:
            probe = subprocess.run(f"munge -n --socket={self.munge_socket} | unmunge --socket={self.munge_socket}",
                                   shell=True, capture_output=True, text=True)
            if probe.returncode == 0:
                return
            if self.procs["munged"].poll() is not None:
                break
            time.sleep(0.2)
        log = (state / "munged.log").read_text() if (state / "munged.log").exists() else ""
        raise SlurmStartError(f"munged did not come up:\n{log[-1500:]}")

    def _write_conf(self) -> None:
        r = self.root
        for d in ("etc", "state", *(f"spool/{n.name}" for n in self.nodes)):
            (r / d).mkdir(parents=True, exist_ok=True)
        hw = " ".join(f"{k}={v}" for k, v in self.hardware.items())
        nodes = "\n".join(f"NodeName={n.name} NodeAddr={n.addr} NodeHostname={n.name} {hw} State=UNKNOWN"
                          for n in self.nodes)
        partitions = f"PartitionName={PARTITION} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP"
        if len(self.nodes) > 1:
            partitions += (f"\nPartitionName={PARTITION_2} Nodes={','.join(n.name for n in self.nodes)} "
                           f"MaxTime=INFINITE State=UP")
        self.conf.write_text(f"""\
# written by tests/slurm_cluster.py: a test cluster on this machine
ClusterName=micontest
SlurmctldHost={self.host}({self.nodes[0].addr})
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={self.munge_socket},cred_expire=10
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
MinJobAge=3600
FirstJobId={self.first_job_id}
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=15
MessageTimeout=20
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
{nodes}
{partitions}
""")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmStartError(f"{name} exited with {p.returncode} during start-up:\n{self.logs()}")
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True)
            state = dict(line.split() for line in set(proc.stdout.strip().splitlines()))
            if proc.returncode == 0 and all(state.get(n.name) == "idle" for n in self.nodes):
                return
            time.sleep(0.5)
        raise SlurmStartError(f"nodes not idle after {timeout:.0f} s ({state}):\n{self.logs()}")

    # ------------------------------------------------------------------ use

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, until=lambda job: job["JobState"] in FINAL, timeout: float = 180,
             poll: float = 1.0) -> dict[str, str]:
        """Poll the job until `until(job)` holds; the assertion shows the job and its log."""
        deadline = time.time() + timeout
        job = self.job(job_id)
        while not until(job):
            if time.time() > deadline:
                raise AssertionError(f"job {job_id} still {job.get('JobState')} after {timeout:.0f} s: {job}\n"
                                     f"{read_log(job)}\n{self.logs()}")
            time.sleep(poll)
            job = self.job(job_id)
        return job

    # ------------------------------------------------------------------ teardown

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--partition", ",".join((PARTITION, PARTITION_2)), check=False)
            deadline = time.time() + 30
            while time.time() < deadline:
                q = self.run("squeue", "-h", "-o", "%i %T", check=False)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.5)
        for name in [*(f"slurmd-{n.name}" for n in self.nodes), "slurmctld", "munged"]:
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        self._remove_netns()


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def read_log(job: dict[str, str]) -> str:
    path = Path(job.get("StdOut", ""))
    return path.read_text(errors="replace") if path.is_file() else f"(no log at {path})"


def start_cluster(two_nodes: bool = True) -> SlurmCluster:
    """Install if needed (SlurmUnavailable where that cannot be done), then start a cluster
    (SlurmStartError if it does not come up). A second node that fails to come up is dropped,
    and `second_node_problem` says why."""
    ensure_installed()
    problem = ""
    if two_nodes:
        try:
            return SlurmCluster(new_root()).start(two_nodes=True)
        except SlurmStartError as e:
            problem = f"no second node (two-node start failed: {str(e)[:2000]})"
    cluster = SlurmCluster(new_root()).start(two_nodes=False)
    cluster.second_node_problem = problem
    return cluster


def new_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="micon-slurm-"))
    root.chmod(0o755)  # munged (user munge) must reach its socket directory below it
    (root / "log").mkdir()
    return root
