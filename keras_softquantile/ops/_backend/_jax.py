"""The JAX backend: tracers cannot raise (NaN rows instead), `jax.custom_gradient`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from keras_softquantile.ops._backend._common import (
    SECOND_ORDER_MESSAGE,
    CompiledCache,
    blockwise_sum,
)


def values_available(*tensors) -> bool:
    """Whether every tensor is concrete (not a tracer inside `jax.jit` or a gradient)."""
    return not any(isinstance(t, jax.core.Tracer) for t in tensors)


def assert_that(condition, data: list) -> list:
    """JAX has no graph assertions: traced checks fall back to NaN rows."""
    return []


def with_dependencies(x, assertions: list):
    return x


def compiled_op(function):
    """`function` itself: the caller's `jax.jit` compiles the whole op."""
    return function


def compiled_stage(function, transport_shape=None):
    """`function`, compiled with `jax.jit` when called on concrete arrays.

    `transport_shape` is not needed here: JAX solves dense systems with LAPACK on CPUs
    (`soft_rank` of 256 x 100 under `jax.jit`: 640 ms, like TensorFlow op by op).

    Inside a trace (the caller's `jax.jit`, which Keras's `jit_compile=True` uses, or a
    gradient) it is the function itself: the whole computation is compiled around it. Called
    eagerly, its array arguments become the compiled function's inputs and everything else
    (Python ints and floats such as `m` or the tolerance) is static; one compilation per
    combination, the 32 most recently used kept. Without this, an eager call re-traced the
    solver loop's body each time (2.3 s per call of a 4 x 1000 problem instead of
    milliseconds).
    """
    cache = CompiledCache()

    def dispatch(*args):
        leaves, structure = jax.tree_util.tree_flatten(args)
        if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
            return function(*args)
        is_array = [isinstance(leaf, jax.Array | np.ndarray) for leaf in leaves]
        static = tuple(
            None if array else leaf for leaf, array in zip(leaves, is_array, strict=True)
        )

        def build():
            def rebuilt(*arrays):
                remaining = iter(arrays)
                filled = [
                    next(remaining) if array else leaf
                    for leaf, array in zip(static, is_array, strict=True)
                ]
                return function(*jax.tree_util.tree_unflatten(structure, filled))

            return jax.jit(rebuilt)

        compiled = cache.get((structure, static, tuple(is_array)), build)
        return compiled(*(leaf for leaf, array in zip(leaves, is_array, strict=True) if array))

    dispatch.compiled_cache = cache
    return dispatch


@jax.custom_vjp
def _first_order_only(values):
    return values


def _first_order_forward(values):
    return values, None


def _first_order_backward(_, cotangent):
    raise NotImplementedError(SECOND_ORDER_MESSAGE)


_first_order_only.defvjp(_first_order_forward, _first_order_backward)


def custom_gradient(function):
    """`function(*inputs) -> (outputs, backward)`, differentiated by `backward(*upstream)`.

    `outputs` is a tuple; `backward` gets one upstream gradient per output and returns one
    gradient per input. Differentiating the gradient again raises `NotImplementedError`.
    """

    @jax.custom_gradient
    def wrapped(*inputs):
        outputs, backward = function(*inputs)

        def vjp(upstream):
            grads = backward(*upstream)
            return tuple(_first_order_only(tuple(grads)))

        return tuple(outputs), vjp

    return wrapped


def searchsorted(sorted_rows, values, side: str = "left"):
    """`[rows, k]` int32 insertion indices of `values` `[rows, k]` in `sorted_rows` `[rows, n]`."""
    search = jax.vmap(lambda row, v: jnp.searchsorted(row, v, side=side))
    return search(sorted_rows, values).astype(jnp.int32)


def flushed_exp(x):
    """`exp(x)`; its CPU kernels already flush subnormal results to zero."""
    return jnp.exp(x)


def float64_available() -> bool:
    return bool(jax.config.jax_enable_x64)


def bitcast(x, dtype: str):
    """The bits of `x` read as `dtype`, a type of the same width."""
    return jax.lax.bitcast_convert_type(x, dtype)


def counts_faster(n: int | None) -> bool:
    """Whether an exact split of rows of `n` entries should count instead of sorting: on
    CPUs, where XLA's argsort of 16 x 20000 float32 took 47 ms and a pass that counts
    0.1 ms."""
    return jax.default_backend() == "cpu"


def accurate_sum(x, axis: int, keepdims: bool = False):
    """Sum along `axis`; float32 accumulated in float64 where `jax_enable_x64` is on, in
    blocks otherwise (XLA's CPU reductions add sequentially)."""
    if x.dtype in (jnp.float32, jnp.float16, jnp.bfloat16):
        if float64_available():
            return jnp.sum(x.astype(jnp.float64), axis=axis, keepdims=keepdims).astype(x.dtype)
        return blockwise_sum(x.astype(jnp.float32), axis, keepdims).astype(x.dtype)
    return jnp.sum(x, axis=axis, keepdims=keepdims)
