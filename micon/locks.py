"""One writer per output: a lock on a job's output directory that names its holder (job, host, pid, start).

    with run_lock(out, job="prep"):      # LockHeld (a message for people) if another live run holds `out`
        ...

Local paths: an exclusive `fcntl.flock` on `OUT/.micon-lock.json`, which the kernel releases when the holder
dies however it dies, so a lock file left by a killed run is taken over (with a notice naming it). Re-entrant
within one process (a job that calls another job's entry point keeps its lock). Object storage (s3://...)
has no locks: there a lock object records the holder, and it is taken over when it names a dead process on
this host; one naming another host is refused with the command that removes it. Holds no data itself.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".micon-lock.json"
_held: dict[str, int] = {}       # lock path -> depth, for this process's own re-entry


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lock, as its file records it."""

    job: str = "?"
    host: str = "?"
    pid: int = 0
    start: float = 0.0          # Unix time the run took the lock
    argv: str = ""

    def describe(self) -> str:
        started = (time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.start)) if self.start
                   else "at an unknown time")
        age = f", {_age(time.time() - self.start)} ago" if self.start else ""
        return f"{self.job} run (pid {self.pid} on host {self.host}, started {started}{age})"

    def here(self) -> bool:
        return self.host == socket.gethostname()


class LockHeld(RuntimeError):
    """Another live run holds the output: the message names it, the lock file and what to do (exit code 2)."""

    def __init__(self, message: str, holder: Holder, lock: str):
        super().__init__(message)
        self.holder, self.lock = holder, lock


def _age(seconds: float) -> str:
    seconds = max(seconds, 0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _me(job: str) -> Holder:
    return Holder(job=job, host=socket.gethostname(), pid=os.getpid(), start=time.time(),
                  argv=" ".join(sys.argv[:1] + [a for a in sys.argv[1:] if "=" not in a])[:300])


def _parse(text: str) -> Holder | None:
    try:
        d = json.loads(text)
        return Holder(job=str(d.get("job", "?")), host=str(d.get("host", "?")), pid=int(d.get("pid", 0)),
                      start=float(d.get("start", 0.0)), argv=str(d.get("argv", "")))
    except (ValueError, TypeError, AttributeError):
        return None


def _encode(h: Holder) -> bytes:
    return (json.dumps({"job": h.job, "host": h.host, "pid": h.pid, "start": h.start, "argv": h.argv}) + "\n").encode()


def alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (one owned by another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _held_message(out, job: str, holder: Holder, lock: str, remove_hint: str = "") -> str:
    return (f"{job}: {out} is in use by another {holder.describe()}; two runs writing one output destroy each "
            f"other's work. Wait for it to finish, stop it, or write to another output"
            f"{remove_hint} (lock: {lock})")


def holder(out) -> Holder | None:
    """Who holds `out` now (None when nobody does): for messages and tests."""
    from micon import storage

    out = storage.path(out)
    if isinstance(out, Path):
        lock = out / LOCK_NAME
        if not lock.is_file():
            return None
        with open(lock, "rb") as fh:
            try:
                import fcntl
                fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
                return None         # nobody holds it: a leftover of a dead run
            except OSError:
                return _parse(fh.read().decode(errors="replace"))
    try:
        return _parse((out / LOCK_NAME).read_text())
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def run_lock(out, job: str = "run", *, notice=None) -> Iterator[Holder]:
    """Hold the lock on the output `out` (a local directory, made if missing, or an object-storage prefix)
    for the block; yields this run's Holder. Raises LockHeld when another live run holds it. A lock left by
    a dead run is taken over, and `notice` (default: print to stderr) gets one line saying so."""
    from micon import storage

    out = storage.path(out)
    say = notice or (lambda line: print(line, file=sys.stderr, flush=True))
    key = str(out / LOCK_NAME)
    if key in _held:                   # this process holds it already (a job calling another job)
        _held[key] += 1
        try:
            yield _parse(Path(key).read_text()) if isinstance(out, Path) else _me(job)
        finally:
            _held[key] -= 1
        return
    if isinstance(out, Path):
        cm = _local(out, job, say)
    else:
        cm = _object(out, job, say)
    with cm as me:
        _held[key] = 1
        try:
            yield me
        finally:
            del _held[key]


@contextlib.contextmanager
def _local(out: Path, job: str, say) -> Iterator[Holder]:
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_NAME
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            previous = _parse(os.pread(fd, 4096, 0).decode(errors="replace")) or Holder()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockHeld(_held_message(out, job, previous, str(lock)), previous, str(lock)) from None
            raise OSError(e.errno, f"cannot lock {lock} ({os.strerror(e.errno)}): this file system does not "
                                   f"support file locks; write the output to a local or NFS directory") from None
        # the file may have been removed by its previous holder between our open and our lock: lock the new one
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        previous = _parse(os.pread(fd, 4096, 0).decode(errors="replace"))
        if previous is not None:
            state = ("no longer running" if previous.here() and not alive(previous.pid) else "gone (its lock was free)")
            say(f"{job}: taking over the lock {lock} left by a {previous.describe()}, {state}; "
                f"its finished work is kept and the rest is redone")
        me = _me(job)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _encode(me), 0)
        yield me
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.unlink(lock)         # while still locked: a waiter that opened it sees another inode and retries
        os.close(fd)


@contextlib.contextmanager
def _object(out, job: str, say) -> Iterator[Holder]:
    """Best effort (object stores have no atomic test-and-set here): read, decide, write, read back."""
    from micon import storage

    lock = out / LOCK_NAME
    try:
        previous = _parse(lock.read_text()) or Holder()
    except FileNotFoundError:
        previous = None
    if previous is not None:
        if (previous.here() and not alive(previous.pid)) or previous.host == "?":
            say(f"{job}: taking over the lock object {lock} left by a {previous.describe()}, no longer running; "
                f"its finished work is kept and the rest is redone")
        else:
            hint = ("" if previous.here()
                    else f", or, if that run is no longer running, remove the lock: aws s3 rm {lock}")
            raise LockHeld(_held_message(out, job, previous, str(lock), hint), previous, str(lock))
    me = _me(job)
    fs, key = storage.filesystem(str(lock))
    storage.call(lambda: fs.pipe_file(key, _encode(me)), str(lock))
    if _parse(lock.read_text()) != me:        # another run wrote its own in between
        other = _parse(lock.read_text()) or Holder()
        raise LockHeld(_held_message(out, job, other, str(lock)), other, str(lock))
    try:
        yield me
    finally:
        with contextlib.suppress(Exception):
            if _parse(lock.read_text()) == me:
                lock.unlink(missing_ok=True)
