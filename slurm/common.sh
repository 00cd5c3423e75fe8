# Sourced by every job script in slurm/ at run time: finds the checkout, loads site settings and
# modules, and runs a stage with its Hydra run folder and output locations logged.
# (sbatch copies a job script into its spool folder, so paths come from PIPELINE_ROOT, which
# slurm/pipeline.sh exports, or from the folder sbatch was called in.)
set -euo pipefail

PIPELINE_ROOT=${PIPELINE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ ! -f "$PIPELINE_ROOT/slurm/site.env" ]]; then
  echo "error: PIPELINE_ROOT=$PIPELINE_ROOT is not a pipeline checkout (no slurm/site.env);" \
       "submit from the checkout or export PIPELINE_ROOT=/path/to/pipeline" >&2
  exit 2
fi
cd "$PIPELINE_ROOT"
# shellcheck source=site.env
source "${PIPELINE_SITE_ENV:-$PIPELINE_ROOT/slurm/site.env}"
if [[ -n "$MODULES" ]]; then
  # shellcheck disable=SC2086  # a list of module names
  module load $MODULES
fi
PY=${PIPELINE_PYTHON:-$PIPELINE_ROOT/.venv/bin/python}
for var in GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME; do
  if [[ -n "${!var}" ]]; then export "${var?}"; else unset "$var"; fi
done
export PIPELINE_RUNS
JOB_TAG=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
JOB_TAG=${JOB_TAG:-${SLURM_JOB_ID:-local}}

log() { echo "[$(date '+%F %T')] $*"; }

# The file sbatch writes this job's output to (patterns like %A_%a expanded by slurmctld).
job_log_file() {
  local f
  f=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | tr ' ' '\n' | sed -n 's/^StdOut=//p' | head -1)
  echo "${f:-stdout}"
}

# Print the keys that say where a finished stage put its output, from Hydra's saved config.
log_outputs() {
  local dir=$1; shift
  "$PY" - "$dir/.hydra/config.yaml" "$@" <<'PY' || true
import sys
from omegaconf import OmegaConf
cfg = OmegaConf.load(sys.argv[1])
for key in sys.argv[2:]:
    value = OmegaConf.select(cfg, key, default=None)
    if value is not None:
        print(f"output: {key}={value}")
PY
}

# run_stage STAGE "OUTPUT_KEY ..." [launcher words --] [overrides...]
# Runs `python -m pipeline.STAGE overrides` (through RUN_PREFIX) with its Hydra run folder under
# $PIPELINE_RUNS/slurm/STAGE/JOB, then logs that folder and the output keys' values.
run_stage() {
  local stage=$1 keys=$2; shift 2
  local launcher=()
  if [[ "${1:-}" == "--launcher" ]]; then
    shift
    while [[ "$1" != "--" ]]; do launcher+=("$1"); shift; done
    shift
  fi
  if [[ ! -f "$PIPELINE_ROOT/pipeline/$stage/__main__.py" ]]; then
    echo "error: stage '$stage' does not exist in $PIPELINE_ROOT (no pipeline/$stage/__main__.py)" >&2
    exit 2
  fi
  local hydra_dir="$PIPELINE_RUNS/slurm/$stage/$JOB_TAG"
  # shellcheck disable=SC2206  # RUN_PREFIX is a command line
  local prefix=($RUN_PREFIX)
  local cmd=("${launcher[@]}" "${prefix[@]}" "$PY" -m "pipeline.$stage" "hydra.run.dir=$hydra_dir" "$@")
  log "stage $stage, job $JOB_TAG on ${SLURM_JOB_NODELIST:-$(hostname)} (restart ${SLURM_RESTART_COUNT:-0})"
  log "job log: $(job_log_file)"
  log "hydra run folder (resolved config, stage log): $hydra_dir"
  log "command: ${cmd[*]}"
  local rc=0
  "${cmd[@]}" || rc=$?
  # shellcheck disable=SC2086  # a list of keys
  log_outputs "$hydra_dir" $keys
  log "stage $stage exited with $rc"
  return "$rc"
}
