"""Wait until a Ray cluster at ADDRESS has N live nodes (used by cluster/templates/ray.sbatch).

    python -m cluster.ray_nodes --address HOST:PORT --nodes N [--timeout SECONDS] [--pid PID]

Exits 0 when the nodes are up, 1 with a message naming what is missing after the timeout, and 2 at once
when the process PID (the `ray start --block` that should bring the nodes up) has exited, so the job
script can start it again instead of waiting out the timeout for a node that is gone. It only connects,
counts and looks at PID; it never starts or stops anything.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def live_nodes(address: str) -> list[str]:
    """The addresses of the live nodes; raises at once (micon.raycluster.JobError) while nothing listens at
    `address` yet, since ray.init itself retries for minutes and would hide a start process that is gone."""
    import ray

    from micon.raycluster import check_reachable

    check_reachable(address, timeout_s=2.0)

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        return [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]
    finally:
        ray.shutdown()


def exited(pid: int) -> bool:
    """True when `pid` is gone or a zombie (exited, not yet reaped by the job script's shell)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.ray_nodes", description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--pid", type=int, default=0, help="the `ray start --block` process; exit 2 when it is gone")
    args = parser.parse_args(argv)
    deadline = time.time() + args.timeout
    nodes: list[str] = []
    problem = "no answer yet"
    while time.time() < deadline:
        if args.pid and exited(args.pid):
            print(f"[micon] the Ray start process {args.pid} exited before {args.nodes} node(s) were up at "
                  f"{args.address} ({problem})", file=sys.stderr, flush=True)
            return 2
        try:
            nodes = live_nodes(args.address)
            if len(nodes) >= args.nodes:
                print(f"[micon] Ray cluster at {args.address}: {len(nodes)} nodes up ({', '.join(sorted(nodes))})",
                      flush=True)
                return 0
            problem = f"{len(nodes)} of {args.nodes} nodes up ({', '.join(sorted(nodes))})"
        except Exception as e:  # the head is still starting: GCS not reachable yet
            problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        time.sleep(2)
    print(f"[micon] Ray cluster at {args.address} not ready after {args.timeout:.0f} s: {problem}. "
          f"Check the ray start lines above and the Ray logs under the job's --temp-dir.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
