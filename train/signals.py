"""The stop signals a run may get before the Trainer exists (standard library only: installed first thing).

SIGTERM / SIGUSR1 arriving during start-up (imports, the process group, building the engine: seconds) would
otherwise kill the process with nothing written (exit 138 for USR1). `install_early` remembers them instead;
the Trainer's SignalFlag takes over and acts on the remembered one at its first step (checkpoint, exit 75).
"""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []


def _remember(signum, frame) -> None:
    _received.append(signum)


def install_early() -> None:
    for s in STOP_SIGNALS:
        signal.signal(s, _remember)


def take_early() -> int:
    """The last stop signal received before the Trainer's own handler (0: none); forgets it."""
    signum = _received[-1] if _received else 0
    _received.clear()
    return signum
