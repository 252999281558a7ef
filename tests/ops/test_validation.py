"""Bad public arguments fail with a clear error naming the argument and echoing the value.

One parametrised test per rule of `keras_softquantile.ops._validation` (issue 11, point 5):
empty selection axis, non-flat levels, ragged nested lists, non-numbers as levels, shape
mismatches inside `tf.function`, and an `epsilon` below the dtype's minimum.
"""

import re

import numpy as np
import pytest
import tensorflow as tf

from keras_softquantile import layers, ops
from keras_softquantile.ops import _validation

X = np.random.default_rng(11).standard_normal((2, 8)).astype("float32")

# Every public op, as `op(scores, **kwargs)`; `values` (where the op takes it) is the scores.
OPS = {
    "soft_quantile_masks": lambda s, **kw: ops.soft_quantile_masks(s, **kw),
    "soft_topk_mask": lambda s, **kw: ops.soft_topk_mask(s, 1, **kw),
    "soft_quantile_split": lambda s, **kw: ops.soft_quantile_split(s, s, **kw),
    "soft_sort": lambda s, **kw: ops.soft_sort(s, **kw),
    "soft_sort_with": lambda s, **kw: ops.soft_sort_with(s, s, **kw),
    "soft_rank": lambda s, **kw: ops.soft_rank(s, **kw),
    "soft_quantile": lambda s, **kw: ops.soft_quantile(s, 0.5, **kw),
    "perturbed_quantile_split": lambda s, **kw: ops.perturbed_quantile_split(s, s, seed=1, **kw),
}
# The name each op gives its scores argument in messages.
SCORES_NAME = {
    name: "x" if name in ("soft_sort", "soft_rank", "soft_quantile") else "scores" for name in OPS
}
# Ops whose output size does not need a static length along `axis`.
DYNAMIC_OPS = ["soft_quantile_masks", "soft_topk_mask", "soft_quantile_split"]


# Rule 1: an empty selection axis.


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("axis", [-1, 0])
def test_empty_selection_axis_is_a_value_error(op, axis):
    shape = (3, 0) if axis == -1 else (0, 3)
    name = SCORES_NAME[op]
    with pytest.raises(ValueError, match=rf"`{name}` must have at least one entry along `axis`"):
        OPS[op](np.zeros(shape, "float32"), axis=axis)


def test_empty_batch_is_still_accepted():
    # Only the selection axis must be non-empty: an empty batch gives an empty output.
    assert ops.soft_topk_mask(np.zeros((0, 5), "float32"), 1).shape == (0, 5)


@pytest.mark.parametrize("op", DYNAMIC_OPS)
def test_empty_selection_axis_of_dynamic_length_fails_in_function(op):
    spec = tf.TensorSpec([None, None], tf.float32)
    function = tf.function(lambda s: OPS[op](s), input_signature=[spec])
    name = SCORES_NAME[op]
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"`{name}` must have at least one"):
        function(tf.zeros([3, 0]))


def test_check_axis_length_echoes_the_shape_eagerly_and_in_function():
    with pytest.raises(ValueError, match=re.escape("Received: scores.shape=(3, 0), axis=-1")):
        _validation.check_axis_length(tf.zeros([3, 0]), -1)
    spec = tf.TensorSpec([None, None], tf.float32)
    checked = tf.function(
        lambda s: tf.reduce_sum(_validation.check_axis_length(s, 1, "x")), input_signature=[spec]
    )
    assert float(checked(tf.ones([2, 3]))) == 6.0
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"Received: x.shape=.*\[2 0\]"):
        checked(tf.zeros([2, 0]))


# Rule 2: levels must be flat.


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda v: ops.soft_quantile_masks(X, v), "quantiles"),
        (lambda v: ops.soft_quantile(X, v), "q"),
        (lambda v: layers.SoftQuantileMasks(v), "quantiles"),
        (lambda v: layers.SoftQuantiles(v), "quantiles"),
    ],
)
@pytest.mark.parametrize(
    "levels, echo",
    [
        (np.array([[0.25, 0.75]]), "array([[0.25, 0.75]])"),
        ([[0.25, 0.75]], "[[0.25, 0.75]]"),
        ([[0.25], [0.5, 0.75]], "[[0.25], [0.5, 0.75]]"),
    ],
)
def test_nested_levels_are_a_value_error(call, name, levels, echo):
    with pytest.raises(ValueError, match=rf"`{name}` must be .*flat.*Received: {re.escape(name)}="):
        call(levels)
    with pytest.raises(ValueError, match=re.escape(f"Received: {name}={echo}")):
        call(levels)


# Rule 3: ragged nested lists as tensors.


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda r: ops.soft_topk_mask(r, 1), "scores"),
        (lambda r: ops.soft_quantile_masks(r), "scores"),
        (lambda r: ops.soft_quantile_split(r, r), "scores"),
        (lambda r: ops.soft_quantile_split(r, [[1.0, 2.0], [3.0, 4.0]]), "values"),
        (lambda r: ops.soft_sort(r), "x"),
        (lambda r: ops.soft_rank(r), "x"),
        (lambda r: ops.soft_quantile(r, 0.5), "x"),
        (lambda r: ops.soft_sort_with(r, [[1.0, 2.0], [3.0, 4.0]]), "values"),
        (lambda r: ops.perturbed_quantile_split(r, r), "scores"),
        (lambda r: ops.soft_topk_mask(np.ones((2, 2), "float32"), 1, mask=r), "mask"),
    ],
)
def test_ragged_nested_list_is_a_value_error(call, name):
    ragged = [[1.0, 2.0], [3.0]]
    if name == "mask":
        ragged = [[True, True], [True]]
    with pytest.raises(ValueError, match=rf"`{name}` must be a rectangular"):
        call(ragged)


# Rule 4: levels, quantile and k must be real numbers.


_LEVEL_CALLS = {
    "quantiles": lambda v: ops.soft_quantile_masks(X, v),
    "q": lambda v: ops.soft_quantile(X, v),
    "quantile": lambda v: ops.soft_quantile_split(X, X, v),
    "k": lambda v: ops.soft_topk_mask(X, v),
    "layer quantiles": lambda v: layers.SoftQuantiles(v),
    "layer quantile": lambda v: layers.SoftQuantileSplit(v),
}


@pytest.mark.parametrize("argument", sorted(_LEVEL_CALLS))
@pytest.mark.parametrize(
    "value", ["0.25", ["0.25"], True, [True], np.bool_(True), [np.bool_(False)], None, [0.25, None]]
)
def test_non_numbers_are_a_type_error(argument, value):
    name = argument.split()[-1]
    with pytest.raises(TypeError, match=rf"`{name}` must be .*Received: {name}="):
        _LEVEL_CALLS[argument](value)
    with pytest.raises(TypeError, match=re.escape(f"Received: {name}={value!r}")):
        _LEVEL_CALLS[argument](value)


@pytest.mark.parametrize("argument", sorted(_LEVEL_CALLS))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_levels_are_a_value_error(argument, value):
    name = argument.split()[-1]
    with pytest.raises(ValueError, match=re.escape(f"Received: {name}={value!r}")):
        _LEVEL_CALLS[argument](value)


@pytest.mark.parametrize(
    "call",
    [
        lambda: ops.soft_quantile_masks(X, np.array([0.25, 0.75], "float32")),
        lambda: ops.soft_quantile_masks(X, [np.float64(0.25), 0.75]),
        lambda: ops.soft_quantile(X, np.float32(0.5)),
        lambda: ops.soft_quantile(X, tf.constant([0.25, 1.0])),
        lambda: ops.soft_quantile_split(X, X, np.float64(0.25)),
        lambda: ops.soft_topk_mask(X, np.int64(2)),
    ],
)
def test_numpy_and_eager_numbers_are_accepted(call):
    call()


# Rule 5: values/scores shape mismatch inside tf.function.


def _mismatch_function(downstream: bool, jit_compile: bool = False):
    spec = tf.TensorSpec([None, None], tf.float32)

    def check(values, scores):
        checked, shapes_ok = _validation.check_same_shape(values, scores)
        if downstream:  # an op that fails with its own "broadcastable" message on a mismatch
            return tf.where(scores > 0, checked, tf.zeros_like(checked)), shapes_ok
        return checked, shapes_ok

    return tf.function(check, input_signature=[spec, spec], jit_compile=jit_compile)


@pytest.mark.parametrize(
    "call",
    [
        lambda v, s: ops.soft_quantile_split(v, s, output="mean"),
        lambda v, s: ops.perturbed_quantile_split(v, s, output="mean"),
        lambda v, s: ops.soft_sort_with(v, s),
    ],
)
@pytest.mark.parametrize("convert", [np.asarray, tf.constant])
def test_shape_mismatch_names_values_and_echoes_both_shapes(call, convert):
    text = "`values` and `scores` must have the same shape. Received: values.shape=(2, 7)"
    with pytest.raises(ValueError, match=re.escape(text)):
        call(convert(X[:, :7]), convert(X))


def test_shape_mismatch_in_function_raises_our_message_before_downstream_ops():
    function = _mismatch_function(downstream=True)
    values, _ = function(tf.zeros([2, 8]), tf.ones([2, 8]))
    assert values.shape == (2, 8)
    text = r"`values` and `scores` must have the same shape. Received: values.shape=.*\[2 7\]"
    for _ in range(5):  # the downstream op (SelectV2) must never win the race
        with pytest.raises(tf.errors.InvalidArgumentError, match=text):
            function(tf.zeros([2, 7]), tf.ones([2, 8]))


def test_check_same_shape_returns_shapes_ok():
    values, shapes_ok = _validation.check_same_shape(tf.zeros([2, 8]), tf.zeros([2, 8]))
    assert values.shape == (2, 8) and bool(shapes_ok)
    checked, ok = _mismatch_function(downstream=False)(tf.zeros([2, 8]), tf.zeros([2, 8]))
    assert checked.shape == (2, 8) and bool(ok)
    # XLA drops the assertion: the flag is what lets the caller poison its output.
    _, ok = _mismatch_function(downstream=False, jit_compile=True)(
        tf.zeros([2, 7]), tf.zeros([2, 8])
    )
    assert not bool(ok)
    _, ok = _mismatch_function(downstream=False, jit_compile=True)(
        tf.zeros([2, 8]), tf.zeros([2, 8])
    )
    assert bool(ok)


@pytest.mark.parametrize("op", ["soft_quantile_split", "perturbed_quantile_split"])
def test_op_shape_mismatch_in_function_raises_our_message(op):
    # Relies on the op using the `values` that `check_same_shape` returns (Prepared.values).
    spec = tf.TensorSpec([None, None], tf.float32)
    call = getattr(ops, op)
    function = tf.function(lambda v, s: call(v, s, output="mean"), input_signature=[spec, spec])
    for _ in range(5):
        with pytest.raises(tf.errors.InvalidArgumentError, match="`values` and `scores` must"):
            function(tf.zeros([2, 7]), tf.ones([2, 8]))


# Rule 6: epsilon below 8 machine epsilons of the compute dtype.


@pytest.mark.parametrize(
    "dtype, epsilon, compute",
    [
        ("float32", 1e-40, "float32"),
        ("float32", 5e-7, "float32"),
        ("float16", 5e-7, "float32"),
        ("bfloat16", 1e-9, "float32"),
        ("float64", 1e-16, "float64"),
        ("float64", 1e-300, "float64"),
    ],
)
@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("op", ["soft_topk_mask", "soft_rank"])
def test_epsilon_below_the_dtype_minimum_is_a_value_error(dtype, epsilon, compute, as_tensor, op):
    minimum = 8 * np.finfo(compute).eps
    value = tf.constant(epsilon, tf.float64) if as_tensor else epsilon
    text = rf"`epsilon` is too small for {compute}.*>= {minimum:.4g}.*Received: epsilon={epsilon!r}"
    with pytest.raises(ValueError, match=text):
        OPS[op](tf.cast(X, dtype), epsilon=value)


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_epsilon_at_the_minimum_gives_finite_masks(dtype):
    minimum = _validation.epsilon_minimum(dtype)
    assert minimum == 8 * np.finfo("float64" if dtype == "float64" else "float32").eps
    masks = ops.soft_quantile_masks(tf.cast(X, dtype), epsilon=minimum)
    assert np.isfinite(masks.numpy()).all()


@pytest.mark.parametrize("epsilon", [5e-7, 1e-30])
def test_epsilon_below_the_minimum_fails_in_function(epsilon):
    function = tf.function(lambda e: ops.soft_topk_mask(X, 2, epsilon=e))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`epsilon` is too small for float32"):
        function(tf.constant(epsilon, tf.float64))


@pytest.mark.parametrize(
    "epsilon, dtype, ok",
    [
        (1e-2, tf.float32, True),
        (1e-6, tf.float32, True),
        (5e-7, tf.float32, False),
        (5e-7, tf.float16, False),  # half precision is solved in float32
        (5e-7, tf.float64, True),
        (1e-16, tf.float64, False),
        (0.0, tf.float32, False),
        (-0.01, tf.float32, False),
        (float("nan"), tf.float32, False),
        (float("inf"), tf.float64, False),
        (1e300, tf.float32, False),  # overflows the compute dtype
    ],
)
@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_epsilon_ok(epsilon, dtype, ok, mode):
    def flag(e):
        return _validation.epsilon_ok(e, dtype)

    if mode == "xla":
        flag = tf.function(flag, jit_compile=True)
    assert bool(flag(tf.constant(epsilon, tf.float64))) is ok


@pytest.mark.parametrize(
    "cls, kwargs",
    [(layers.SoftTopK, {"k": 2}), (layers.SoftSort, {}), (layers.SoftQuantiles, {})],
)
def test_layer_epsilon_below_the_minimum_fails_at_construction(cls, kwargs):
    with pytest.raises(ValueError, match=r"too small for float32.*Received: epsilon=5e-07"):
        cls(epsilon=5e-7, **kwargs)
    with pytest.raises(ValueError, match=r"too small for float32.*Received: epsilon=5e-07"):
        cls(epsilon=5e-7, dtype="mixed_float16", **kwargs)
    layer = cls(epsilon=5e-7, dtype="float64", **kwargs)  # fine in float64
    layer.build((None, 4))
    with pytest.raises(ValueError, match=r"too small for float64.*Received: epsilon=1e-16"):
        layer.set_epsilon(1e-16)


# Other argument gaps.


@pytest.mark.parametrize("axis", [np.int64(1), np.int32(-1)])
def test_numpy_int_axis_is_accepted(axis):
    ops.soft_topk_mask(X, 2, axis=axis)
    layer = layers.SoftSort(axis=axis)
    assert type(layer.axis) is int and layer.get_config()["axis"] == int(axis)


@pytest.mark.parametrize("axis", [True, np.bool_(True), 1.0, "1"])
def test_non_int_axis_is_a_type_error(axis):
    with pytest.raises(TypeError, match=re.escape(f"Received: axis={axis!r}")):
        ops.soft_topk_mask(X, 2, axis=axis)
    with pytest.raises(TypeError, match=re.escape(f"Received: axis={axis!r}")):
        layers.SoftSort(axis=axis)


def test_numpy_bool_flags_are_accepted():
    layer = layers.SoftSort(descending=np.bool_(True))
    assert layer.descending is True


@pytest.mark.parametrize(
    "mask, error, text",
    [
        (np.ones((2, 8), "int32"), TypeError, "mask.dtype=int32"),
        (np.ones((2, 8), "float32"), TypeError, "mask.dtype=float32"),
        (np.ones((2, 7), bool), ValueError, "mask.shape=(2, 7)"),
    ],
)
def test_bad_mask_names_the_mask(mask, error, text):
    with pytest.raises(error, match=re.escape(text)):
        ops.soft_topk_mask(X, 2, mask=mask)


def test_mask_shape_mismatch_in_function_raises_our_message():
    spec = tf.TensorSpec([None, None], tf.float32)
    mask_spec = tf.TensorSpec([None, None], tf.bool)
    function = tf.function(
        lambda s, m: _validation.check_mask(m, s), input_signature=[spec, mask_spec]
    )
    assert function(tf.zeros([2, 8]), tf.ones([2, 8], tf.bool)).shape == (2, 8)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`mask` must have the same shape"):
        function(tf.zeros([2, 8]), tf.ones([2, 7], tf.bool))


@pytest.mark.parametrize("solver", [["auto"], None, np.array(["auto", "newton"])])
def test_non_string_solver_is_a_value_error(solver):
    with pytest.raises(ValueError, match="Received: solver="):
        ops.soft_topk_mask(X, 2, solver=solver)
    with pytest.raises(ValueError, match="Received: solver="):
        layers.SoftSort(solver=solver)


@pytest.mark.parametrize(
    "scores, error, text",
    [
        (tf.ragged.constant([[1.0, 2.0], [3.0]]), TypeError, "`scores` must be a dense tensor"),
        ([[1.0, None]], TypeError, "`scores` must be a numeric tensor"),
    ],
)
def test_non_dense_scores_name_the_scores(scores, error, text):
    with pytest.raises(error, match=re.escape(text)):
        ops.soft_topk_mask(scores, 1)
