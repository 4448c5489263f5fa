#!/usr/bin/env bash
# The one GPU check (issue 22): every throughput measure of the project on one GPU machine, from a checkout,
# with no network, in at most 8 minutes. Each part runs under its own time limit; one table per part and a
# summary go to $OUT/gpu_check.md (the device tool brings $OUT back; elsewhere --out DIR, default
# bench/out/gpu_check) for the lead to record in docs/BENCHMARKS.md.
#
#   here (RDKit, Ray):  python bench/gpu_check.py --prepare .gpuwork     256 px shards + graphs, ~1 min, no GPU
#   on the GPU machine: bash bench/gpu_check.sh --prepared .gpuwork      carry .gpuwork (and .whl, see below)
#   here, a dry run:    bash bench/gpu_check.sh --smoke                  CPU, tiny: the plumbing and the interfaces
#
# Python: the project's .venv when there is one, else python3 (the GPU image's torch). Packages the image
# lacks travel as wheels in .whl/ (the device README says how to fetch them: ray, deepspeed, numcodecs, zarr,
# webdataset, ...); they are installed into /tmp/site first. Parts, in order, with their limits:
#   train      bench/gpu_train.py: the DeepSpeed step from shards vs the bare model (trainer)     180 s
#   embed      bench/gpu_check.py --only embed: the Ray embed job end to end, sites/s, and its bytes  130 s
#   ingest     bench/bench_ingest.py: CPU-s per 1,080 px site, today's code beside the new           45 s
#   retrieval  bench/bench_retrieval_scale.py --device cuda: NSB/NSS top-k and mAP, 50k-200k wells    90 s
#   official   bench/bench_trainable.py: the official recipe's step, all vs last_stage vs head      120 s
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${MICON_PYTHON:-$ROOT/.venv/bin/python}"
[[ -x $PY ]] || PY="$(command -v python3)"
prepared="" out="${OUT:-$ROOT/bench/out/gpu_check}" smoke=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --prepared) prepared="$(cd "$2" && pwd)"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --smoke) smoke=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
work="$(mktemp -d /tmp/micon-gpu-check-XXXX)"
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$ROOT"/.whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline RAY_USAGE_STATS_ENABLED=0
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" MICON_RAY_OBJECT_STORE_MB="${MICON_RAY_OBJECT_STORE_MB:-8192}"
cd "$ROOT"
t0=0 BUDGET_S=470     # seconds since the script started (the wheels installed count too)
summary="$out/summary.md"
printf '| part | exit | seconds | limit s |\n|---|---|---|---|\n' > "$summary"

# part NAME LIMIT COMMAND...: runs it under its limit, output in $out/NAME.log, one summary row
part() {
  local name=$1 limit=$2 start=$SECONDS rc left; shift 2
  left=$((BUDGET_S - (SECONDS - t0)))      # the whole check stays within its 8 minutes
  if [[ $smoke == 0 && $left -lt $limit ]]; then limit=$left; fi
  if [[ $limit -lt 20 ]]; then
    printf '| %s | skipped: the 8-minute budget is spent | - | - |\n' "$name" >> "$summary"; return
  fi
  echo "gpu_check: $name (limit ${limit} s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1; rc=$?
  [[ $rc == 124 || $rc == 137 ]] && echo "gpu_check: $name stopped at its limit" >> "$out/$name.log"
  printf '| %s | %s | %s | %s |\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >> "$summary"
  tail -n 3 "$out/$name.log"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import importlib, os, sys
print("python", sys.version.split()[0], "cores", os.cpu_count())
for m in ("torch", "deepspeed", "ray", "timm", "numcodecs", "zarr", "webdataset", "rdkit", "xxhash"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')}")
    except Exception as e:
        print(f"{m} MISSING ({type(e).__name__})")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
} > "$out/env.log" 2>&1
cat "$out/env.log"

if [[ $smoke == 1 ]]; then
  # CPU: embed, ingest and retrieval for real (tiny, nothing written to docs/), the training step's interface only
  part embed 600 "$PY" bench/gpu_check.py --smoke --only embed --tiles 2 --work "$work/embed" --table "$out/embed.md"
  part train 60 "$PY" bench/gpu_train.py --help
  part ingest 120 "$PY" bench/bench_ingest.py --sites 2 --repeats 1 --no-write
  part retrieval 120 "$PY" bench/bench_retrieval_scale.py --device torch:cpu --wells 2000 --check --no-write
else
  data="$prepared"
  if [[ -z $data ]]; then
    part prepare 120 "$PY" bench/gpu_check.py --prepare "$work/data"; data="$work/data"
  fi
  part train 180 "$PY" bench/gpu_train.py "$data/shards" "$data/graphs" --steps 20 --batch 64 --work "$work/train"
  part embed 130 "$PY" bench/gpu_check.py --prepared "$data" --only embed --tiles 64 --work "$work/embed" \
    --table "$out/embed.md"
  part ingest 45 "$PY" bench/bench_ingest.py --sites 24 --repeats 3
  part retrieval 90 "$PY" bench/bench_retrieval_scale.py --device cuda --wells 50000 200000 --map --check
  # the official recipe's step (ResNet-101 per channel, 224 px) with every parameter, the last stage, the heads
  part official 120 "$PY" bench/bench_trainable.py --device cuda --size 224 --batch 32 --repeats 5 --write
fi

{
  echo "# GPU check, $(date -u +%F), $(head -n 1 "$out/env.log")"
  echo
  echo "Command: \`bash bench/gpu_check.sh${prepared:+ --prepared $(basename "$prepared")}$([[ $smoke == 1 ]] && echo ' --smoke')\`, $((SECONDS - t0)) s in all"
  echo
  cat "$summary"
  for name in train embed ingest retrieval; do
    [[ -f "$out/$name.log" ]] || continue
    echo; echo "## $name"; echo
    grep -E '^\|' "$out/$name.log" || echo "(no table; the end of $name.log:)"
    grep -qE '^\|' "$out/$name.log" || tail -n 5 "$out/$name.log" | sed 's/^/    /'
  done
} > "$out/gpu_check.md"
echo "gpu_check: done in $((SECONDS - t0)) s; table in $out/gpu_check.md"
rm -rf "$work"
