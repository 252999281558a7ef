"""The `mask` argument of soft_rank, soft_sort and soft_sort_with: padding is invisible.

A row with v valid entries must give, for them, what the same row without its padding gives
(values and gradients, to rounding), padded entries get rank 0 / sorted positions >= v get 0,
and padded entries get zero gradient even when they hold NaN.
"""

from __future__ import annotations

import doctest

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_softquantile
from keras_softquantile import soft_rank, soft_sort, soft_sort_with
from keras_softquantile.ops import sorting

N = 9
COUNTS = (9, 5, 1, 3, 7)  # valid entries per row: full, interleaved padding, a single entry
# Agreement of the padded and unpadded computations (rounding, amplified a little by the
# solver's linear algebra in the gradients).
ATOL = {"float64": 1e-11, "float32": 2e-5}


def _rank(x, mask, descending=False, **options):
    return soft_rank(x, mask=mask, descending=descending, **options)


def _sort(x, mask, descending=False, **options):
    return soft_sort(x, mask=mask, descending=descending, **options)


def _sort_with(x, mask, descending=False, values=None, **options):
    # Values that are a smooth function of the scores, so their gradient reaches the scores.
    values = tf.sin(3 * x) if values is None else values
    return soft_sort_with(values, x, mask=mask, descending=descending, **options)


OPS = {"soft_rank": _rank, "soft_sort": _sort, "soft_sort_with": _sort_with}
# Whether output j belongs to entry j (ranks) or to sorted position j (sorts).
PER_ENTRY = {"soft_rank": True, "soft_sort": False, "soft_sort_with": False}


def padded_rows(rng, dtype: str, counts=COUNTS, n: int = N):
    """Distinct scores `[rows, n]` and a mask with `counts[r]` valid entries at random places."""
    x = rng.standard_normal((len(counts), n)).astype(dtype)
    mask = np.zeros((len(counts), n), bool)
    for row, count in enumerate(counts):
        mask[row, rng.choice(n, count, replace=False)] = True
    return x, mask


def value_and_gradient(fn, x, weights):
    """`fn(x)` and the gradient of `sum(fn(x) * weights)` with respect to `x`."""
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = fn(xt)
        total = tf.reduce_sum(y * weights)
    zero = tf.UnconnectedGradients.ZERO  # a one-entry row: nothing to rank against
    return y.numpy(), tape.gradient(total, xt, unconnected_gradients=zero).numpy()


def check_rows_match_unpadded(name, x, mask, descending, rng, **options):
    """Each row's output and gradient against the row without its padding."""
    op = OPS[name]
    weights = rng.standard_normal(x.shape).astype(x.dtype)
    out, grad = value_and_gradient(lambda t: op(t, mask, descending, **options), x, weights)
    atol = ATOL[x.dtype.name]
    for row in range(x.shape[0]):
        valid = mask[row]
        count = int(valid.sum())
        row_weights = weights[row][valid] if PER_ENTRY[name] else weights[row][:count]
        alone, alone_grad = value_and_gradient(
            lambda t: op(t, None, descending, **options), x[row][valid][None], row_weights[None]
        )
        got = out[row][valid] if PER_ENTRY[name] else out[row][:count]
        np.testing.assert_allclose(got, alone[0], rtol=0, atol=atol)
        scale = max(1.0, np.abs(alone_grad).max())
        np.testing.assert_allclose(grad[row][valid], alone_grad[0], rtol=0, atol=atol * scale)
        # Padded entries: rank 0, sorted positions past the valid count 0, no gradient.
        rest = out[row][~valid] if PER_ENTRY[name] else out[row][count:]
        np.testing.assert_array_equal(rest, 0)
        np.testing.assert_array_equal(grad[row][~valid], 0)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("descending", [False, True], ids=["ascending", "descending"])
@pytest.mark.parametrize("name", sorted(OPS))
def test_padded_rows_match_unpadded_rows(name, descending, dtype):
    rng = np.random.default_rng(7)
    x, mask = padded_rows(rng, dtype)
    for epsilon in (1e-3, 0.5):
        check_rows_match_unpadded(name, x, mask, descending, rng, epsilon=epsilon)


@pytest.mark.parametrize("name", sorted(OPS))
def test_sinkhorn_solver_with_padding(name):
    # Sinkhorn's column updates skip the zero-mass targets of the padding; with them placed
    # at infinity from the warm start, it converges as on the unpadded rows.
    rng = np.random.default_rng(8)
    x, mask = padded_rows(rng, "float64")
    check_rows_match_unpadded(name, x, mask, True, rng, epsilon=0.2, solver="sinkhorn")


def test_ranks_of_separated_entries_are_the_hard_ranks_among_valid_entries():
    rng = np.random.default_rng(9)
    x, mask = padded_rows(rng, "float64")
    ranks = soft_rank(x, mask=mask, epsilon=1e-4).numpy()
    descending = soft_rank(x, mask=mask, epsilon=1e-4, descending=True).numpy()
    for row in range(x.shape[0]):
        valid = mask[row]
        hard = np.argsort(np.argsort(x[row][valid]))
        np.testing.assert_allclose(ranks[row][valid], hard, atol=1e-8)
        np.testing.assert_allclose(descending[row][valid], valid.sum() - 1 - hard, atol=1e-8)
        ordered = soft_sort(x, mask=mask, epsilon=1e-4, descending=True).numpy()[row]
        np.testing.assert_allclose(ordered[: valid.sum()], np.sort(x[row][valid])[::-1])


def finite_differences(f, x, direction, h=1e-6):
    return (f(x + h * direction) - f(x - h * direction)) / (2 * h)


@pytest.mark.parametrize("name", sorted(OPS))
def test_masked_gradients_match_finite_differences(name):
    rng = np.random.default_rng(10)
    x, mask = padded_rows(rng, "float64")
    weights = rng.standard_normal(x.shape)
    op = OPS[name]

    def total(v):
        return float(tf.reduce_sum(op(tf.constant(v), mask, True, epsilon=0.2) * weights))

    _, grad = value_and_gradient(lambda t: op(t, mask, True, epsilon=0.2), x, weights)
    assert np.abs(grad).max() > 1e-2
    for _ in range(3):
        direction = rng.standard_normal(x.shape)
        numeric = finite_differences(total, x, direction)
        assert np.sum(grad * direction) == pytest.approx(numeric, rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("name", sorted(OPS))
def test_nan_in_padding_changes_nothing(name):
    rng = np.random.default_rng(11)
    x, mask = padded_rows(rng, "float64")
    weights = rng.standard_normal(x.shape)
    poisoned = np.where(mask, x, np.nan)
    options = {"epsilon": 0.1}
    if name == "soft_sort_with":  # NaN in the padded values too
        values = tf.constant(np.where(mask, np.cos(x), np.nan))
        options["values"] = values

    def op(t, mask):
        return OPS[name](t, mask, False, **options)

    clean, clean_grad = value_and_gradient(lambda t: op(t, mask), x, weights)
    out, grad = value_and_gradient(lambda t: op(t, mask), poisoned, weights)
    assert np.isfinite(out).all() and np.isfinite(grad).all()
    np.testing.assert_array_equal(out, clean)
    np.testing.assert_array_equal(grad, clean_grad)
    np.testing.assert_array_equal(grad[~mask], 0)


@pytest.mark.parametrize("name", sorted(OPS))
def test_fully_masked_rows_give_zeros(name):
    rng = np.random.default_rng(12)
    x, mask = padded_rows(rng, "float32", counts=(0, 4, 0))
    x[~mask] = np.nan
    weights = np.ones_like(x)
    # soft_sort_with: values that do not depend on the NaN scores (sin(NaN)' * 0 is NaN).
    options = {"values": tf.constant(np.cos(np.arange(x.size, dtype="float32")).reshape(x.shape))}
    options = options if name == "soft_sort_with" else {}

    def op(t):
        return OPS[name](t, mask, True, epsilon=0.1, **options)

    out, grad = value_and_gradient(op, x, weights)
    for row in (0, 2):
        np.testing.assert_array_equal(out[row], 0)
        np.testing.assert_array_equal(grad[row], 0)
    assert np.isfinite(out).all() and np.isfinite(grad).all()
    assert not np.allclose(out[1], 0)


def test_eager_graph_and_xla_agree():
    rng = np.random.default_rng(13)
    x, mask = padded_rows(rng, "float32")
    weights = rng.standard_normal(x.shape).astype("float32")

    def step(t, m):
        # All three ops in one function: one XLA compilation.
        with tf.GradientTape() as tape:
            tape.watch(t)
            outputs = [OPS[name](t, m, True, epsilon=0.1) for name in sorted(OPS)]
            total = tf.add_n([tf.reduce_sum(y * weights) for y in outputs])
        return (*outputs, tape.gradient(total, t))

    eager = [v.numpy() for v in step(tf.constant(x), tf.constant(mask))]
    for compiled in (tf.function(step), tf.function(step, jit_compile=True)):
        got = [v.numpy() for v in compiled(tf.constant(x), tf.constant(mask))]
        for a, b in zip(got, eager, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=5e-5)


def test_mask_along_another_axis():
    rng = np.random.default_rng(14)
    x, mask = padded_rows(rng, "float64")
    along_rows = soft_rank(x.T, mask=mask.T, axis=0, epsilon=0.1).numpy()
    np.testing.assert_allclose(along_rows.T, soft_rank(x, mask=mask, epsilon=0.1).numpy())


def test_an_all_true_mask_is_no_mask():
    rng = np.random.default_rng(15)
    x = rng.standard_normal((3, N))
    mask = np.ones_like(x, bool)
    for op in (soft_rank, soft_sort):
        np.testing.assert_allclose(
            op(x, mask=mask, epsilon=0.1, descending=True).numpy(),
            op(x, epsilon=0.1, descending=True).numpy(),
            rtol=0,
            atol=1e-13,
        )


@pytest.mark.parametrize("name", sorted(OPS))
def test_bad_masks_are_refused(name):
    x = np.zeros((2, 4), "float32")
    with pytest.raises(TypeError, match=r"`mask` must be a boolean tensor.*Received: mask.dtype"):
        OPS[name](x, np.ones((2, 4), "float32"))
    with pytest.raises(ValueError, match=r"`mask` must have the same shape as the scores"):
        OPS[name](x, np.ones((2, 3), bool))


def test_docstring_examples():
    globs = {"np": np, "keras": keras, "keras_softquantile": keras_softquantile}
    result = doctest.testmod(sorting, extraglobs=globs, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 6 and result.failed == 0, result
