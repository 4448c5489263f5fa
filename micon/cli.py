"""The `micon` command: the same jobs as ./launch.sh, for an installed project.

    micon JOB [ARGS...]      micon --help      micon JOB --help

Each job is a module of the project (data_prep, train, evaluate, cluster) run in this process, so
`micon train ...` is `python -m train.run ...`; `micon train --nproc N ...` starts N processes through
torchrun. Environment set-up (the venv, the demo) stays with ./launch.sh.
"""
from __future__ import annotations

import importlib
import os
import shutil
import sys

# job -> (module with main(argv), one-line description): the jobs of launch.sh
JOBS = {
    "synth": ("data_prep.synth", "write a synthetic Cell Painting screen in the JUMP (cpg0016) layout"),
    "prep": ("data_prep.ingest", "JUMP layout -> WebDataset shards, DMSO control bank, replicate sets"),
    "rsets": ("data_prep.replicate_sets", "(re)build the replicate-set shards of a prep output"),
    "featurize": ("data_prep.featurize", "Ray job: RDKit molecular graphs + fingerprints -> zarr"),
    "train": ("train.run", "DeepSpeed training (method=micon|paclr|clip|simclr) [--nproc N]"),
    "embed": ("evaluate.embed", "Ray Data embedding of shards with a trained image encoder"),
    "evaluate": ("evaluate.run", "profiles, normalisation, NSB/NSS top-k, mAP, report"),
    "slurm": ("cluster.submit", "render and submit a job to Slurm"),
}


def usage() -> str:
    width = max(map(len, JOBS))
    lines = ["usage: micon JOB [ARGS...]   (micon JOB --help for a job's arguments)", "", "jobs:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in JOBS.items()]
    lines += ["", "The demo and the test suite: ./launch.sh demo, ./launch.sh test (in a checkout)."]
    return "\n".join(lines)


def _torchrun(nproc: int, args: list[str]) -> int:
    exe = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    argv = [exe, "--standalone", "--nproc-per-node", str(nproc), "-m", "train.run", *args]
    os.execv(exe, argv)
    return 127  # not reached


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    job, args = argv[0], argv[1:]
    if job not in JOBS:
        print(f"micon: unknown job {job!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if job == "train" and "--nproc" in args:
        i = args.index("--nproc")
        try:
            nproc = int(args[i + 1])
        except (IndexError, ValueError):
            print("micon: --nproc needs a number of processes", file=sys.stderr)
            return 2
        rest = args[:i] + args[i + 2:]
        if nproc > 1:
            return _torchrun(nproc, rest)
        args = rest
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    module = importlib.import_module(JOBS[job][0])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
