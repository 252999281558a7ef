#!/usr/bin/env bash
# Creates the peers' benchmark environment: one venv holding TensorFlow (+ TFP and this project),
# JAX + OTT-JAX + SoftJAX, PyTorch (CPU) + torchsort + diffsort, numpy and matplotlib. The same
# venv serves every worker process; bench_peers.py only changes KERAS_BACKEND between them.
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

echo "== SoftJAX"
# softjax 0.1.1 declares Requires-Python >= 3.12, but its code parses and runs on 3.11; the local
# CPU build of torch 2.13.0 exists for 3.11 only. On 3.11 its dependencies are installed
# normally, then softjax itself with --no-deps --ignore-requires-python.
softjax_deps=("jax>=0.8.0" "ott-jax>=0.5.0" "equinox>=0.13.1" "jaxtyping>=0.3.2" \
    "lineax>=0.0.8" "optimistix>=0.0.9")
if "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
    "${pip[@]}" softjax
else
    "${pip[@]}" "${softjax_deps[@]}"
    "${pip[@]}" --no-deps --ignore-requires-python softjax
fi

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
import softjax  # noqa: F401
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
for name in ("ott-jax", "softjax", "torchsort", "diffsort", "tensorflow-probability", "keras", "numpy"):
    print(name, md.version(name))
PY
echo "== done: $venv"
