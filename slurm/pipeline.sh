#!/usr/bin/env bash
# Submit the pipeline to SLURM, each stage a job that starts when the one before succeeded
# (--dependency=afterok); a failed stage cancels the rest (--kill-on-invalid-dep=yes).
#
#   slurm/pipeline.sh [options] [OVERRIDE ...]
#
#   OVERRIDE       KEY=VALUE goes to every stage; STAGE:KEY=VALUE to that stage only, e.g.
#                  cache:n_tokens=10000000 train:steps=20000
#   --stages LIST  comma-separated, in pipeline order (default: every stage this checkout has,
#                  of cache,train,evaluate,publish)
#   --after JOBID  make the first stage wait for JOBID too
#   --dry-run      print the sbatch commands instead of submitting
#
# Site settings (partition, account, modules, container, sizes) come from slurm/site.env or the
# environment, never from edits here. Prints one line per job: stage, job id, log file.
set -euo pipefail
PIPELINE_ROOT=${PIPELINE_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export PIPELINE_ROOT
# shellcheck source=site.env
source "${PIPELINE_SITE_ENV:-$PIPELINE_ROOT/slurm/site.env}"
ALL_STAGES=(cache train evaluate publish)

usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "slurm/pipeline.sh: $*" >&2; exit 2; }
has_stage() { [[ -f "$PIPELINE_ROOT/pipeline/$1/__main__.py" && -f "$PIPELINE_ROOT/slurm/$1.sbatch" ]]; }

stages="" after="" dry=0 overrides=()
while (($#)); do
  case "$1" in
    --stages) stages=${2:?--stages needs a list, e.g. cache,train}; shift 2 ;;
    --stages=*) stages=${1#*=}; shift ;;
    --after) after=${2:?--after needs a job id}; shift 2 ;;
    --after=*) after=${1#*=}; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; overrides+=("$@"); break ;;
    -*) die "unknown option '$1'; see --help" ;;
    *=*) overrides+=("$1"); shift ;;
    *) die "'$1' is neither an option nor an override (KEY=VALUE or STAGE:KEY=VALUE); see --help" ;;
  esac
done

for o in "${overrides[@]}"; do
  if [[ "$o" =~ ^([a-z]+):(.*)$ ]] && [[ " ${ALL_STAGES[*]} " != *" ${BASH_REMATCH[1]} "* ]]; then
    die "override '$o' names unknown stage '${BASH_REMATCH[1]}'; choose from: ${ALL_STAGES[*]}"
  fi
done
if [[ -z "$stages" ]]; then
  chosen=()
  for s in "${ALL_STAGES[@]}"; do
    if has_stage "$s"; then chosen+=("$s"); else echo "note: stage '$s' is not in this checkout yet (pipeline/$s/__main__.py, slurm/$s.sbatch); skipped"; fi
  done
else
  IFS=, read -r -a chosen <<<"$stages"
  for s in "${chosen[@]}"; do
    [[ " ${ALL_STAGES[*]} " == *" $s "* ]] || die "unknown stage '$s'; choose from: ${ALL_STAGES[*]}"
    has_stage "$s" || die "stage '$s' does not exist in $PIPELINE_ROOT (needs pipeline/$s/__main__.py and slurm/$s.sbatch)"
  done
fi
((${#chosen[@]})) || die "no stage to submit"

# The overrides for one stage: unprefixed ones and those prefixed with "stage:", in order.
stage_overrides() {
  local o
  for o in "${overrides[@]}"; do
    if [[ "$o" == "$1:"* ]]; then printf '%s\n' "${o#"$1":}"
    elif ! [[ "$o" =~ ^[a-z]+: ]]; then printf '%s\n' "$o"; fi
  done
}

# relative folders resolve in the stages' working folder; the jobs get them absolute
WORK_DIR=${WORK_DIR:-$PIPELINE_ROOT}
[[ "$WORK_DIR" = /* ]] || WORK_DIR="$PWD/$WORK_DIR"
[[ "$PIPELINE_RUNS" = /* ]] || PIPELINE_RUNS="$WORK_DIR/$PIPELINE_RUNS"
LOG_DIR=${LOG_DIR:-$PIPELINE_RUNS/slurm-logs}
[[ "$LOG_DIR" = /* ]] || LOG_DIR="$WORK_DIR/$LOG_DIR"
export WORK_DIR PIPELINE_RUNS
((dry)) || mkdir -p "$LOG_DIR"

common=(--parsable --kill-on-invalid-dep=yes --chdir="$WORK_DIR")
[[ -n "$PARTITION" ]] && common+=(--partition="$PARTITION")
[[ -n "$ACCOUNT" ]] && common+=(--account="$ACCOUNT")
[[ -n "$QOS" ]] && common+=(--qos="$QOS")
# shellcheck disable=SC2206  # a list of sbatch options
[[ -n "$EXTRA_SBATCH_ARGS" ]] && common+=($EXTRA_SBATCH_ARGS)

dep=$after
# submit NAME LOG [sbatch options...] -- SCRIPT [overrides...]: prints the job id, chains on $dep
submit() {
  local name=$1 logpat=$2; shift 2
  local opts=("${common[@]}" --job-name="pipeline-$name" --output="$LOG_DIR/$logpat")
  [[ -n "$dep" ]] && opts+=(--dependency="afterok:$dep")
  while [[ "$1" != "--" ]]; do opts+=("$1"); shift; done
  shift
  if ((dry)); then
    echo "sbatch ${opts[*]} $*" >&2
    echo "<$name>"
  else
    sbatch "${opts[@]}" "$@" | cut -d';' -f1
  fi
}
report() {  # stage, job id, log file
  printf '%-14s %-10s %s\n' "$1" "$2" "$3"
}
# resources OPTION COUNT_OR_SIZE...: the optional sbatch options, skipped when 0 or empty
resources() {
  res=()
  while (($#)); do
    if [[ -n "$2" && "$2" != 0 ]]; then res+=("$1=$2"); fi
    shift 2
  done
}

printf '%-14s %-10s %s\n' STAGE JOB LOG
for stage in "${chosen[@]}"; do
  mapfile -t args < <(stage_overrides "$stage")
  script="$PIPELINE_ROOT/slurm/$stage.sbatch"
  case "$stage" in
    cache)
      array="0-$((CACHE_TASKS - 1))${CACHE_ARRAY_LIMIT:+%$CACHE_ARRAY_LIMIT}"
      resources --gpus-per-task "$CACHE_GPUS" --mem "$CACHE_MEM"
      id=$(submit cache "%x-%A_%a.out" --array="$array" --cpus-per-task="$CACHE_CPUS" --time="$CACHE_TIME" \
           "${res[@]}" -- "$script" "${args[@]}")
      report cache-array "$id" "$LOG_DIR/pipeline-cache-${id}_<task>.out"
      dep=$id
      resources --mem "$CACHE_MEM"
      id=$(submit cache-commit "%x-%j.out" --cpus-per-task=1 --time="$CACHE_TIME" "${res[@]}" \
           -- "$script" commit_only=true "${args[@]}")
      report cache-commit "$id" "$LOG_DIR/pipeline-cache-commit-$id.out" ;;
    train)
      # one task per process; USR1 reaches the batch shell PREEMPT_GRACE s before the time limit
      resources --gpus-per-node "$TRAIN_GPUS_PER_NODE" --mem "$TRAIN_MEM"
      id=$(submit train "%x-%j.out" --nodes="$TRAIN_NODES" --ntasks-per-node="$TRAIN_TASKS_PER_NODE" \
           --cpus-per-task="$TRAIN_CPUS_PER_TASK" --time="$TRAIN_TIME" "${res[@]}" \
           --signal="B:USR1@$PREEMPT_GRACE" --requeue --open-mode=append -- "$script" "${args[@]}")
      report train "$id" "$LOG_DIR/pipeline-train-$id.out" ;;
    evaluate)
      resources --gpus-per-task "$EVAL_GPUS"
      id=$(submit evaluate "%x-%j.out" --cpus-per-task="$EVAL_CPUS" --time="$EVAL_TIME" "${res[@]}" \
           -- "$script" "${args[@]}")
      report evaluate "$id" "$LOG_DIR/pipeline-evaluate-$id.out" ;;
    publish)
      id=$(submit publish "%x-%j.out" --cpus-per-task="$PUBLISH_CPUS" --time="$PUBLISH_TIME" -- "$script" "${args[@]}")
      report publish "$id" "$LOG_DIR/pipeline-publish-$id.out" ;;
  esac
  dep=$id
done
echo "stage outputs: under $WORK_DIR (relative paths of conf/*.yaml, e.g. runs/demo/...)"
echo "Hydra run folders (resolved config, stage logs): $PIPELINE_RUNS/slurm/<stage>/<job>"
((dry)) || echo "watch: squeue -j $(echo "$dep" | tr -d ' ')   (last job; all: squeue -u \"\$USER\")"
