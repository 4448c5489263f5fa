"""Wait until a Ray cluster at ADDRESS has N live nodes (used by cluster/templates/ray.sbatch).

    python -m cluster.ray_nodes --address HOST:PORT --nodes N [--timeout SECONDS]

Exits 0 when the nodes are up, 1 with a message naming what is missing after the timeout.
It only connects and counts; it never starts or stops anything.
"""
from __future__ import annotations

import argparse
import sys
import time


def live_nodes(address: str) -> list[str]:
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        return [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]
    finally:
        ray.shutdown()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.ray_nodes", description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args(argv)
    deadline = time.time() + args.timeout
    nodes: list[str] = []
    problem = "no answer yet"
    while time.time() < deadline:
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
