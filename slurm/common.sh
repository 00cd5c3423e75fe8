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
# shellcheck source=site.env
source "${PIPELINE_SITE_ENV:-$PIPELINE_ROOT/slurm/site.env}"
WORK_DIR=${WORK_DIR:-$PIPELINE_ROOT}
cd "$WORK_DIR"
export PYTHONPATH="$PIPELINE_ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's package, from any folder
if [[ -n "$MODULES" ]]; then
  set +u  # module scripts of some sites read unset variables
  # shellcheck disable=SC2086  # a list of module names
  module load $MODULES
  set -u
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
  "${PREFIX[@]}" "$PY" - "$dir/.hydra/config.yaml" "$@" <<'PY' || true
import sys
from omegaconf import OmegaConf
cfg = OmegaConf.load(sys.argv[1])
for key in sys.argv[2:]:
    value = OmegaConf.select(cfg, key, default=None)
    if value is not None:
        print(f"output: {key}={value}")
PY
}

# stage_begin STAGE: check the stage exists, pick its Hydra run folder (HYDRA_DIR), log the header.
stage_begin() {
  STAGE=$1
  if [[ ! -f "$PIPELINE_ROOT/pipeline/$STAGE/__main__.py" ]]; then
    echo "error: stage '$STAGE' does not exist in $PIPELINE_ROOT (no pipeline/$STAGE/__main__.py)" >&2
    exit 2
  fi
  HYDRA_DIR="$PIPELINE_RUNS/slurm/$STAGE/$JOB_TAG"
  # shellcheck disable=SC2206  # RUN_PREFIX is a command line
  PREFIX=($RUN_PREFIX)
  log "stage $STAGE, job $JOB_TAG on ${SLURM_JOB_NODELIST:-$(hostname)} (restart ${SLURM_RESTART_COUNT:-0})"
  log "job log: $(job_log_file)"
  log "hydra run folder (resolved config, stage log): $HYDRA_DIR"
}

# stage_run CMD...: run it in the background and wait, so that trapped signals (USR1) are handled
# while it runs; its exit status goes to STAGE_RC.
stage_run() {
  log "command: $*"
  "$@" &
  STAGE_PID=$!
  while true; do
    if wait "$STAGE_PID"; then STAGE_RC=0; else STAGE_RC=$?; fi
    kill -0 "$STAGE_PID" 2>/dev/null || break  # still running: wait was cut short by a signal
  done
}

# stage_end "OUTPUT_KEY ...": log where the output went (from Hydra's saved config) and the status.
stage_end() {
  # shellcheck disable=SC2086  # a list of keys
  log_outputs "$HYDRA_DIR" $1
  log "stage $STAGE exited with $STAGE_RC"
}

# run_stage STAGE "OUTPUT_KEY ..." [overrides...]: one process, `python -m pipeline.STAGE overrides`.
run_stage() {
  local keys=$2
  stage_begin "$1"
  shift 2
  stage_run "${PREFIX[@]}" "$PY" -m "pipeline.$STAGE" "hydra.run.dir=$HYDRA_DIR" "$@"
  stage_end "$keys"
  return "$STAGE_RC"
}
