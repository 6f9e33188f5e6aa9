#!/usr/bin/env bash
# One prepared GPU check (issue 17): pytest -m gpu, then preftune vs TRL 1.16 (and TRL + Liger) on a
# Llama-3.2-1B-shaped model, bf16, 2048 tokens. Writes gpu_check.json + gpu_check.md under $OUT.
#
#   bash bench/gpu_check.sh              # on a CUDA machine: <= 8 minutes (default budget 450 s)
#   bash bench/gpu_check.sh --dry-run    # on CPU: tiny model, 1 timed step per system, < 1 minute
#   bash bench/gpu_check.sh --help       # the driver's options (bench/gpu_check.py)
#
# Runs the project from source (PYTHONPATH=src); on the GPU machine installs what it lacks from the
# wheels of bench/gpu_wheels.sh (bench/.wheels, passed in the device tool's `carry`).
# Env: OUT (default ./gpu-check-out), PYTHON (default python3), GPU_CHECK_HARD_LIMIT (seconds, default
# 470: a stuck driver is stopped with SIGTERM, and writes what it has, before 8 minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-$PWD/gpu-check-out}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,driver_version --format=csv \
    > "$OUT/nvidia-smi.txt" 2>&1 || true
fi
exec timeout --signal=TERM --kill-after=10 "${GPU_CHECK_HARD_LIMIT:-470}" \
  "$PY" bench/gpu_check.py "$@"
