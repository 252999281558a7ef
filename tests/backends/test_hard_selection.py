"""The hard selection behind the `hard_objective` metric (`QuantileObjectiveModel`, the
`QuantileObjective` loss and `HardQuantileObjective`), under the active Keras backend: the
same buckets as numpy's stable argsort, with ties, padding and short rows."""

import math

import keras
import numpy as np
import pytest
from harness import to_numpy
from hypothesis import given
from hypothesis import strategies as st

from keras_softquantile.models import _selection


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
    levels = draw(st.sampled_from([2, 3, 1000]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if levels == 1000:
        scores = rng.standard_cauchy((rows, n)) * 10.0 ** rng.integers(-3, 30)
    else:
        scores = rng.integers(0, levels, (rows, n)).astype("float64")
    valid = rng.random((rows, n)) > draw(st.sampled_from([0.0, 0.3, 0.9]))
    values = rng.standard_normal((rows, n))
    quantile = draw(st.sampled_from([0.1, 0.25, 0.3, 0.5]))
    return values.astype("float32"), scores.astype("float32"), valid, quantile


@given(batches())
def test_masks_are_the_stable_argsort_buckets(batch):
    values, scores, valid, quantile = batch
    _, (low, high) = _selection.hard_selection(
        keras.ops.convert_to_tensor(values),
        keras.ops.convert_to_tensor(scores),
        keras.ops.convert_to_tensor(valid),
        quantile=quantile,
        output="weights",
    )
    low, high = to_numpy(low), to_numpy(high)
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
