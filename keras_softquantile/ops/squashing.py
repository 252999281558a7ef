"""Squashing scores to quantile-level units, so that `epsilon` does not depend on their scale."""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_softquantile.ops import _numerics
from keras_softquantile.ops._ot.problem import Tensor

__all__ = ["squash_scores"]

# Location and scale come from at most this many entries per row (a strided subsample, sorted).
# Rows up to this length use every entry, so their squashing is exactly permutation invariant.
# Measured on 2 cores, float32, 256 x 1000 rows: sorting 64 entries per row costs 1.0 ms (graph)
# and 1.4 ms (XLA), 128 entries 1.7 / 2.9 ms, against 8.3 ms for `tf.sort` of the whole rows.
ROBUST_SAMPLE_SIZE = 64

# Beyond this many robust standard deviations the normal CDF would round to 0 or 1 (float32:
# from about 5.4), tying every far score. The map continues logarithmically instead.
_TAIL_START = 2.0
# For normal scores, the median absolute deviation from the median is 0.674 standard deviations
# and the mean absolute deviation 0.798.
_MEDIAN_ABS_PER_SIGMA = 0.6744897501960817
_MEAN_ABS_PER_SIGMA = math.sqrt(2 / math.pi)


def larger(a, b):
    """The elementwise maximum of two float tensors, in their dtype, with TensorFlow's
    gradient at ties (all to `a`). Keras's `maximum` and `minimum` return float32 for float64
    tensors on PyTorch (Keras 3.15), so the ops use this instead."""
    return ops.where(a >= b, a, b)


def _median(ordered, count):
    """The median of rows sorted ascending whose first `count` entries are valid (zero for an
    empty row). The middle order statistics are picked by a sort, so gradients reach the one
    or two entries the median interpolates."""
    last = ops.maximum(count - 1, 0)
    lower = ops.take_along_axis(ordered, ops.floor_divide(last, 2), axis=-1)
    upper = ops.take_along_axis(ordered, ops.floor_divide(last + 1, 2), axis=-1)
    return ops.where(count > 0, 0.5 * lower + 0.5 * upper, ops.zeros_like(lower))


def _half_deviation_statistic(ordered, count, median, rank):
    """The `rank`-th smallest (0-based) of `|x - median| / 2` over the valid sorted entries.

    The `rank + 1` entries closest to the median are consecutive in sorted order, so the
    statistic is the smallest, over windows of `rank + 1` consecutive entries, of the window's
    largest deviation, `max(median - first, last - median) / 2`: no second sort.
    """
    size = ops.shape(ordered)[-1]
    start = ops.zeros_like(ordered, dtype="int32") + ops.arange(size, dtype="int32")
    end = start + rank  # window `start` to `start + rank`; its first entry is `ordered` itself
    inside = end < count
    last = ops.take_along_axis(ordered, ops.minimum(end, size - 1), axis=-1)
    spread = larger(0.5 * median - 0.5 * ordered, 0.5 * last - 0.5 * median)
    dtype = keras.backend.standardize_dtype(ordered.dtype)
    largest = ops.full_like(spread, _numerics.largest(dtype))
    smallest = ops.min(ops.where(inside, spread, largest), axis=-1, keepdims=True)
    return ops.where(count > 0, smallest, ops.zeros_like(smallest))


def _robust_location_scale(x, valid):
    """The median of each row and half its median absolute deviation from it, over (a strided
    subsample of) the valid entries, as `[rows, 1]` tensors, from one sort of the sample.

    The rows are scaled first (see `squash_scores`): no entry is within a factor 256 of the
    dtype's largest value, so nothing here overflows.
    """
    n = x.shape[-1]
    if n is None:  # a dynamic length (TensorFlow graphs): the stride is a tensor
        rows, length = ops.shape(x)[0], ops.shape(x)[-1]
        stride = ops.maximum(
            1, ops.floor_divide(length + ROBUST_SAMPLE_SIZE - 1, ROBUST_SAMPLE_SIZE)
        )
        # A slice with a tensor step loses even the rank of its result: reshaped to restore it.
        size = (rows, ops.floor_divide(length + stride - 1, stride))
        sample = ops.reshape(x[:, ::stride], size)
        sample_valid = ops.reshape(valid[:, ::stride], size)
    else:
        stride = max(1, -(-n // ROBUST_SAMPLE_SIZE))
        sample = x[:, ::stride]
        sample_valid = valid[:, ::stride]
    count = ops.cast(ops.sum(ops.cast(sample_valid, "int32"), axis=-1, keepdims=True), "int32")
    largest = ops.full_like(sample, _numerics.largest(keras.backend.standardize_dtype(x.dtype)))
    ordered = ops.sort(ops.where(sample_valid, sample, largest), axis=-1)  # invalid sort last
    median = _median(ordered, count)
    last = ops.maximum(count - 1, 0)
    lower = _half_deviation_statistic(ordered, count, median, ops.floor_divide(last, 2))
    upper = _half_deviation_statistic(ordered, count, median, ops.floor_divide(last + 1, 2))
    return median, 0.5 * lower + 0.5 * upper


def _normal_with_log_tails(u):
    """`Phi(u)` for `|u| <= c`, continued as `Phi(c) + phi(c) log(1 + |u| - c)` beyond (odd
    about 0.5, continuously differentiable). Unbounded but slowly growing, so distinct far
    scores stay distinct (1e9 and 2e9 in a bulk of unit spread differ by 0.037) and nothing
    overflows."""
    c = _TAIL_START
    magnitude = ops.abs(u)
    inside = magnitude <= c
    bulk = 0.5 * ops.erfc(-ops.where(inside, u, ops.zeros_like(u)) * (0.5**0.5))
    density = math.exp(-0.5 * c * c) / math.sqrt(2 * math.pi)
    cdf_at_c = 0.5 * math.erfc(-c / math.sqrt(2))
    excess = larger(magnitude - c, ops.zeros_like(magnitude))
    tail = (cdf_at_c - 0.5) + density * ops.log1p(excess)
    return ops.where(inside, bulk, 0.5 + ops.sign(u) * tail)


def squash_scores(
    scores: Tensor,
    *,
    mask: Tensor | None = None,
    name: str | None = None,
):
    """Maps scores along the last axis to `z`, close to their quantile level in the bulk.

    `z = h((x - median) / sigma)`, where the median and `sigma = MAD / 0.674` (the median
    absolute deviation from the median; the mean absolute deviation / 0.798 where more than
    half the entries tie at the median) are taken over the valid entries of each row (over a
    strided subsample of 64 of them in longer rows), and `h` is the standard normal CDF
    `Phi` within two robust standard deviations, continued logarithmically beyond. So for
    roughly Gaussian scores `z` is roughly uniform on (0, 1), close to the quantile level of
    each score, and every `epsilon` in this package is scale-free: the width, in
    quantile-level units, over which an entry's membership moves from one bucket to the next.

    The map follows the order of the scores, not their spread:
      * the median and the MAD ignore up to half the entries as outliers:
        `[-1e30, 1, 2, 3, 1e30]` maps the bulk to (0.25, 0.5, 0.75) as if the outliers were
        merely large;
      * `h` is strictly increasing and never saturates: `z` leaves [0, 1] in the far tails
        (growing like the log of the distance), so distinct far scores keep distinct `z` and
        their hard order (cubed Cauchy scores are as sharply separated as Gaussian ones);
      * a row of tiny scores (largest magnitude below 1), or one holding scores within
        2**61 (float64; 2**32 in float32) of the smallest normal number, is first scaled up
        by a power of two (exactly), so the deviations of tiny scores stay clear of the
        subnormal range,
        which the CPU kernels of TensorFlow and XLA flush to zero (`[0, 2.2e-308]` in
        float64 is not a constant row), and a row near the dtype's largest value is scaled
        down by 256, so nothing overflows (`[3e38, -3e38]` in float32);
      * a row whose valid entries are all equal maps to 0.5, with zero gradient.
    `z` is invariant to a shift and a positive rescaling of a row and maps to `1 - z` under
    negation. It is invariant to a permutation of the entries for rows of up to 64 entries;
    in longer rows the subsample, hence `z`, depends slightly on the order (never the bucket
    masses or the limit as epsilon shrinks). Invalid entries (`mask` False) map to 0.5, never
    influence the valid ones, and receive zero gradient even if they hold NaN. Gradients are
    exact, including through the median and the MAD (piecewise smooth in the scores).

    Args:
        scores: float tensor `[..., n]` (a numpy array, or a tensor of the active Keras
            backend).
        mask: optional boolean tensor of the same shape, True for valid entries.
        name: optional name scope.

    Returns:
        A tensor like `scores`: 0.5 at the median, about 0.25 and 0.75 at the quartiles.
    """
    with keras.name_scope(name or "squash_scores"):
        x = ops.convert_to_tensor(scores)
        if 0 in tuple(x.shape):  # nothing to squash (and Keras refuses empty reductions)
            return x * 0.0 + 0.5
        dtype = keras.backend.standardize_dtype(x.dtype)
        largest = _numerics.largest(dtype)
        valid = ops.ones_like(x, dtype="bool") if mask is None else ops.convert_to_tensor(mask)
        shape = ops.shape(x)
        x = ops.where(valid, x, ops.zeros_like(x))
        rows = ops.reshape(x, (-1, shape[-1]))
        row_valid = ops.reshape(valid, (-1, shape[-1]))
        # Rows near either end of the range, times a power of two (exact; z is scale invariant).
        rows = rows * _numerics.row_scale(rows, row_valid)
        median, half_mad = _robust_location_scale(rows, row_valid)
        half_deviation = ops.where(row_valid, 0.5 * rows - 0.5 * median, ops.zeros_like(rows))
        count = ops.sum(ops.cast(row_valid, dtype), axis=-1, keepdims=True)
        count = larger(count, ops.ones_like(count))
        # Each term divided first: a sum of many large deviations would overflow.
        half_mean_abs = ops.sum(ops.abs(half_deviation) / count, axis=-1, keepdims=True)
        # More than half the entries tied at the median: the mean absolute deviation instead.
        half_sigma = ops.where(
            half_mad > 0,
            half_mad / _MEDIAN_ABS_PER_SIGMA,
            half_mean_abs / _MEAN_ABS_PER_SIGMA,
        )
        spread_out = half_sigma > 0
        half_sigma = ops.where(spread_out, half_sigma, ops.ones_like(half_sigma))
        # A bulk of spread 1e-30 beside a score of 1e30 would overflow u: such entries get
        # the largest finite u of their sign (and zero gradient), which keeps their order
        # against the bulk. The quotient is only formed where it is finite.
        overflows = ops.abs(half_deviation) / largest > half_sigma
        use = ops.logical_and(ops.logical_and(spread_out, row_valid), ops.logical_not(overflows))
        # Divided by the scale held constant, then by its ratio to itself (exactly 1): the
        # gradient with respect to the scale is then -u / scale, formed without squaring a
        # scale near the dtype's limits (1e-300 or 3e38), which would give inf or NaN.
        constant_sigma = ops.stop_gradient(half_sigma)
        u = ops.where(use, half_deviation, ops.zeros_like(rows)) / constant_sigma
        u = u / (half_sigma / constant_sigma)
        u = ops.where(ops.logical_and(overflows, row_valid), ops.sign(half_deviation) * largest, u)
        z = _normal_with_log_tails(u)
        return ops.reshape(z, shape)
