"""The `micon` command and the one table of jobs that ./launch.sh and cluster/submit.py read.

    micon JOB [ARGS...]      micon --help      micon JOB --help      micon --jobs (names, one a line)

Each job is a module of the project (data_prep, train, evaluate, cluster) run in this process, so
`micon train ...` is `python -m train.run ...`; `micon train --nproc N ...` starts N processes through
torchrun. Environment set-up, the demo and the test suite stay with ./launch.sh. Standard library only:
./launch.sh reads the table before any environment exists.
"""
from __future__ import annotations

import importlib
import os
import shutil
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    module: str            # module with main(argv) -> exit code
    positional: str        # the job's positional arguments, before any key=value ("" = none)
    description: str       # one line
    nproc: bool = False    # `--nproc N` starts N processes on this machine through torchrun
    slurm: str = ""        # cluster/templates/ batch script when the job runs on Slurm ("" = not on Slurm)
    args: str = "[key=value ...]"  # what follows the positional arguments, for usage lines
    config: str = ""       # "module:Class" of its typed configuration (what --help lists; "" = options only)

    def usage(self, name: str) -> str:
        return " ".join(w for w in (name, self.positional, "[--nproc N]" if self.nproc else "", self.args) if w)


# The jobs, in the order a run uses them.
JOBS: dict[str, Job] = {
    "synth": Job("data_prep.synth", "OUT",
                 "write a synthetic Cell Painting screen in the JUMP (cpg0016) layout",
                 config="micon.synth:SynthConfig"),
    "prep": Job("data_prep.ingest", "SRC OUT",
                "JUMP layout -> WebDataset shards, DMSO control bank, replicate sets", slurm="ray.sbatch",
                config="data_prep.ingest:IngestConfig"),
    "rsets": Job("data_prep.replicate_sets", "SHARDS",
                 "(re)build the replicate-set shards of a prep output (prep does it too)", slurm="ray.sbatch",
                 config="micon.data.replicate_sets:ReplicateSetConfig"),
    "featurize": Job("data_prep.featurize", "COMPOUNDS OUT",
                     "Ray job: RDKit molecular graphs + fingerprints -> zarr", slurm="ray.sbatch",
                     config="data_prep.featurize:FeaturizeConfig"),
    "train": Job("train.run", "CONFIG",
                 "DeepSpeed training (method=micon|paclr|clip|simclr); CONFIG may be -", nproc=True,
                 slurm="train.sbatch", config="train.config:TrainConfig"),
    "embed": Job("evaluate.embed", "CKPT SHARDS OUT",
                 "Ray embedding of shards (CPU decode tasks feed one actor per GPU): a trained image encoder, a "
                 "named featuriser (cellprofiler), untrained:CKPT, truth:SCREEN (the oracle) or pretrained:PRESET[:WEIGHTS]",
                 slurm="ray.sbatch",
                 config="evaluate.embed:EmbedConfig"),
    "evaluate": Job("evaluate.run", "",
                    "profiles, normalisation, NSB/NSS top-k, mAP, report", slurm="ray.sbatch",
                    config="evaluate.run:EvalConfig"),
    "predict": Job("evaluate.predict", "CKPT COMPOUNDS OUT",
                   "zero-shot profiles of compounds from their structure (MICON: generator + DMSO controls; CLIP)",
                   config="evaluate.predict:PredictConfig"),
    "verify": Job("data_prep.verify", "PATH",
                  "check shards, control bank, replicate sets, graph store, embeddings against their checksums",
                  args=""),
    "slurm": Job("cluster.submit", "JOB", "render and submit a job to Slurm",
                 args="[JOB ARGS] [options] [-- key=value ...]"),
}


def job_lines(indent: str = "  ") -> list[str]:
    """`name args` and its description, aligned: the job part of both usages."""
    heads = {name: job.usage(name) for name, job in JOBS.items()}
    width = max(map(len, heads.values()))
    return [f"{indent}{heads[name]:<{width}}  {job.description}" for name, job in JOBS.items()]


def usage() -> str:
    lines = ["usage: micon JOB [ARGS...]   (micon JOB --help: its arguments, keys and defaults)", "", "jobs:"]
    lines += job_lines()
    lines += ["", "The demo and the test suite: ./launch.sh demo, ./launch.sh test (in a checkout)."]
    return "\n".join(lines)


def _torchrun(module: str, nproc: int, args: list[str]) -> int:
    if module == "train.run":      # training's launcher keeps the ranks' exit codes (75: requeue me), by name
        return int(importlib.import_module("train.launch").main(["--nproc", str(nproc), *args]) or 0)
    exe = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    argv = [exe, "--standalone", "--nproc-per-node", str(nproc), "-m", module, *args]
    os.execv(exe, argv)
    return 127  # not reached


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--jobs":       # for ./launch.sh: the job names, one a line
        print("\n".join(JOBS))
        return 0
    if argv[0] == "--job-lines":  # for ./launch.sh help: the aligned job lines
        print("\n".join(job_lines()))
        return 0
    name, args = argv[0], argv[1:]
    if name not in JOBS:
        print(f"micon: unknown job {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    job = JOBS[name]
    if job.nproc and "--nproc" in args:
        i = args.index("--nproc")
        try:
            nproc = int(args[i + 1])
        except (IndexError, ValueError):
            print("micon: --nproc needs a number of processes", file=sys.stderr)
            return 2
        rest = args[:i] + args[i + 2:]
        if nproc > 1:
            return _torchrun(job.module, nproc, rest)
        args = rest
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    module = importlib.import_module(job.module)
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
