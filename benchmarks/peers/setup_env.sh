#!/usr/bin/env bash
# Creates the peers' benchmark environment: one venv holding TensorFlow (+ TFP and this project),
# JAX + OTT-JAX, PyTorch (CPU) + torchsort + diffsort, numpy and matplotlib, so that one process
# can run every method.
#
# Usage: bash benchmarks/peers/setup_env.sh [VENV_DIR]    (default: benchmarks/peers/.venv)
#        PYTHON=python3.11 bash benchmarks/peers/setup_env.sh
#
# PyTorch is pinned to 2.13.0: on the project's machines a CPU build of exactly that release lies
# on local disk and pip takes it; any other release would download a multi-GB CUDA build.
# torchsort compiles a C++ extension from source against the installed torch, so it is built
# with --no-build-isolation and with no nvcc reachable (it builds a CUDA extension whenever
# `nvcc` is on PATH, which fails against a CPU torch).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-$here/.venv}"
python="${PYTHON:-python3}"

echo "== venv: $venv (from $("$python" --version 2>&1))"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet)

"${pip[@]}" --upgrade pip setuptools wheel ninja
echo "== torch (CPU build)"
"${pip[@]}" "torch==2.13.0"
echo "== TensorFlow, TFP, JAX, OTT-JAX, diffsort, numpy, matplotlib"
"${pip[@]}" tensorflow "tensorflow-probability[tf]" jax ott-jax diffsort numpy matplotlib

echo "== torchsort (C++ extension, CPU only)"
# Drop every PATH entry that holds nvcc or names CUDA, so the build sees no CUDA toolkit.
clean_path=""
IFS=: read -r -a entries <<<"$PATH"
for dir in "${entries[@]}"; do
    case "$dir" in *cuda* | *CUDA*) continue ;; esac
    [[ -x "$dir/nvcc" ]] && continue
    clean_path="${clean_path:+$clean_path:}$dir"
done
env -u CUDA_HOME -u CUDA_PATH PATH="$venv/bin:$clean_path" \
    "$venv/bin/python" -m pip install --quiet --no-build-isolation torchsort

echo "== keras_softquantile (editable)"
"${pip[@]}" -e "$repo"

echo "== check"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md

import diffsort  # noqa: F401
import jax
import keras_softquantile  # noqa: F401
import ott  # noqa: F401
import tensorflow as tf
import tensorflow_probability as tfp  # noqa: F401
import torch
import torchsort

x = torch.randn(2, 5, dtype=torch.float32, requires_grad=True)
torchsort.soft_rank(x).sum().backward()
print("jax", jax.__version__, jax.devices())
print("tensorflow", tf.__version__, "torch", torch.__version__)
for name in ("ott-jax", "torchsort", "diffsort", "tensorflow-probability", "keras", "numpy"):
    print(name, md.version(name))
PY
echo "== done: $venv"
