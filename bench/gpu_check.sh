#!/usr/bin/env bash
# The prepared GPU check (see bench/gpu_check.py): one call on a single-GPU machine, under 8 minutes,
# one table, recorded in docs/BENCHMARKS.md. Uses the project's .venv when there is one, else python3.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${MICON_PYTHON:-$ROOT/.venv/bin/python}"
[[ -x $PY ]] || PY="$(command -v python3)"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec "$PY" "$ROOT/bench/gpu_check.py" "$@"
