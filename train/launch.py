"""`train --nproc N`: N ranks on this machine through torchrun, with training's exit codes kept.

torchrun reports any rank's non-zero exit as its own exit 1 with a FAILED summary. Here the ranks' own code is
the launcher's: 75 when the ranks checkpointed on a stop signal and exited for requeue (a rank that torchrun
stopped while the others were exiting counts with them), else the first failed rank's code (2 for a bad
configuration, 1 for a stopped run). `./launch.sh train --nproc N ...` runs it.
"""
from __future__ import annotations

import os
import signal
import sys

EXIT_REQUEUE = 75


def exit_code(codes: list[int]) -> int:
    """The launcher's exit code from the failed ranks' codes (negative: killed by that signal)."""
    stopped_by_launcher = {-signal.SIGTERM, -signal.SIGKILL, 128 + signal.SIGTERM}
    if EXIT_REQUEUE in codes and all(c == EXIT_REQUEUE or c in stopped_by_launcher for c in codes):
        return EXIT_REQUEUE
    first = next((c for c in codes if c not in stopped_by_launcher), codes[0] if codes else 1)
    return first if first > 0 else 128 - first


def main(argv: list[str]) -> int:
    if "--nproc" not in argv:
        from train.run import main as run_main
        return run_main(argv)
    i = argv.index("--nproc")
    try:
        nproc = int(argv[i + 1])
    except (IndexError, ValueError):
        print("train: --nproc needs a number of processes", file=sys.stderr)
        return 2
    rest = argv[:i] + argv[i + 2:]
    if nproc <= 1:
        from train.run import main as run_main
        return run_main(rest)
    from micon.distributed import launch_local

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    failed = launch_local("train.run", nproc, rest)
    if failed:
        codes = list(failed.values())
        code = exit_code(codes)
        if code == EXIT_REQUEUE:
            print(f"train: the {nproc} ranks checkpointed on a stop signal and exited {EXIT_REQUEUE} (rerun the same "
                  f"command to resume)", file=sys.stderr)
        else:
            print(f"train: rank(s) {sorted(failed)} exited {codes}; exiting {code} (their messages are above)",
                  file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
