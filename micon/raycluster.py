"""One way for every job to get Ray: join the cluster at RAY_ADDRESS (started by
cluster/templates/ray.sbatch on Slurm) or start a private local one. Jobs call it; the library never does."""
from __future__ import annotations

import os
from pathlib import Path


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
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env, log_to_driver=False,
                 logging_level="WARNING")
    else:
        # address="local": never attach to somebody else's cluster on a shared machine
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 object_store_memory=int(os.environ.get("MICON_RAY_OBJECT_STORE_MB", object_store_mb)) * 2**20,
                 runtime_env=runtime_env, log_to_driver=False, logging_level="WARNING")
    return ray
