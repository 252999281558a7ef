"""The hard selection behind the `hard_objective` metric (`QuantileObjectiveModel`, the
`QuantileObjective` loss and `HardQuantileObjective`), under the active Keras backend: the
same buckets as numpy's stable argsort, with ties, padding and short rows, whether the masks
come from a sort or from counting (the form used where sorting is slow: XLA on CPUs)."""

import math

import keras
import numpy as np
import pytest
from harness import to_numpy
from hypothesis import given
from hypothesis import strategies as st

from keras_softquantile.models import _selection
from keras_softquantile.ops._backend import float64_available


def reference_masks(scores: np.ndarray, valid: np.ndarray, quantile: float):
    """Ranks by numpy's stable argsort (padding last): lower bucket ranks < k, upper bucket
    ranks >= count - k, with k = floor(quantile * count)."""
    key = np.where(valid, scores, np.inf)
    ranks = np.argsort(np.argsort(key, axis=-1, kind="stable"), axis=-1, kind="stable")
    count = valid.sum(axis=-1, keepdims=True)
    k = np.floor(quantile * count + 1e-9).astype(int)
    return ranks < k, (ranks >= count - k) & valid


@st.composite
def batches(draw):
    """Rows of scores with many ties (a few distinct levels, or a wide heavy-tailed range),
    NaN padding at random places, and short or empty rows."""
    rows = draw(st.integers(1, 4))
    n = draw(st.integers(1, 24))
    levels = draw(st.sampled_from([2, 3, 1000, 0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if levels == 1000:
        scores = rng.standard_cauchy((rows, n)) * 10.0 ** rng.integers(-3, 25)
    elif levels == 0:  # signed zeros, near overflow, tiny, both signs
        choices = np.array([0.0, -0.0, 3e38, -3e38, 1e-30, -1e-30, 1.0, -1.0])
        scores = rng.choice(choices, (rows, n))
    else:
        scores = rng.integers(0, levels, (rows, n)).astype("float64") - 1
    valid = rng.random((rows, n)) > draw(st.sampled_from([0.0, 0.3, 0.9]))
    quantile = draw(st.sampled_from([0.1, 0.25, 0.3, 0.5]))
    return scores.astype("float32"), valid, quantile


def _masks(method: str, scores: np.ndarray, valid: np.ndarray, quantile: float):
    """The hard masks by `method`: "selection" (`hard_selection` as the model calls it),
    "sorting" or "counting"."""
    scores_t, valid_t = keras.ops.convert_to_tensor(scores), keras.ops.convert_to_tensor(valid)
    if method == "selection":
        _, masks = _selection.hard_selection(
            scores_t, scores_t, valid_t, quantile=quantile, output="weights"
        )
        return [to_numpy(m) for m in masks]
    largest = np.finfo(scores.dtype).max
    key = keras.ops.convert_to_tensor(np.where(valid, scores, largest))
    count = keras.ops.convert_to_tensor(valid.sum(-1, keepdims=True).astype("int32"))
    k = keras.ops.convert_to_tensor(
        np.floor(quantile * valid.sum(-1, keepdims=True) + 1e-9).astype("int32")
    )
    function = getattr(_selection, f"bucket_masks_by_{method}")
    return [to_numpy(m) for m in function(key, valid_t, k, count)]


@pytest.mark.parametrize("method", ["selection", "sorting", "counting"])
@given(batch=batches())
def test_masks_are_the_stable_argsort_buckets(method, batch):
    scores, valid, quantile = batch
    low, high = _masks(method, scores, valid, quantile)
    expected_low, expected_high = reference_masks(scores, valid, quantile)
    np.testing.assert_array_equal(low, expected_low)
    np.testing.assert_array_equal(high, expected_high)
    k = np.floor(quantile * valid.sum(-1) + 1e-9)
    np.testing.assert_array_equal(low.sum(-1), k)  # exact bucket sizes, ties or not
    np.testing.assert_array_equal(high.sum(-1), k)


@pytest.mark.parametrize("output", ["mean", "sorted"])
def test_objective_forms_follow_the_masks(output, rng):
    scores = rng.integers(0, 4, (3, 12)).astype("float32")  # ties
    values = rng.standard_normal((3, 12)).astype("float32")
    valid = np.ones_like(scores, dtype=bool)
    (low, high), _ = _selection.hard_selection(
        keras.ops.convert_to_tensor(values),
        keras.ops.convert_to_tensor(scores),
        keras.ops.convert_to_tensor(valid),
        quantile=0.25,
        output=output,
    )
    low_mask, high_mask = reference_masks(scores, valid, 0.25)
    order = np.argsort(scores, axis=-1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=-1)
    k = math.floor(0.25 * 12)
    if output == "mean":
        expected = [(values * m).sum(-1) / m.sum(-1) for m in (low_mask, high_mask)]
    else:
        expected = [ordered[:, :k], ordered[:, -k:]]
    np.testing.assert_allclose(to_numpy(low), expected[0], rtol=1e-6)
    np.testing.assert_allclose(to_numpy(high), expected[1], rtol=1e-6)


@pytest.mark.skipif(not float64_available(), reason="float64 needs jax_enable_x64 on JAX")
@pytest.mark.parametrize("method", ["sorting", "counting"])
def test_float64_keys_that_float32_would_tie(method):
    scores = np.array([[1.0 + 2e-16 * i for i in (3, 1, 2, 0, 5, 4, 7, 6)]])
    valid = np.ones_like(scores, dtype=bool)
    low, high = _masks(method, scores, valid, 0.25)
    np.testing.assert_array_equal(low[0], [0, 1, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(high[0], [0, 0, 0, 0, 0, 0, 1, 1])


def _graph_ops(graph_def) -> tuple[set, bool]:
    """The op types of a graph and its functions, and whether any call is compiled by XLA."""
    bodies = [graph_def.node, *(function.node_def for function in graph_def.library.function)]
    nodes = [node for body in bodies for node in body]
    compiled = any(
        "_XlaMustCompile" in node.attr and node.attr["_XlaMustCompile"].b for node in nodes
    )
    return {node.op for node in nodes}, compiled


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's graphs")
@pytest.mark.parametrize(
    "where, n, counted",
    [("xla", 50, True), ("graph", 50, False), ("graph", 600, True), ("eager", 600, False)],
)
def test_on_cpus_long_rows_and_xla_count_instead_of_sorting(where, n, counted, rng):
    """XLA's CPU sort is slow, and TensorFlow's is slower than one XLA cluster that counts
    on rows of 512 entries or more (see `_backend.counts_faster`); eagerly TensorFlow sorts."""
    import tensorflow as tf

    if tf.config.list_logical_devices("GPU"):
        pytest.skip("sorts are fast on GPUs: the masks are sorted there")
    scores = rng.integers(0, 5, (4, n)).astype("float32")  # ties
    valid = rng.random((4, n)) > 0.2

    def masks(s, v):
        return _selection.hard_selection(s, s, v, quantile=0.25, output="weights")[1]

    if where == "eager":
        low, high = masks(tf.constant(scores), tf.constant(valid))
    else:
        function = tf.function(masks, jit_compile=where == "xla")
        low, high = function(scores, valid)
        spec = [tf.TensorSpec(scores.shape, tf.float32), tf.TensorSpec(valid.shape, tf.bool)]
        graph_def = function.get_concrete_function(*spec).graph.as_graph_def()
        op_types, compiled = _graph_ops(graph_def)
        # TensorFlow's argsort is a TopKV2 over the whole row.
        assert ("TopKV2" not in op_types) == counted
        # Under `jit_compile=True` the stage is inlined; in a graph it is its own cluster.
        assert compiled == (where == "graph" and counted)
    expected_low, expected_high = reference_masks(scores, valid, 0.25)
    np.testing.assert_array_equal(low.numpy(), expected_low)
    np.testing.assert_array_equal(high.numpy(), expected_high)


@pytest.mark.parametrize("output", ["weights", "mean", "sorted"])
def test_a_nan_score_makes_its_rows_objective_nan(output, rng):
    """Under XLA (a NaN theta) nothing raises: the hard objective of a row with a NaN score
    must be NaN, not a plausible number; the other rows keep theirs."""
    scores = rng.standard_normal((3, 12)).astype("float32")
    scores[1, 5] = np.nan
    values = rng.standard_normal((3, 12)).astype("float32")
    valid = np.ones_like(scores, dtype=bool)
    pair, _ = _selection.hard_selection(
        keras.ops.convert_to_tensor(values),
        keras.ops.convert_to_tensor(scores),
        keras.ops.convert_to_tensor(valid),
        quantile=0.25,
        output=output,
    )
    if output == "weights":
        pair = [p.mean() for p in pair]
    elif output == "sorted":
        pair = [keras.ops.mean(p, axis=-1) for p in pair]
    spread = to_numpy(pair[1]) - to_numpy(pair[0])
    assert np.isnan(spread[1])
    assert np.isfinite(spread[[0, 2]]).all()
