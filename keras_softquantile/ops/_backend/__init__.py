"""What `keras.ops` cannot say, once per Keras backend, chosen at import.

Everything else in `keras_softquantile.ops` is written on `keras.ops`. This package holds only:

* `values_available(*tensors)`: whether Python can read the tensors' values now (eager
  execution), so that a broken promise raises; otherwise the ops assert in TensorFlow graphs
  (`assert_that`, `with_dependencies`) and put NaN in the offending rows (under XLA and
  `jax.jit`, where nothing can raise).
* `compiled_stage(function, transport_shape)`: a solver stage compiled where that is measured
  to pay (XLA clusters inside TensorFlow graphs, except where XLA's slow dense solver on CPUs
  would dominate; elsewhere the function itself, compiled with the caller's `jax.jit` or run
  eagerly by PyTorch).
* `compiled_op(function)`: a whole selection op as one XLA cluster inside TensorFlow graphs
  that are not compiled as a whole, with its run-time checks hoisted out of the cluster
  (elsewhere the function itself).
* `custom_gradient(function)`: a hand-written backward pass, with several outputs, that
  refuses to be differentiated a second time.
* `searchsorted(sorted_rows, values, side)`: a batched search along the last axis.
* `accurate_sum(x, axis, keepdims)`: sums of float32 terms accumulated in float64 (or, on
  JAX without `jax_enable_x64`, in blocks), so 1e6 memberships add up within 1e-7.
* `flushed_exp(x)`: `exp` with subnormal results flushed to zero, as TensorFlow's and XLA's
  CPU kernels do; on PyTorch that keeps its vectorised CPU kernel on its fast path (up to 20x).
* `float64_available()`: whether float64 tensors can be made (JAX needs `jax_enable_x64`).
* `bitcast(x, dtype)`: the bits of a tensor read as another type of the same width.
* `counts_faster(n)`: whether an exact split of rows of `n` entries should count (33 passes
  over the data, in a `compiled_stage`) instead of sorting where the code runs (XLA on CPUs;
  long rows in TensorFlow graphs on CPUs).
"""

from __future__ import annotations

import importlib

import keras

from keras_softquantile.ops._backend._common import SECOND_ORDER_MESSAGE

NAME = keras.backend.backend()

if NAME not in ("tensorflow", "jax", "torch"):
    raise ImportError(
        "keras_softquantile runs on the Keras backends 'tensorflow', 'jax' and 'torch' (its "
        "ops need gradients). Set KERAS_BACKEND to one of them. "
        f"Received: keras.backend.backend()={NAME!r}"
    )

_implementation = importlib.import_module(f"{__name__}._{NAME}")
accurate_sum = _implementation.accurate_sum
bitcast = _implementation.bitcast
assert_that = _implementation.assert_that
compiled_op = _implementation.compiled_op
compiled_stage = _implementation.compiled_stage
counts_faster = _implementation.counts_faster
custom_gradient = _implementation.custom_gradient
float64_available = _implementation.float64_available
flushed_exp = _implementation.flushed_exp
searchsorted = _implementation.searchsorted
values_available = _implementation.values_available
with_dependencies = _implementation.with_dependencies

__all__ = [
    "NAME",
    "SECOND_ORDER_MESSAGE",
    "accurate_sum",
    "assert_that",
    "bitcast",
    "compiled_op",
    "compiled_stage",
    "counts_faster",
    "custom_gradient",
    "float64_available",
    "flushed_exp",
    "searchsorted",
    "values_available",
    "with_dependencies",
]
