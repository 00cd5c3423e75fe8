#!/usr/bin/env bash
# The image's entry point: run one pipeline stage with Hydra overrides.
#
#   docker run --gpus all IMAGE STAGE [KEY=VALUE ...]
#   docker run IMAGE help | bash
#
# STAGE is one of the stages below that this image has. Distributed stages (train) start one
# process per visible GPU with torchrun; set NPROC_PER_NODE to choose, and NNODES, NODE_RANK,
# MASTER_ADDR, MASTER_PORT for several machines (see docker/README.md).
# Testable outside Docker: PIPELINE_ROOT (the checkout), PIPELINE_PYTHON, and PIPELINE_DRY_RUN=1
# (print the command instead of running it).
set -euo pipefail

STAGES=(cache train evaluate interpret steer audit publish plan scaling family)
DISTRIBUTED=(train)
# stages whose command line takes a folder as its first argument (scaling: the sweep's folder)
POSITIONAL=(scaling)
PIPELINE_ROOT=${PIPELINE_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PY=${PIPELINE_PYTHON:-python}

usage() {
  sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  echo
  echo "stages in this image:"
  for s in "${STAGES[@]}"; do
    if [[ -f "$PIPELINE_ROOT/pipeline/$s/__main__.py" ]]; then echo "  $s"; else echo "  $s (not in this image)"; fi
  done
}
die() { echo "entrypoint: $*" >&2; exit 2; }
in_list() { local x=$1; shift; [[ " $* " == *" $x "* ]]; }

stage=${1:-help}
shift || true
case "$stage" in
  help|-h|--help) usage; exit 0 ;;
  bash|sh|shell) exec bash "$@" ;;
esac
in_list "$stage" "${STAGES[@]}" ||
  die "unknown stage '$stage'; choose one of: ${STAGES[*]} (or help, bash). Usage: docker run IMAGE STAGE [KEY=VALUE ...]"
[[ -f "$PIPELINE_ROOT/pipeline/$stage/__main__.py" ]] ||
  die "stage '$stage' is not in this image ($PIPELINE_ROOT/pipeline/$stage is missing); rebuild the image from a checkout that has it"
overrides=("$@")
if in_list "$stage" "${POSITIONAL[@]}"; then overrides=("${@:2}"); fi
for arg in "${overrides[@]}"; do
  [[ "$arg" == -* || "$arg" == ~* || "$arg" == *=* ]] ||
    die "'$arg' is not a Hydra override; pass KEY=VALUE, e.g. docker run IMAGE $stage n_tokens=100000"
done

# GPUs this container sees: CUDA_VISIBLE_DEVICES if set, else nvidia-smi's list, else none
gpu_count() {
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    local ids
    IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
    echo "${#ids[@]}"
  elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 0
  fi
}

nnodes=${NNODES:-1}
if [[ -n "${NPROC_PER_NODE:-}" ]]; then
  nproc=$NPROC_PER_NODE
elif in_list "$stage" "${DISTRIBUTED[@]}"; then
  nproc=$(gpu_count)
  ((nproc > 0)) || nproc=1
else
  nproc=1
fi
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE='$nproc' must be a positive integer"
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || die "NNODES='$nnodes' must be a positive integer"

if ((nproc > 1 || nnodes > 1)); then
  cmd=("$PY" -m torch.distributed.run --nnodes="$nnodes" --nproc-per-node="$nproc")
  if ((nnodes > 1)); then
    [[ -n "${MASTER_ADDR:-}" && -n "${NODE_RANK:-}" ]] ||
      die "NNODES=$nnodes needs MASTER_ADDR (the first machine's address) and NODE_RANK (0..$((nnodes - 1))) on every machine"
    cmd+=(--node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR" --master-port="${MASTER_PORT:-29500}")
  else
    cmd+=(--standalone)
  fi
  cmd+=(-m "pipeline.$stage" "$@")
else
  cmd=("$PY" -m "pipeline.$stage" "$@")
fi

echo "entrypoint: ${cmd[*]}" >&2
if [[ "${PIPELINE_DRY_RUN:-0}" == 1 ]]; then
  exit 0
fi
exec "${cmd[@]}"
