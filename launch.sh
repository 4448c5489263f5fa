#!/usr/bin/env bash
# The one front door: sets up .venv when needed, then runs a job.
#   ./launch.sh help     lists the jobs
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${MICON_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

log() { printf '[launch %4ss] %s\n' "$SECONDS" "$*" >&2; }   # seconds since launch.sh started

# torch: GPU clusters keep whatever torch they have (or get the newest from pip).
# On a machine whose pip is capped to the torch/torchvision pair lying on its disk
# (/etc/xdg/pip), that exact pair is the only one with a working torchvision, so
# install it explicitly before anything else can pull another torch.
# MICON_TORCH_SPEC overrides both, e.g. "torch==2.5.1 torchvision==0.20.1".
torch_spec() {
  if [[ -n "${MICON_TORCH_SPEC:-}" ]]; then echo "$MICON_TORCH_SPEC"; return; fi
  local c=/etc/xdg/pip/constraints.txt
  if [[ -f $c ]] && grep -q '^torch<=' "$c" && grep -q '^torchvision<=' "$c"; then
    echo "torch==$(sed -n 's/^torch<=//p' "$c") torchvision==$(sed -n 's/^torchvision<=//p' "$c")"
  fi
}

setup() {
  if [[ ! -x "$PY" ]]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip >/dev/null
  fi
  if ! "$PY" -c 'import torch, torchvision' >/dev/null 2>&1; then
    local spec; spec="$(torch_spec)"
    if [[ -n "$spec" ]]; then
      log "installing $spec (the pair that works on this machine)"
      # shellcheck disable=SC2086
      "$PY" -m pip install -q $spec
    fi
  fi
  local stamp_file="$VENV/.micon-install-stamp" stamp
  stamp="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
  if [[ ! -f "$stamp_file" || "$(cat "$stamp_file")" != "$stamp" ]]; then
    log "installing micon and its dependencies into $VENV (first time: a few minutes)"
    # Two steps: the project (s3fs picks botocore through aiobotocore's narrow range), then the test extras with
    # boto3 (moto's) held at that botocore's release. Left free, pip walks back through hundreds of boto3
    # releases, each wanting the newest botocore, for tens of minutes.
    "$PY" -m pip install -q -e "$ROOT"
    local botocore; botocore="$("$PY" -c 'import botocore; print(botocore.__version__)')"
    "$PY" -m pip install -q -e "$ROOT[dev]" "boto3<=$botocore"
    echo "$stamp" > "$stamp_file"
  fi
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$VENV/bin:$PATH"
  # Offline by default: nothing leaves the machine unless the user asks for it.
  export WANDB_MODE="${WANDB_MODE:-offline}"
  export WANDB_SILENT="${WANDB_SILENT:-true}"
  export RAY_USAGE_STATS_ENABLED=0
  export PYTHONUNBUFFERED=1
}

# The end-to-end demo: each stage is one of the jobs below, everything under OUT.
# MICON_DEMO_STEPS sets the training steps per method (default 150).
demo() {
  local out="$1"; shift || true
  local t0=$SECONDS steps="${MICON_DEMO_STEPS:-150}"
  mkdir -p "$out"
  log "demo 1/6: synthetic JUMP-layout screen (calibrated: CellProfiler-grade features at the field's levels) -> $out/screen"
  "$PY" -m data_prep.synth "$out/screen" preset=calibrated_small "$@"
  log "demo 2/6: ingest -> WebDataset shards, DMSO control bank, splits -> $out/shards"
  "$PY" -m data_prep.ingest "$out/screen" "$out/shards" shard_mb=2
  log "demo 3/6: compound graphs (Ray + RDKit) -> $out/graphs"
  "$PY" -m data_prep.featurize "$out/screen/metadata/compound.csv.gz" "$out/graphs"
  local m
  # two lanes on the two cores, one thread each (torch's threads spin-wait on busy cores): micon in one,
  # simclr then clip in the other; each run's log is kept beside it
  train_one() {
    local m=$1 lr=3e-3
    # CLIP's learnable temperature collapsed to chance at 3e-3 in the demo setting: it gets 1e-3
    [[ $m == clip ]] && lr=1e-3
    log "demo 4/6: train $m for $steps steps (DeepSpeed, wandb offline) -> $out/train/$m (log: $out/train-$m.log)"
    OMP_NUM_THREADS=1 "$PY" -m train.run - method=$m "data.shards=$out/shards" "data.graphs=$out/graphs" \
      "out=$out/train/$m" steps="$steps" micro_batch=16 optim.lr=$lr optim.warmup_steps=10 data.augment.crop=56 \
      data.num_workers=1 ckpt_every=50 progress=false > "$out/train-$m.log" 2>&1
    if [[ -f "$out/train/$m/final.json" ]]; then
      log "demo 4/6: trained $m: $(grep -o 'finished [0-9]* steps.*' "$out/train-$m.log" | tail -1)"
    else
      log "demo: training $m failed; the end of $out/train-$m.log:"; tail -20 "$out/train-$m.log" >&2; return 1
    fi
  }
  train_one micon & local lane_a=$!
  { train_one simclr && train_one clip; } & local lane_b=$!
  local tick=0
  while kill -0 $lane_a 2>/dev/null || kill -0 $lane_b 2>/dev/null; do   # progress: each run's step, every 20 s
    sleep 1; (( ++tick % 20 )) && continue
    local line="" r s
    for r in micon simclr clip; do
      s=$(tail -1 "$out/train/$r/metrics.jsonl" 2>/dev/null | grep -o '"step": [0-9]*' | grep -o '[0-9]*$' || true)
      [[ -n $s ]] && line+=" $r $s/$steps"
    done
    [[ -n $line ]] && log "demo 4/6: training steps:$line"
  done
  wait $lane_a || { kill $lane_b 2>/dev/null; exit 1; }
  wait $lane_b || exit 1
  # learned methods embed with their checkpoint, in-process (1,620 small sites through a small network take
  # seconds, less than a Ray start-up); `cellprofiler`, the field's baseline and the costly one, is a registered
  # featuriser and runs as the Ray job does on a cluster (CPU decode tasks feeding the embedding actors)
  for m in micon simclr clip cellprofiler; do
    local ck="$out/train/$m" how="ray=false" where="in-process"
    [[ -d $ck ]] || { ck=$m; how="ray=true"; where="Ray"; }
    log "demo 5/6: embed sites with $m ($where) -> $out/embeddings/$m"
    "$PY" -m evaluate.embed "$ck" "$out/shards" "$out/embeddings/$m" "$how" 2>&1 | grep "^embed:" || true
    [[ -f "$out/embeddings/$m/embed.json" ]] || { log "demo: embedding $m failed"; exit 1; }
  done
  # the floor and the ceiling beside the methods: the same network never updated (simclr's run as initialised,
  # embedded in-process: no Ray start-up for a small set) and each well's true phenotype from the ground truth
  log "demo 5/6: embed sites with the untrained network and the screen's ground truth (oracle)"
  "$PY" -m evaluate.embed "untrained:$out/train/simclr" "$out/shards" "$out/embeddings/untrained" ray=false \
    2>&1 | grep "^embed:" || true
  "$PY" -m evaluate.embed "truth:$out/screen" "$out/shards" "$out/embeddings/oracle" ray=false 2>&1 | grep "^embed:" || true
  for m in untrained oracle; do
    [[ -f "$out/embeddings/$m/embed.json" ]] || { log "demo: embedding $m failed"; exit 1; }
  done
  log "demo 6/6: evaluate (well profiles, MAD + ZCA-cor vs DMSO, NSB/NSS top-k, mAP) -> $out/eval"
  "$PY" -m evaluate.run "out=$out/eval" "shards=$out/shards" "embeddings.micon=$out/embeddings/micon" \
    "embeddings.simclr=$out/embeddings/simclr" "embeddings.clip=$out/embeddings/clip" \
    "embeddings.cellprofiler=$out/embeddings/cellprofiler" "embeddings.untrained=$out/embeddings/untrained" \
    "embeddings.oracle=$out/embeddings/oracle" 2>&1 | grep -v -E "^wandb:|INFO|Warning" || true
  [[ -f "$out/eval/metrics.json" ]] || { log "demo: evaluation failed"; exit 1; }
  log "demo finished in $((SECONDS - t0)) s; everything it made is under $out"
  log "  report: $out/eval/report.md (plots beside it), metrics: $out/eval/metrics.json"
  log "  ground truth of the screen: $out/screen/ground_truth/; wandb offline runs: $out/train/*/wandb"
}

# The jobs come from the one table in micon/cli.py (standard library only: any python3 reads it).
cli() {
  local py="$PY"; [[ -x $py ]] || py=python3
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$py" -m micon.cli "$@"
}

usage() {
  cat <<'USAGE'
usage: ./launch.sh COMMAND [ARGS...]

  setup                      create .venv (or bring it up to date with pyproject.toml)
  demo [OUT]                 end-to-end demo on a synthetic screen (everything under OUT, default runs/demo)
  test [PYTEST ARGS]         the test suite
  compare [options]          the science: every method x 3 seeds on the calibrated screen, ablations,
                             activity-aware MICON, three splits, intervals (bench/science.py --help)
  calibrate [key=value ...]  CellProfiler-grade baseline's levels on a synthetic screen beside the field's anchors
  help                       this list
USAGE
  echo
  echo "jobs (./launch.sh JOB --help: its arguments, keys and defaults; the installed \`micon\` command runs the same):"
  cli --job-lines
  echo
  echo "Each command creates .venv when it is missing and installs the project into it."
}

cmd="${1:-help}"; shift || true
case "$cmd" in
  help|-h|--help) usage ;;
  setup) setup; log "environment ready: $VENV" ;;
  # two pytest workers (pytest-xdist), one module per worker at a time so module fixtures are built once;
  # MICON_TEST_WORKERS=0 (or -n 0) runs in one process. One OpenMP thread per process: two workers on two
  # cores each running torch at two threads spin-wait on each other (3-4x slower steps, docs/BENCHMARKS.md)
  test) setup; cd "$ROOT"; export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
        # passing tests' directories are removed as they pass (pyproject.toml); the run needs ~1 GB of temp space at its peak
        free_mb=$(df -Pm "${TMPDIR:-/tmp}" | awk 'NR==2 {print $4}')
        if (( ${free_mb:-0} < 2048 )); then log "warning: ${free_mb} MB free in ${TMPDIR:-/tmp}; the tests need about 1 GB there at their peak"; fi
        exec "$PY" -m pytest -n "${MICON_TEST_WORKERS:-2}" --dist loadscope tests "$@" ;;
  demo) setup; cd "$ROOT"; demo "${1:-runs/demo}" "${@:2}" ;;
  compare) setup; cd "$ROOT"; exec "$PY" bench/science.py "$@" ;;
  # train --nproc N: the ranks through torchrun with training's own exit code kept (75 when they checkpointed on
  # a stop signal, not torchrun's 1); train/launch.py
  train) setup; if [[ " $* " == *" --nproc "* ]]; then exec "$PY" -m train.launch "$@"; fi
         exec "$PY" -m micon.cli train "$@" ;;
  calibrate) setup; cd "$ROOT"; exec "$PY" bench/calibrate.py "$@" ;;
  *)
    # a job of micon/cli.py (train --nproc N: N processes through torchrun), run from the caller's directory
    jobs=$'\n'"$(cli --jobs)"$'\n'
    if [[ $jobs != *$'\n'"$cmd"$'\n'* ]]; then log "unknown command '$cmd'"; usage >&2; exit 2; fi
    setup; exec "$PY" -m micon.cli "$cmd" "$@" ;;
esac
