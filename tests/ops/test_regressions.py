"""Plain regression tests, one per reproducer of issue 11 (the property suite generalises them:
tests/ops/test_properties.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tensorflow as tf

from keras_softquantile import ops


def hard_quantile_masks(x: np.ndarray, levels) -> np.ndarray:
    """Hard bucket memberships for distinct scores (fractional at fractional boundaries)."""
    n = x.shape[-1]
    ranks = np.argsort(np.argsort(x, axis=-1, kind="stable"), axis=-1, kind="stable")
    cuts = n * np.array([0.0, *levels, 1.0])
    overlap = np.minimum(ranks[..., None] + 1, cuts[1:]) - np.maximum(ranks[..., None], cuts[:-1])
    return np.clip(overlap, 0.0, 1.0)


def check_totals(x: tf.Tensor, levels, epsilon):
    masks, info = ops.soft_quantile_masks(x, levels, epsilon=epsilon, return_diagnostics=True)
    n = x.shape[-1]
    expected = n * np.diff([0.0, *levels, 1.0])
    totals = tf.reduce_sum(tf.cast(masks, tf.float64), axis=-2).numpy()
    tolerance = 1e-9 if x.dtype == tf.float64 else 1e-4 * n
    error = np.abs(totals - expected)
    worst = np.unravel_index(np.argmax(error), error.shape)
    assert np.all(error <= tolerance), (
        f"bucket totals off by up to {error.max():.3g} (tolerance {tolerance:.1g}) at "
        f"(row, bucket) {worst}: expected {expected.tolist()}, got {totals[worst[0]].tolist()}"
    )
    converged = info.converged.numpy()
    assert converged.all(), (
        f"unconverged rows {np.flatnonzero(~converged).tolist()}, marginal errors "
        f"{info.marginal_error.numpy()[~converged].tolist()}"
    )


# 1. Exact (fractional) bucket totals at small epsilon.


def test_three_entries_quartile_totals():
    check_totals(tf.constant([[0.0, 1.0, 2.0]], tf.float64), (0.25, 0.75), 1e-4)
    masks = ops.soft_quantile_masks(
        tf.constant([[0.0, 1.0, 2.0]], tf.float64), (0.25, 0.75), epsilon=1e-4
    )
    np.testing.assert_allclose(masks.numpy().sum(1), [[0.75, 1.5, 0.75]], atol=1e-9)


@pytest.mark.parametrize(
    ("dtype", "n", "epsilon"),
    [
        (tf.float32, 7, 1e-3),
        (tf.float32, 7, 1e-4),
        (tf.float64, 7, 1e-4),
        (tf.float64, 37, 1e-4),
    ],
)
def test_gaussian_rows_have_exact_fractional_totals(dtype, n, epsilon):
    x = tf.constant(np.random.default_rng(11).standard_normal((16, n)), dtype)
    check_totals(x, (0.25, 0.75), epsilon)


# 2. The selection follows the order of the scores, not their spread.


@pytest.mark.parametrize(
    ("row", "dtype", "expected"),
    [
        ([-1e30, 1, 2, 3, 1e30], tf.float64, [0, 0, 0, 1, 1]),
        ([-1e30, 1, 2, 3, 1e30], tf.float32, [0, 0, 0, 1, 1]),
        ([0, 1, 2, 3, 4, 5, 6, 1e9], tf.float32, [0, 0, 0, 0, 0, 0, 1, 1]),
        ([-3e38, 0, 3e38], tf.float32, [0, 1, 1]),
    ],
)
def test_outliers_select_the_hard_top_k(row, dtype, expected):
    mask = ops.soft_topk_mask(tf.constant([row], dtype), 2, epsilon=1e-5).numpy()
    np.testing.assert_allclose(mask[0], expected, atol=1e-3, err_msg=f"top-2 of {row}")


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_cubed_cauchy_rows_are_as_sharp_as_gaussian_rows(dtype):
    rng = np.random.default_rng(2024)
    levels = (0.25, 0.75)

    def mean_abs_difference(x):
        masks = ops.soft_quantile_masks(tf.constant(x, dtype), levels, epsilon=1e-3).numpy()
        return float(np.abs(masks - hard_quantile_masks(x, levels)).mean())

    heavy = mean_abs_difference(rng.standard_cauchy((32, 1000)) ** 3)
    gaussian = mean_abs_difference(rng.standard_normal((32, 1000)))
    assert heavy < 5e-3 and heavy <= 2 * gaussian, (
        f"cubed Cauchy MAD {heavy:.3g} vs Gaussian MAD {gaussian:.3g} (want < 5e-3 and <= 2x)"
    )


# 3. An outlier under tf.function / XLA in float32: finite, and like float64.

OUTLIER_ROW = [[-1e6, 0.0236, 0.1463, 0.0278, -0.0248, -0.1425, -0.0191, -0.0020]]


@pytest.mark.parametrize("op", ["soft_sort", "soft_rank"])
@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.slow
def test_outlier_row_is_finite_in_float32_graphs(op, jit_compile):
    function = getattr(ops, op)
    x32 = tf.constant(OUTLIER_ROW, tf.float32)
    got = tf.function(lambda a: function(a, epsilon=1e-4), jit_compile=jit_compile)(x32).numpy()
    assert np.all(np.isfinite(got)), f"{op} (jit_compile={jit_compile}) gave {got.tolist()}"
    reference = function(tf.constant(OUTLIER_ROW, tf.float64), epsilon=1e-4).numpy()
    np.testing.assert_allclose(got, reference, atol=1e-3, rtol=1e-6)


@pytest.mark.parametrize("op", ["soft_sort", "soft_rank"])
def test_outlier_row_gives_the_hard_sort_at_small_epsilon(op):
    # epsilon 1e-4 is far below the quantile-level gap 1/8: the hard sort / ranks.
    x = np.array(OUTLIER_ROW)
    got = getattr(ops, op)(tf.constant(x), epsilon=1e-4).numpy()
    hard = np.sort(x, -1) if op == "soft_sort" else np.argsort(np.argsort(x, -1), -1)
    np.testing.assert_allclose(got, hard, atol=1e-3, rtol=1e-6)


# 4. Non-finite rows and invalid epsilon under XLA; second-order gradients.


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_row_is_nan_alone_under_xla(bad):
    x = np.random.default_rng(4).standard_normal((3, 6))
    x[1, 2] = bad
    f = tf.function(lambda v: ops.soft_topk_mask(v, 2, epsilon=1e-2), jit_compile=True)
    got = f(tf.constant(x)).numpy()
    assert np.all(np.isnan(got[1])), f"the row holding {bad} gave {got[1].tolist()}, not NaN"
    clean = ops.soft_topk_mask(tf.constant(x[[0, 2]]), 2, epsilon=1e-2).numpy()
    assert np.all(np.isfinite(got[[0, 2]])), got
    np.testing.assert_allclose(got[[0, 2]], clean, atol=1e-12)


def test_negative_tensor_epsilon_under_xla_gives_nan():
    x = tf.constant(np.random.default_rng(5).standard_normal((2, 6)))
    f = tf.function(lambda v, e: ops.soft_topk_mask(v, 2, epsilon=e), jit_compile=True)
    got = f(x, tf.constant(-1e-2, tf.float64)).numpy()
    assert np.all(np.isnan(got)), (
        f"epsilon = -0.01 under XLA gave {got.tolist()} (sums {got.sum(-1)})"
    )


def test_hessian_vector_products_are_right_or_refused():
    rng = np.random.default_rng(6)
    x0 = rng.standard_normal((1, 6))
    w = tf.constant(rng.standard_normal((1, 6)))
    v = rng.standard_normal((1, 6))

    def grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(ops.soft_topk_mask(x, 2, epsilon=0.05) * w)
        return tape.gradient(loss, x)

    x = tf.constant(x0)
    try:
        with tf.GradientTape() as outer:
            outer.watch(x)
            g = grad(x)
        hvp = outer.gradient(g, x, output_gradients=tf.constant(v))
    except Exception as error:  # a refusal must say why
        message = str(error)
        assert re.search(r"second[- ]order", message, re.I) and re.search(
            r"not supported", message, re.I
        ), f"unexpected error: {type(error).__name__}: {message}"
        return
    h = 1e-5
    numeric = (grad(tf.constant(x0 + h * v)) - grad(tf.constant(x0 - h * v))).numpy() / (2 * h)
    assert hvp is not None, "the Hessian-vector product is None (silently disconnected)"
    error = np.linalg.norm(hvp.numpy() - numeric) / np.linalg.norm(numeric)
    assert error <= 1e-4, (
        f"Hessian-vector product off by {error:.3g} relative: got {hvp.numpy().tolist()}, "
        f"finite differences {numeric.tolist()}"
    )


# 5. Eager non-finite scores are refused, naming the argument.


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda x: ops.soft_topk_mask(x, 2), "scores"),
        (lambda x: ops.soft_quantile_masks(x), "scores"),
        (lambda x: ops.soft_quantile_split(tf.zeros_like(x), x), "scores"),
        (lambda x: ops.soft_sort(x), "x"),
        (lambda x: ops.soft_rank(x), "x"),
    ],
    ids=["soft_topk_mask", "soft_quantile_masks", "soft_quantile_split", "soft_sort", "soft_rank"],
)
def test_eager_non_finite_scores_raise_naming_the_argument(call, name, bad):
    x = np.random.default_rng(7).standard_normal((2, 6))
    x[1, 3] = bad
    with pytest.raises(ValueError, match=f"`{name}`"):
        call(tf.constant(x))
