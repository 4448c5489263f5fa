#!/usr/bin/env bash
# The comparison at a GPU setting (issue 19, item 7): bench/science.py on the `calibrated` screen, the recipe
# where learning pays on CPU (called-active compounds, pairs within a source first), every method x 3 seeds,
# in at most 8 minutes of GPU time. Stages are resumable: a second call continues where the limit stopped.
#
#   on the GPU machine:  bash bench/gpu_science.sh [--out DIR] [--limit SECONDS]    synth + ingest there (16 cores)
#   reuse a prepared screen: bash bench/gpu_science.sh --prepared runs/c200          (screen, shards, graphs linked)
#   here, a dry run:     bash bench/gpu_science.sh --smoke --prepared runs/c200       CPU, 4 steps, one seed
#
# Writes OUT/results.json, summary.csv, comparison.png (and the logs) for the lead to record in
# docs/RESULTS.md beside the CPU result, which stands on its own.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${MICON_PYTHON:-$ROOT/.venv/bin/python}"
[[ -x $PY ]] || PY="$(command -v python3)"
out="${OUT:-$ROOT/bench/out}/gpu_science" prepared="" smoke=0 limit=480
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --prepared) prepared="$(cd "$2" && pwd)"; shift 2 ;;
    --limit) limit="$2"; shift 2 ;;
    --smoke) smoke=1; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "gpu_science: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then   # packages the GPU image lacks (see bench/gpu_check.sh)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$ROOT"/.whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline RAY_USAGE_STATS_ENABLED=0
if [[ -n $prepared ]]; then      # the screen and what prep made of it, shared read-only
  for d in screen shards graphs embeddings/cellprofiler embeddings/oracle; do
    [[ -e $prepared/$d && ! -e $out/$d ]] && mkdir -p "$(dirname "$out/$d")" && ln -s "$prepared/$d" "$out/$d"
  done
fi
# the GPU setting: 4 trainings share the GPU (one lane each), 128 examples per step at the screen's 64 px sites
# (resnet18, no crop beyond 56 px), 1,500 steps; a CPU smoke run: 4 steps of 8, one seed, two methods
if (( smoke )); then
  args=(--steps 4 --seeds 0 --methods paclr simclr --lanes 1
        --train-args micro_batch=8 data.augment.crop=48 data.pair_within_source=true wandb.enabled=false)
  export OMP_NUM_THREADS=1
else
  args=(--steps 1500 --seeds 0 1 2 --lanes 4
        --train-args model.preset=resnet18 micro_batch=128 data.augment.crop=56 data.num_workers=3
                     data.pair_within_source=true engine.channels_last=auto wandb.log_every=20 deterministic=true)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
fi
t0=$SECONDS
timeout --signal=TERM "$limit" "$PY" "$ROOT/bench/science.py" --out "$out" --preset calibrated --data called_active \
  --parts comparison "${args[@]}"
rc=$?
echo "gpu_science: rc $rc after $((SECONDS - t0)) s (limit $limit s; rc 124 = stopped at the limit: run it again to" \
     "continue); results in $out" >&2
exit $rc
