#!/usr/bin/env bash
# Download, HERE (a machine that reaches PyPI), the wheels that the lent GPU machine lacks for
# bench/gpu_check.sh: that machine reaches no package index, and its image already holds torch, triton,
# transformers, accelerate, peft, pyarrow, pandas, xxhash, huggingface-hub, fsspec, psutil, jinja2, pytest
# (the device tool library's KINDS.md). Missing there: datasets (+ dill, multiprocess), trl, liger-kernel.
# fsspec is carried as well, pinned to the top of datasets' range (fsspec<=2026.9.0): pip takes it only if
# the machine's own fsspec falls outside that range (a few hundred KiB).
#
#   bash bench/gpu_wheels.sh                 # -> bench/.wheels/ (git-ignored), prints the total size
#   bash bench/gpu_wheels.sh DIR             # another folder (inside the repo, so that `carry` can name it)
#
# Wheels for CPython 3.12 on manylinux x86-64 (the GPU machine's python3), --no-deps: exactly this list.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-bench/.wheels}"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}"
LIMIT_MIB=48  # the device tool carries <= 64 MiB in all, the working tree (~3 MiB) included

WHEELS=(
  "trl==1.16.0"
  "datasets==5.2.0"
  "dill==0.4.1"          # datasets 5.2: dill<0.4.2
  "multiprocess==0.70.19" # datasets 5.2: multiprocess<0.70.20
  "liger-kernel==0.8.5"  # needs torch + triton: both on the GPU machine
  "fsspec==2026.9.0"     # only used if the machine's fsspec is outside datasets' range
)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any \
  -d "$DEST" "${WHEELS[@]}"

count=$(ls "$DEST"/*.whl | wc -l)
if [ "$count" -ne "${#WHEELS[@]}" ]; then
  echo "expected ${#WHEELS[@]} wheels in $DEST, found $count" >&2
  exit 1
fi
bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
ls -l "$DEST"
echo "total: $bytes bytes (~${mib} MiB) in $count wheels under $DEST"
if [ "$mib" -gt "$LIMIT_MIB" ]; then
  echo "over the ${LIMIT_MIB} MiB this folder may take of the device tool's 64 MiB carry" >&2
  exit 1
fi
