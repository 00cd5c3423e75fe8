#!/usr/bin/env bash
# The device check on a machine with one NVIDIA GPU: install, measure, run the GPU-marked tests,
# print one JSON summary, within 8 minutes (benchmarks/gpu_check/check.py says what each step runs;
# --dry-run prints them, resolved, and needs no GPU).
#
#   benchmarks/gpu_check.sh [--dry-run] [--venv .venv-gpu] [--torch-spec SPEC] [--out runs/gpu_check]
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/gpu_check/check.py" "$@"
