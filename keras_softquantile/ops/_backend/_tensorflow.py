"""The TensorFlow backend: graph assertions, in-graph XLA clusters, `tf.custom_gradient`."""

from __future__ import annotations

import functools
import threading

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.ops import control_flow_util  # XLA context: no public API

from keras_softquantile.ops._backend._common import SECOND_ORDER_MESSAGE, CompiledCache

# Inside traced graphs the solver's stages run as XLA clusters: each pass over the data fuses
# into one loop instead of running kernel by kernel, while the warm-start sort (for many
# targets) stays on TensorFlow's faster CPU sort. Eager calls run op by op (no per-shape
# compilation). Set to False to run every stage op by op.
COMPILE_SOLVER_LOOP = True

# Inside traced graphs that are not compiled as a whole (`fit` without XLA on CPUs and under
# `tf.distribute`), each selection op also runs as one XLA cluster, forward and backward, with
# its run-time checks hoisted out of the cluster, where they can still fail. Set to False to
# keep only the solver's stages compiled.
COMPILE_WHOLE_OPS = True

# Assertions made while a whole op is traced into a cluster (`compiled_op`), innermost last.
_hoisted = threading.local()


def values_available(*tensors) -> bool:
    """Whether the values can be read now (eager execution), so a failed check can raise."""
    return tf.executing_eagerly()


def assert_that(condition, data: list) -> list:
    """A graph assertion (an `InvalidArgumentError` at run time) inside `tf.function`; nothing
    eagerly (the caller raised already). XLA drops it: the caller also poisons rows."""
    if tf.executing_eagerly():
        return []
    stack = getattr(_hoisted, "stack", None)
    if stack:  # inside `compiled_op`'s cluster: made after it, on its outputs
        stack[-1].append((condition, list(data)))
        return []
    return [tf.debugging.Assert(condition, data)]


def with_dependencies(x, assertions: list):
    """`x`, computed after `assertions` have run."""
    if not assertions:
        return x
    with tf.control_dependencies(assertions):
        return tf.identity(x)


# XLA on CPUs solves dense linear systems far slower than TensorFlow's own kernels (256
# systems of 99 x 99 in float64: 475 ms against 13 ms, measured 2026-12-01), and Newton makes
# one such solve per step once there are more than 3 targets. A stage whose solve is large next
# to its pass over the data therefore runs op by op on CPU-only machines: more than
# `XLA_SOLVE_MAX_BOUNDARIES` boundaries with fewer than `XLA_SOLVE_MIN_ENTRIES_PER_TARGET`
# entries per target. Measured (256 rows, float64, Newton in a graph, XLA stage against op by
# op, in one run): n = 1000 entries, m = 32 targets 735 / 1637 ms, m = 64 2199 / 3663 ms;
# n = 100, m = 16 84 / 111 ms, m = 32 548 / 205 ms, m = 64 618 / 348 ms; `soft_rank` of
# 256 x 100 (m = 100) 4268 / 535 ms.
XLA_SOLVE_MAX_BOUNDARIES = 16
XLA_SOLVE_MIN_ENTRIES_PER_TARGET = 8


@functools.cache
def _cpu_only() -> bool:
    return not tf.config.list_logical_devices("GPU")


def _xla_solve_pays(n: int | None, m: int) -> bool:
    """Whether a stage with `m` targets over rows of `n` entries pays as an XLA cluster."""
    if m - 1 <= XLA_SOLVE_MAX_BOUNDARIES or not _cpu_only():
        return True
    return n is not None and n >= XLA_SOLVE_MIN_ENTRIES_PER_TARGET * m


def compiled_stage(function, transport_shape=None):
    """`function`, run as one XLA cluster when called inside a traced graph.

    `transport_shape`, when given, maps the stage's arguments to `(n, m)` (entries per row,
    targets): on CPUs, a stage whose dense solve would dominate runs op by op instead (see
    `XLA_SOLVE_MAX_BOUNDARIES`).
    """
    compiled = tf.function(function, jit_compile=True, reduce_retracing=True)

    def dispatch(*args):
        if not COMPILE_SOLVER_LOOP or tf.executing_eagerly() or _in_xla_context():
            # Inside a graph that XLA compiles whole (`jit_compile=True`), a nested XLA
            # function must not be made: TensorFlow then treats the gradient's inputs as
            # compile-time constants and compiles the whole function again for every new
            # input value (0.6 s per call of `soft_topk_mask`'s gradient on [16, 64]).
            return function(*args)
        if transport_shape is None or _xla_solve_pays(*transport_shape(*args)):
            return compiled(*args)
        return function(*args)

    return dispatch


def compiled_op(function):
    """`function` (a whole op), run as one XLA cluster when called inside a traced graph.

    Tensor arguments (numpy arrays and variables included) become the cluster's inputs, and
    everything else (Python numbers, strings, None) is fixed when it is traced. The run-time
    checks that the op makes while it is traced (`assert_that`) are collected instead of being
    dropped by XLA: their conditions and tensor data leave the cluster as extra outputs, and
    the assertions are made on them outside it, so a broken promise is still an
    `InvalidArgumentError` in a graph. Eagerly, inside another whole-op cluster, and with
    `COMPILE_WHOLE_OPS` off, it is `function` itself.
    """
    cache = CompiledCache()

    @functools.wraps(function)
    def dispatch(*args, **kwargs):
        if (
            not COMPILE_WHOLE_OPS
            or tf.executing_eagerly()
            or getattr(_hoisted, "stack", None)
            or _in_xla_context()
        ):
            return function(*args, **kwargs)
        leaves = tf.nest.flatten((args, kwargs))
        is_tensor = [_is_tensor_like(x) for x in leaves]
        tensors = [tf.convert_to_tensor(x) for x, t in zip(leaves, is_tensor, strict=True) if t]
        shapes = [t.shape for t in tensors if t.shape.rank != 0]
        if any(s.rank is None or None in s.as_list()[1:] for s in shapes):
            # A length known only at run time: the checks must run before the solver (an
            # empty axis would not compile), so the op runs stage by stage.
            return function(*args, **kwargs)
        static = [None if t else x for x, t in zip(leaves, is_tensor, strict=True)]
        structure = tf.nest.map_structure(lambda _: 0, (args, kwargs))
        # One traced function per signature, shapes and dtypes included: each trace has its
        # own assertions (a dynamic batch adds some), so a function traced twice could pair
        # one trace's outputs with the other's message templates.
        signature = tuple(tf.TensorSpec(t.shape, t.dtype) for t in tensors)
        key = (repr(structure), tuple(_static_key(x) for x in static), tuple(is_tensor), signature)
        compiled, templates = cache.get(
            key, lambda: _hoisting_cluster(function, structure, static, is_tensor, signature)
        )

        def clustered():
            outputs, conditions, data = compiled(*tensors)
            assertions = [
                tf.debugging.Assert(
                    condition, [data[p] if isinstance(p, int) else p for p in parts]
                )
                for condition, parts in zip(conditions, templates, strict=True)
            ]
            if not assertions:
                return outputs
            return tf.nest.map_structure(
                lambda t: with_dependencies(t, assertions) if tf.is_tensor(t) else t, outputs
            )

        leading = [s[0] for s in shapes]
        if None not in leading:
            if len(set(leading)) <= 1 and all(d > 0 for d in leading):
                return clustered()
            return function(*args, **kwargs)  # empty, or mismatched: the op's own errors
        # Batch sizes known only at run time: the cluster runs when they agree and are not
        # zero; otherwise the op runs stage by stage and its own checks say what is wrong.
        sizes = [tf.shape(t)[0] for t in tensors if t.shape.rank]
        usable = tf.reduce_all(
            tf.stack([size > 0 for size in sizes] + [tf.equal(size, sizes[0]) for size in sizes])
        )
        return tf.cond(usable, clustered, lambda: function(*args, **kwargs))

    dispatch.compiled_cache = cache
    return dispatch


def _hoisting_cluster(function, structure, static: list, is_tensor: list, signature: tuple):
    """The XLA function of `compiled_op` for one combination of static arguments and one input
    signature (traced once), and the list that its trace fills with the assertions' message
    templates (a tensor's position in the data outputs, or a constant)."""
    templates: list = []

    def cluster(*tensors):
        remaining = iter(tensors)
        filled = [next(remaining) if t else x for x, t in zip(static, is_tensor, strict=True)]
        args, kwargs = tf.nest.pack_sequence_as(structure, filled)
        stack = _hoisted.__dict__.setdefault("stack", [])
        stack.append([])
        try:
            outputs = function(*args, **kwargs)
        finally:
            collected = stack.pop()
        templates.clear()
        conditions, data = [], []
        for condition, parts in collected:
            template = []
            for part in parts:
                if tf.is_tensor(part):
                    template.append(len(data))
                    data.append(part)
                else:
                    template.append(part)
            templates.append(template)
            conditions.append(condition)
        return outputs, conditions, data

    return tf.function(cluster, input_signature=signature, jit_compile=True), templates


def _in_xla_context() -> bool:
    """Whether the graph being built is compiled whole by XLA (`jit_compile=True`, as in
    `fit`): the op then needs no cluster of its own, and a run-time branch around one would
    not compile (its gradient's shapes are not constants inside XLA)."""
    graph = tf.compat.v1.get_default_graph()
    return bool(control_flow_util.GraphOrParentsInXlaContext(graph))


def _is_tensor_like(value) -> bool:
    return tf.is_tensor(value) or isinstance(value, np.ndarray | tf.Variable | keras.Variable)


def _static_key(value):
    """A hashable stand-in for a non-tensor argument (part of `compiled_op`'s cache key)."""
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


def _refuse_second_order(*gradients):
    """The gradients (None kept: an input without one), as values whose own gradient raises."""

    @tf.custom_gradient
    def refuse(*values):
        def second_order(*_):
            raise NotImplementedError(SECOND_ORDER_MESSAGE)

        return tuple(tf.identity(v) for v in values), second_order

    present = [g for g in gradients if g is not None]
    refused = iter(refuse(*present) if present else ())
    return tuple(None if g is None else next(refused) for g in gradients)


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


def flushed_exp(x):
    """`exp(x)`; its CPU kernels already flush subnormal results to zero."""
    return tf.exp(x)


def float64_available() -> bool:
    return True


def bitcast(x, dtype: str):
    """The bits of `x` read as `dtype`, a type of the same width."""
    return tf.bitcast(x, dtype)


# Rows at least this long are split by counting, in an XLA cluster, inside graphs on CPU-only
# machines: TensorFlow's sort against the counting cluster (`models/_selection.py`), float32,
# measured 2026-12-01 in one run: 16 x 200 0.23 / 0.29 ms, 16 x 500 0.52 / 0.42 ms,
# 16 x 2000 1.78 / 0.80 ms, 256 x 1000 6.4 / 3.6 ms, 1 x 20000 1.5 / 0.54 ms.
COUNTING_MIN_ENTRIES = 512


def counts_faster(n: int | None) -> bool:
    """Whether an exact split of rows of `n` entries should count, in a `compiled_stage`,
    instead of sorting: in a graph on a CPU-only machine, always under XLA (its CPU argsort of
    16 x 20000 float32 took 47 ms, TensorFlow's own 9.2 ms, a pass that counts 0.1 ms), and
    for static rows of at least `COUNTING_MIN_ENTRIES` entries otherwise. Eagerly the 33
    counting passes would run op by op: TensorFlow sorts."""
    if tf.executing_eagerly() or not _cpu_only():
        return False
    if _in_xla_context():
        return True
    return COMPILE_SOLVER_LOOP and n is not None and n >= COUNTING_MIN_ENTRIES
