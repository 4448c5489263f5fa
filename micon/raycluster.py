"""One way for every job to get Ray: join the cluster at RAY_ADDRESS (started by
cluster/templates/ray.sbatch on Slurm) or start a private local one; and one way to tell a person why a
Ray task failed (one line naming the job, the unit and the cause; the traceback in a log file).
Jobs call it; the library never does."""
from __future__ import annotations

import datetime
import logging
import os
import traceback
from pathlib import Path


class JobError(RuntimeError):
    """A job's unit of work (a plate, a shard, a chunk) failed, or Ray could not be reached: one line for
    the person, the details in `log` when there is one."""

    def __init__(self, message: str, log: Path | None = None, cause: str = ""):
        super().__init__(message)
        self.log, self.cause = log, cause or message


class UnitFailed(RuntimeError):
    """Raised inside a Ray task or actor when one unit (a shard, a chunk) failed: the unit and the cause in
    one picklable line, so the driver can name both whatever Ray wraps around it."""

    def __init__(self, unit: str, cause: str, disk_full: bool = False):
        super().__init__(f"{unit}: {cause}")
        self.unit, self.cause, self.disk_full = unit, cause, disk_full

    @classmethod
    def of(cls, unit: str, exc: BaseException) -> "UnitFailed":
        text = (str(exc).strip().splitlines() or [""])[0]
        return cls(unit, f"{type(exc).__name__}: {text}" if text else type(exc).__name__, _is_disk_full(exc))

    def __reduce__(self):
        return UnitFailed, (self.unit, self.cause, self.disk_full)


def _is_disk_full(exc: BaseException) -> bool:
    return (isinstance(exc, OSError) and getattr(exc, "errno", None) == 28) or "No space left on device" in str(exc)


def root_cause(exc: BaseException) -> BaseException:
    """The user's own exception inside Ray's wrappers (RayTaskError, its `cause`, UserCodeException and
    chained `__cause__`s): what actually went wrong, e.g. `OSError: [Errno 28] No space left on device`."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None)
        if isinstance(inner, BaseException):
            exc = inner
            continue
        if type(exc).__module__.startswith("ray") or type(exc).__name__.startswith("RayTaskError"):
            if exc.__cause__ is not None:
                exc = exc.__cause__
                continue
        break
    return exc


def _cause_from_text(exc: BaseException) -> BaseException:
    """Ray Data hands back a UserCodeException whose chain holds the user's exception only as text (the remote
    traceback): find our UnitFailed line there, else the last plain `SomeError: message` line."""
    import re

    text = "".join(traceback.format_exception(exc)) + "\n" + str(exc) + "\n" + str(root_cause(exc))
    found = re.findall(r"^(?:\S+\.)?UnitFailed: ((?:shard|chunk|plate) [^:]+): (.+)$", text, re.M)
    if found:
        unit, cause = found[-1]
        return UnitFailed(unit, cause, "No space left on device" in cause)
    plain = [m for m in re.findall(r"^(\w*(?:Error|Exception)): (.+)$", text, re.M)
             if m[0] not in ("UserCodeException", "RayTaskError")]
    if plain:
        name, message = plain[-1]
        return UnitFailed("", f"{name}: {message}", "No space left on device" in message)
    return exc


def describe_failure(job: str, unit: str, exc: BaseException, log_dir: str | Path | None = None) -> JobError:
    """One line naming the job, the unit and the cause, with the whole traceback (Ray's remote one
    included) appended to `log_dir/{job}-errors.log` when a directory is given and writable."""
    cause = root_cause(exc)
    if type(cause).__module__.startswith("ray"):
        cause = _cause_from_text(exc)
    if isinstance(cause, UnitFailed):
        unit, what, disk_full = cause.unit or unit, cause.cause, cause.disk_full
    else:
        text = str(cause).strip().splitlines()
        what, disk_full = (f"{type(cause).__name__}: {text[0]}" if text else type(cause).__name__), _is_disk_full(cause)
    if disk_full:
        what += " (the disk is full: free space there, then rerun the same command; finished work is kept)"
    log = write_log(job, unit, exc, log_dir)
    where = f" (traceback in {log})" if log else ""
    return JobError(f"{job}: {unit} failed: {what}{where}", log, f"{what}{where}")


def write_log(job: str, unit: str, exc: BaseException, log_dir: str | Path | None) -> Path | None:
    """Append the whole report (Ray's remote traceback included) to `log_dir/{job}-errors.log`, or, when
    that cannot be written (its disk may be the full one), to the temp directory; None if neither works."""
    import tempfile

    for d in ([Path(log_dir)] if log_dir is not None else []) + [Path(tempfile.gettempdir()) / "micon-logs"]:
        log = d / f"{job}-errors.log"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as fh:
                fh.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')} {job}: {unit}\n")
                fh.write("".join(traceback.format_exception(exc)))
                fh.write(f"{exc}\n")
            return log
        except OSError:
            continue
    return None


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, with one line, when RAY_ADDRESS names a host:port nobody listens on (ray.init
    itself retries for minutes, then raises a bare ConnectionError)."""
    import socket

    hostport = address.split("://", 1)[-1]
    if hostport in ("auto", "local") or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as e:
        raise JobError(f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({e}); start it "
                       f"(cluster/templates/ray.sbatch does on Slurm) or unset RAY_ADDRESS to run on a private "
                       f"local Ray") from None


def init_ray(num_cpus: int = 0, object_store_mb: int = 256):
    """Return the `ray` module, initialised. Workers get the checkout on PYTHONPATH so task functions
    defined in the jobs (data_prep/, evaluate/) import on every node."""
    import ray

    if ray.is_initialized():
        return ray
    repo = str(Path(__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath}}
    if os.environ.get("RAY_ADDRESS"):
        check_reachable(os.environ["RAY_ADDRESS"])
        try:
            ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env, log_to_driver=False,
                     logging_level="WARNING")
        except (ConnectionError, TimeoutError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise JobError(f"cannot reach the Ray cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']} ({first}); "
                           f"start it (cluster/templates/ray.sbatch does on Slurm) or unset RAY_ADDRESS to run on a "
                           f"private local Ray") from None
    else:
        # A private local cluster keeps Ray's token authentication (its default now: anyone who reaches the
        # ports could otherwise run code); Ray says so in a WARNING at every start, which in every job's log
        # reads as a fault. It is the setting we want, so that logger is quieted here, for the private cluster
        # only (where Ray turns token auth on whenever RAY_AUTH_MODE is unset); RAY_AUTH_MODE=disabled, set
        # by the user, still wins.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # address="local": never attach to somebody else's cluster on a shared machine. Ray gives its node a
        # fixed start-up time; on a busy machine (a login node, a CI box running other jobs) it can miss it:
        # start again, twice, before giving up
        for attempt in range(3):
            try:
                ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                         object_store_memory=int(os.environ.get("MICON_RAY_OBJECT_STORE_MB", object_store_mb)) * 2**20,
                         runtime_env=runtime_env, log_to_driver=False, logging_level="WARNING")
                break
            except Exception as e:          # Ray raises a bare Exception for a node that missed its start-up
                if "timed out during startup" not in str(e) or attempt == 2:
                    raise
                logging.getLogger("micon.ray").warning("the local Ray node missed its start-up time (busy "
                                                       "machine?); starting it again (%d of 2)", attempt + 1)
                ray.shutdown()
    return ray
