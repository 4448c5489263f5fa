"""Train MICON or a baseline with DeepSpeed, one process per device.

    ./launch.sh train CONFIG.yaml [key=value ...]          (CONFIG may be "-" for the defaults below)
    torchrun --nproc-per-node 2 -m train.run CONFIG ...    (what launch.sh does with --nproc N)
    srun python -m train.run CONFIG ...                    (cluster/templates/train.sbatch)

Methods: micon, paclr, clip, simclr (micon.methods). Exit codes: 0 finished; 75 checkpointed on
SIGTERM/SIGUSR1 (requeue and rerun to resume); 1 stopped on a non-finite loss, bad input or a resume
with other data, method or model settings than the run in out= (resume=force continues it, logged in
OUT/run.json); 2 bad configuration (a value out of its range, a crop larger than the stored sites).
Resuming loads DeepSpeed's files from out=: only resume runs you trust.
"""
from __future__ import annotations

import logging
import sys

from train import signals

signals.install_early()    # before any heavy import: a SIGTERM / SIGUSR1 in the first seconds is kept, not fatal


def main(argv: list[str]) -> int:
    from micon.config import ConfigError, help_or_usage, load_config
    from train.config import TrainConfig

    if (rc := help_or_usage(argv, __doc__, TrainConfig, positional=1)) is not None:
        return rc

    try:
        cfg = load_config(TrainConfig, None if argv[0] == "-" else argv[0], argv[1:])
    except ConfigError as e:
        print(f"train: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    from train.trainer import train

    return train(cfg)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
