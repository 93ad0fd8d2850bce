#!/usr/bin/env bash
# The accelerator benchmark in one prepared command (benchmarks/accelerator.py): at most five
# minutes on one GPU or TPU host, one JSON.
#
#   benchmarks/accelerator.sh [--dry_run] [--out FILE]
#
# On a GPU machine it first installs the project with its `cuda` extra (JAX's CUDA 12 wheels,
# nothing else); on a TPU VM with the `tpu` extra; `--dry_run` installs nothing and runs the
# same code on tiny shapes on whatever device there is (CI runs it on the CPU). Without --out
# the JSON goes to benchmarks/results/<device>.json.
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
for arg in "$@"; do [[ "$arg" == --dry_run ]] && dry_run=1; done
if [[ $dry_run == 0 ]]; then
  if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
    python -m pip install --quiet -e '.[cuda]'
  elif [[ -e /dev/accel0 || -e /dev/vfio/0 ]]; then
    python -m pip install --quiet -e '.[tpu]'
  fi
fi

out=()
if [[ " $* " != *" --out"* && $dry_run == 0 ]]; then
  device=$(python -c 'import jax; print(jax.devices()[0].device_kind.replace(" ", "_"))')
  out=(--out "benchmarks/results/${device}.json")
fi
exec python -m benchmarks.accelerator "$@" "${out[@]}"
