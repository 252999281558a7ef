"""What the cross-backend tests need from the backend that `KERAS_BACKEND` selected.

The tests in this directory run unchanged under TensorFlow, JAX and PyTorch: they call the
package's public API on numpy arrays or on the active backend's tensors, and differentiate
and compile through the helpers below, which are the only backend-specific code here. The
backend's own library is imported inside the helpers, never at module level, so that these
tests import no TensorFlow under `KERAS_BACKEND=jax` or `torch`.

* `backend()`: "tensorflow", "jax" or "torch".
* `tensor(x, dtype)`: a numpy array (or nested list) as a tensor of the active backend.
* `to_numpy(x)`: a tensor (or a nested structure of them) as numpy arrays.
* `is_backend_tensor(x)`: whether `x` is a tensor of the active backend.
* `grad(fn, x, *args)`: the gradient of `sum(fn(x, *args))` with respect to `x`, by the
  backend's own autodiff: `tf.GradientTape`, `jax.grad`, `torch.autograd`.
* `second_order_gradient(fn, x, v)`: the gradient of `<grad fn(x), v>` (a Hessian-vector
  product), through the same autodiff run twice (reverse over reverse).
* `jit_grad(fn, x)`: `grad` with the whole gradient computation compiled (a train step).
* `jit(fn)`: `fn` compiled the way the backend compiles a training step:
  `tf.function(jit_compile=True)` (XLA) on TensorFlow, `jax.jit` on JAX, and `fn` itself on
  PyTorch, which Keras runs eagerly by default (`jit_compile="auto"` is False there;
  `jit_compile=True` would mean `torch.compile`, which this suite does not cover). So on
  PyTorch the jit tests compare eager with eager, and the "NaN rows under jit" tests, which
  need a trace in which nothing can raise, are skipped (`HAS_TRACING_JIT`).
* `float64_available()`: whether float64 tensors can be made (JAX needs `JAX_ENABLE_X64=1`);
  `needs_float64` is the matching `skipif` mark.
* Fixtures, imported by the conftest of each directory that uses this harness:
  `float32_policy_and_seed` (autouse there) and `rng`.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

__all__ = [
    "HAS_TRACING_JIT",
    "backend",
    "float64_available",
    "grad",
    "is_backend_tensor",
    "jit",
    "jit_grad",
    "needs_float64",
    "needs_tracing_jit",
    "second_order_gradient",
    "tensor",
    "to_numpy",
]


def backend() -> str:
    """The active Keras backend: "tensorflow", "jax" or "torch"."""
    return keras.backend.backend()


def float64_available() -> bool:
    """Whether float64 tensors can be made: always, except on JAX without x64."""
    if backend() == "jax":
        import jax

        return bool(jax.config.jax_enable_x64)
    return True


# Whether `jit` really traces (and so the ops cannot raise inside it, but poison rows).
HAS_TRACING_JIT = backend() in ("tensorflow", "jax")

needs_float64 = pytest.mark.skipif(
    not float64_available(),
    reason=(
        "float64 on JAX needs 64-bit mode: run with JAX_ENABLE_X64=1 (this run has "
        f"JAX_ENABLE_X64={os.environ.get('JAX_ENABLE_X64')!r}, so JAX makes float32 arrays)"
    ),
)

needs_tracing_jit = pytest.mark.skipif(
    not HAS_TRACING_JIT,
    reason="PyTorch runs eagerly here (no torch.compile): nothing is traced, errors raise",
)


def tensor(x, dtype: str | None = None):
    """`x` (numpy, nested lists, a tensor) as a tensor of the active backend."""
    if dtype is None and not hasattr(x, "dtype"):
        x = np.asarray(x)
    return keras.ops.convert_to_tensor(x, dtype=dtype)


def to_numpy(x):
    """A tensor, or a nested structure (tuple, list, dict, NamedTuple) of them, as numpy."""
    return keras.tree.map_structure(lambda t: np.asarray(keras.ops.convert_to_numpy(t)), x)


def is_backend_tensor(x) -> bool:
    """Whether `x` is a tensor of the active backend (not a numpy array)."""
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        return tf.is_tensor(x)
    if name == "jax":
        import jax

        return isinstance(x, jax.Array)
    import torch

    return isinstance(x, torch.Tensor)


def _scalar(y):
    return keras.ops.sum(y)


def grad(fn, x, *args) -> np.ndarray:
    """The gradient of `sum(fn(x, *args))` with respect to `x` (numpy in, numpy out).

    `x` becomes a backend tensor of its own dtype (a Python float: float64 where available).
    """
    x = np.asarray(x, dtype=np.float64 if isinstance(x, float) else None)
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = _scalar(fn(xt, *args))
        g = tape.gradient(y, xt)
        return np.zeros_like(x) if g is None else g.numpy()
    if name == "jax":
        import jax

        return np.asarray(jax.grad(lambda v: _scalar(fn(v, *args)))(tensor(x)))
    import torch

    xt = torch.tensor(x, requires_grad=True)
    y = _scalar(fn(xt, *args))
    if not y.requires_grad:  # nothing differentiable reached y (a hard op): a zero gradient
        return np.zeros_like(x)
    (g,) = torch.autograd.grad(y, xt, allow_unused=True)
    return np.zeros_like(x) if g is None else g.detach().cpu().numpy()


def second_order_gradient(fn, x, v) -> np.ndarray:
    """The gradient of `<grad sum(fn)(x), v>` with respect to `x`: a Hessian-vector product,
    by differentiating the backend's gradient once more (reverse over reverse)."""
    x = np.asarray(x)
    v = np.asarray(v, x.dtype)
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        xt = tf.constant(x)
        with tf.GradientTape() as outer:
            outer.watch(xt)
            with tf.GradientTape() as inner:
                inner.watch(xt)
                y = _scalar(fn(xt))
            g = inner.gradient(y, xt)
            inner_product = tf.reduce_sum(g * v)
        return outer.gradient(inner_product, xt).numpy()
    if name == "jax":
        import jax
        import jax.numpy as jnp

        def inner_product(w):
            return jnp.vdot(jax.grad(lambda u: _scalar(fn(u)))(w), v)

        return np.asarray(jax.grad(inner_product)(tensor(x)))
    import torch

    xt = torch.tensor(x, requires_grad=True)
    (g,) = torch.autograd.grad(_scalar(fn(xt)), xt, create_graph=True)
    (h,) = torch.autograd.grad(torch.sum(g * torch.tensor(v)), xt)
    return h.detach().cpu().numpy()


def jit_grad(fn, x) -> np.ndarray:
    """`grad(fn, x)` with the whole gradient computation compiled (as Keras compiles a train
    step): `tf.function(jit_compile=True)` around the tape, `jax.jit(jax.grad(...))`, and the
    eager gradient on PyTorch."""
    x = np.asarray(x)
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def compiled(xt):
            with tf.GradientTape() as tape:
                tape.watch(xt)
                y = _scalar(fn(xt))
            return tape.gradient(y, xt)

        return compiled(tf.constant(x)).numpy()
    if name == "jax":
        import jax

        return np.asarray(jax.jit(jax.grad(lambda v: _scalar(fn(v))))(tensor(x)))
    return grad(fn, x)


def jit(fn):
    """`fn` compiled as the backend compiles a training step (see the module docstring)."""
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    if name == "jax":
        import jax

        return jax.jit(fn)
    return fn


@pytest.fixture(autouse=True)
def float32_policy_and_seed():
    """Every test starts (and ends) under the float32 policy, with Keras's seeds fixed."""
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
