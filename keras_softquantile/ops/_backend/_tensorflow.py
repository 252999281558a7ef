"""The TensorFlow backend: graph assertions, in-graph XLA clusters, `tf.custom_gradient`."""

from __future__ import annotations

import tensorflow as tf

from keras_softquantile.ops._backend._common import SECOND_ORDER_MESSAGE

# Inside traced graphs the solver's stages run as XLA clusters: each pass over the data fuses
# into one loop instead of running kernel by kernel, while the warm-start sort (for many
# targets) stays on TensorFlow's faster CPU sort. Eager calls run op by op (no per-shape
# compilation). Set to False to run every stage op by op.
COMPILE_SOLVER_LOOP = True


def values_available(*tensors) -> bool:
    """Whether the values can be read now (eager execution), so a failed check can raise."""
    return tf.executing_eagerly()


def assert_that(condition, data: list) -> list:
    """A graph assertion (an `InvalidArgumentError` at run time) inside `tf.function`; nothing
    eagerly (the caller raised already). XLA drops it: the caller also poisons rows."""
    if tf.executing_eagerly():
        return []
    return [tf.debugging.Assert(condition, data)]


def with_dependencies(x, assertions: list):
    """`x`, computed after `assertions` have run."""
    if not assertions:
        return x
    with tf.control_dependencies(assertions):
        return tf.identity(x)


def compiled_stage(function):
    """`function`, run as one XLA cluster when called inside a traced graph."""
    compiled = tf.function(function, jit_compile=True, reduce_retracing=True)

    def dispatch(*args):
        if COMPILE_SOLVER_LOOP and not tf.executing_eagerly():
            return compiled(*args)
        return function(*args)

    return dispatch


def _refuse_second_order(*gradients):
    @tf.custom_gradient
    def refuse(*values):
        def second_order(*_):
            raise NotImplementedError(SECOND_ORDER_MESSAGE)

        return tuple(tf.identity(v) for v in values), second_order

    return refuse(*gradients)


def custom_gradient(function):
    """`function(*inputs) -> (outputs, backward)`, differentiated by `backward(*upstream)`.

    `outputs` is a tuple; `backward` gets one upstream gradient per output (None where an
    output is not used) and returns one gradient per input. Differentiating the gradient
    again raises `NotImplementedError`.
    """

    @tf.custom_gradient
    def wrapped(*inputs):
        outputs, backward = function(*inputs)

        def gradient(*upstream):
            grads = backward(*upstream)
            return _refuse_second_order(*grads)

        return tuple(outputs), gradient

    return wrapped


def searchsorted(sorted_rows, values, side: str = "left"):
    """`[rows, k]` int32 insertion indices of `values` `[rows, k]` in `sorted_rows` `[rows, n]`."""
    return tf.searchsorted(sorted_rows, values, side=side, out_type=tf.int32)


def accurate_sum(x, axis: int, keepdims: bool = False):
    """Sum along `axis`; float32 (and narrower) accumulated in float64 (the cast fuses into
    the reduction under XLA, whose CPU reductions otherwise add sequentially)."""
    if x.dtype in (tf.float32, tf.float16, tf.bfloat16):
        return tf.cast(tf.reduce_sum(tf.cast(x, tf.float64), axis, keepdims=keepdims), x.dtype)
    return tf.reduce_sum(x, axis, keepdims=keepdims)


def float64_available() -> bool:
    return True
