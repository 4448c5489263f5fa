#!/usr/bin/env bash
# The one front door: sets up .venv when needed, then runs a job.
#   ./launch.sh help     lists the jobs
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${MICON_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

log() { printf '[launch] %s\n' "$*" >&2; }

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
    "$PY" -m pip install -q -e "$ROOT[dev]"
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
demo() {
  local out="$1"; shift || true
  local t0=$SECONDS
  mkdir -p "$out"
  log "demo: writing a synthetic JUMP-layout screen to $out/screen"
  "$PY" -m data_prep.synth "$out/screen" preset=demo "$@"
  log "demo: the screen's layout is under $out/screen (metadata/, */workspace/load_data_csv/, */images/),"
  log "      its ground truth (phenotype and activity of every compound) under $out/screen/ground_truth/"
  log "demo finished in $((SECONDS - t0)) s; everything it made is under $out"
}

usage() {
  cat <<'USAGE'
usage: ./launch.sh COMMAND [ARGS...]

  demo [OUT]                 end-to-end demo on a synthetic screen (everything under OUT, default runs/demo)
  test [PYTEST ARGS]         the test suite
  synth OUT [key=value ...]  write a synthetic Cell Painting screen in the JUMP (cpg0016) layout
  prep SRC OUT [key=value]   JUMP layout -> WebDataset shards, DMSO control bank, channel stats
  featurize COMPOUNDS OUT    Ray job: RDKit molecular graphs + fingerprints -> zarr
  train CONFIG [--nproc N] [key=value]
                             DeepSpeed training (method=micon|paclr|clip|simclr); CONFIG may be -
  embed CKPT SHARDS OUT      Ray Data embedding of shards with a trained image encoder
  evaluate [key=value ...]   profiles, normalisation, NSB/NSS top-k, mAP, report
  slurm JOB [options]        render and submit a job to Slurm
  help                       this list

Each command creates .venv when it is missing and installs the project into it.
USAGE
}

cmd="${1:-help}"; shift || true
case "$cmd" in
  help|-h|--help) usage ;;
  setup) setup; log "environment ready: $VENV" ;;
  test) setup; cd "$ROOT"; exec "$PY" -m pytest tests "$@" ;;
  demo) setup; cd "$ROOT"; demo "${1:-runs/demo}" "${@:2}" ;;
  synth) setup; exec "$PY" -m data_prep.synth "$@" ;;
  prep) setup; exec "$PY" -m data_prep.ingest "$@" ;;
  featurize) setup; exec "$PY" -m data_prep.featurize "$@" ;;
  train)
    # --nproc N anywhere in the arguments: N processes on this machine through torchrun
    setup; nproc=1; args=()
    while [[ $# -gt 0 ]]; do
      if [[ $1 == --nproc ]]; then nproc=$2; shift 2; else args+=("$1"); shift; fi
    done
    if [[ $nproc -gt 1 ]]; then
      exec "$VENV/bin/torchrun" --standalone --nproc-per-node "$nproc" -m train.run "${args[@]}"
    fi
    exec "$PY" -m train.run "${args[@]}" ;;
  embed) setup; exec "$PY" -m evaluate.embed "$@" ;;
  evaluate) setup; exec "$PY" -m evaluate.run "$@" ;;
  slurm) setup; exec "$PY" -m cluster.submit "$@" ;;
  *) log "unknown command '$cmd'"; usage >&2; exit 2 ;;
esac
