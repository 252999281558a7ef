"""Warm starts: the boundaries that solve the transport as epsilon shrinks."""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from keras_softquantile.ops import _backend
from keras_softquantile.ops._ot.problem import (
    Tensor,
    as_dtype,
    cumsum,
    maximum,
    minimum,
    reduce_max,
    reduce_min,
)


def _take(x: Tensor, index: Tensor) -> Tensor:
    """`x[r, index[r, k]]`: `[rows, k]` entries of the rows of `x` `[rows, n]`."""
    return ops.take_along_axis(x, index, axis=-1)


def _as_one_dtype(z, a, above_target) -> tuple[Tensor, Tensor, Tensor, str]:
    """The scores, weights and target masses as tensors of the scores' dtype, and that dtype."""
    z = ops.convert_to_tensor(z)
    dtype = keras.backend.standardize_dtype(z.dtype)
    return z, ops.cast(a, dtype), ops.cast(above_target, dtype), dtype


def _limit_boundaries(
    value: Tensor,
    below: Tensor,
    through: Tensor,
    previous: Tensor,
    following: Tensor,
    above_target: Tensor,
    epsilon: Tensor,
) -> Tensor:
    """The boundaries that solve the transport as epsilon shrinks, given the entries at each.

    Boundary `j` cuts the cumulative mass at `B_j = 1 - above_target_j`. Its straddling group
    (the entries tied at squashed score `value`, holding the mass from `below` to `through`)
    puts a share `p_j` in bucket `j` and `p_{j+1}` in bucket `j + 1`; with no other entry
    within a few epsilon, the memberships reproduce these shares exactly when
    `t_j = value - epsilon * log(p_{j+1} / p_j)`. A share that vanishes (a whole number of
    entries on each side) pushes `t_j` to the middle of the gap next to the group, where it is
    clipped. Newton starts inside its region of fast convergence from here, however far the
    neighbouring entries are: a plain quantile start lies deep inside a gap when a bucket holds
    a fraction of an entry, where the covariance underflows and Newton stalls.

    All arguments are `[rows, m - 1]`; `previous` / `following` are the nearest squashed scores
    below / above the group (-inf / +inf where there is none).
    """
    boundary = 1 - above_target
    zero = ops.zeros_like(boundary[:, :1])
    lower_edge = ops.concatenate([zero, boundary[:, :-1]], axis=-1)  # B_{j-1}
    upper_edge = ops.concatenate([boundary[:, 1:], zero + 1], axis=-1)  # B_{j+1}
    info = np.finfo(keras.backend.standardize_dtype(value.dtype))
    # Shares within rounding of zero (the cumulative masses carry a few ulps) are zero: the
    # boundary then sits in the gap, instead of -log(ulp) epsilons beside the group.
    negligible = 64 * float(info.eps) * (through - below)
    share_below = boundary - maximum(below, lower_edge)
    share_above = minimum(through, upper_edge) - boundary
    tiny = ops.full_like(boundary, float(info.tiny))
    share_below = ops.where(share_below > negligible, share_below, tiny)
    share_above = ops.where(share_above > negligible, share_above, tiny)
    t = value - epsilon * (ops.log(share_above) - ops.log(share_below))
    finite = ops.isfinite
    # Clip to the middle of the gaps on each side (half a unit out where there is no entry).
    low = ops.where(finite(previous), 0.5 * previous + 0.5 * value, value - 0.5)
    high = ops.where(finite(following), 0.5 * value + 0.5 * following, value + 0.5)
    t = minimum(maximum(t, low), high)
    # A boundary with no mass above it (zero-mass top targets: the padded targets of a masked
    # sort) belongs at infinity. Half a unit out would leak exp(-0.5 / epsilon) into
    # the empty buckets (7e-3 at epsilon 0.1), which Newton then drains only slowly; 800
    # epsilons out the leak underflows to zero (in float32 too), so the empty buckets stay
    # exactly empty and the other boundaries solve the problem without them.
    far = 1 + 800 * epsilon
    return ops.where(above_target <= 0, value + far, t)


def quantile_boundaries(
    z: Tensor,
    a: Tensor,
    above_target: Tensor,
    sample_size: int | None = None,
    epsilon: float | Tensor | None = None,
) -> Tensor:
    """Bucket boundaries from the sorted squashed scores of each row (or a strided subsample).

    Boundary `j` is placed where a fraction `above_target[:, j]` of the valid weight lies
    above it. With `epsilon` and whole rows, it is the solution of the transport in the limit
    of well separated entries (see `_limit_boundaries`): exact to within the tails of the
    neighbouring entries, fractional bucket sizes and ties included. Without `epsilon`, or
    with a subsample, it is the linear interpolation between the two sorted entries that
    enclose it, as the hard quantile: a warm start only.

    Args:
        z: `[rows, n]` squashed scores.
        a: `[rows, n]` weights, zero for padding.
        above_target: `[rows, m - 1]` mass above each boundary.
        sample_size: entries per row to sort, or None for the whole row.
        epsilon: the transition width, for the limit placement on whole rows.

    Returns:
        `[rows, m - 1]` boundaries.
    """
    z, a, above_target, dtype = _as_one_dtype(z, a, above_target)
    sampled = sample_size is not None
    if sampled:
        n = z.shape[-1]
        if n is None:  # TensorFlow graphs with an unknown row length: a tensor stride
            n = ops.shape(z)[-1]
            stride = ops.maximum(1, (n + sample_size - 1) // sample_size)
            # Gathered, not sliced: a slice with a tensor step loses the rank.
            columns = ops.arange(0, n, stride)
            z = ops.take(z, columns, axis=1)
            a = ops.take(a, columns, axis=1)
        else:
            stride = max(1, (n + sample_size - 1) // sample_size)
            z = z[:, ::stride]
            a = a[:, ::stride]
    valid = a > 0
    largest = float(np.finfo(dtype).max)
    # Padding sorts after every valid entry.
    order = ops.argsort(ops.where(valid, z, ops.full_like(z, largest)), axis=-1)
    ordered = _take(z, order)
    count = ops.sum(ops.cast(valid, dtype), axis=-1, keepdims=True)
    last = ops.cast(maximum(count - 1, 0.0), "int32")
    if epsilon is None or sampled:
        position = count * (1 - above_target) - 0.5
        position = minimum(maximum(position, 0.0), maximum(count - 1, 0.0))
        lower_index = ops.cast(position, "int32")  # the floor: position >= 0
        fraction = position - ops.cast(lower_index, dtype)
        upper_index = ops.minimum(lower_index + 1, last)
        below = _take(ordered, lower_index)
        above = _take(ordered, upper_index)
        boundary = (1 - fraction) * below + fraction * above
        return ops.where(count > 0, boundary, 0.5 * ops.ones_like(boundary))
    ordered = ops.where(_take(valid, order), ordered, ops.full_like(ordered, largest))
    weight = _take(a, order)
    # The cumulative weights in float64 where the backend has it (JAX needs jax_enable_x64).
    wide = "float64" if _backend.float64_available() else dtype
    cumulative = cumsum(ops.cast(weight, wide), axis=-1)
    floor = 1e-300 if wide == "float64" else 1e-30
    cumulative = ops.cast(cumulative / maximum(cumulative[:, -1:], floor), dtype)
    # The straddling entry: the first whose cumulative weight passes the boundary's.
    index = ops.minimum(_backend.searchsorted(cumulative, 1 - above_target, side="right"), last)
    value = _take(ordered, index)
    first = _backend.searchsorted(ordered, value, side="left")
    after = ops.minimum(_backend.searchsorted(ordered, value, side="right"), last + 1)
    padded = ops.concatenate([ops.zeros_like(cumulative[:, :1]), cumulative], axis=-1)
    below = _take(padded, first)
    through = _take(padded, after)
    edge = ops.ones_like(ordered[:, :1])
    with_ends = ops.concatenate([-np.inf * edge, ordered, np.inf * edge], axis=-1)
    previous = _take(with_ends, first)
    # Past the last valid entry there is padding (`largest`) or the appended +inf.
    following = _take(with_ends, after + 1)
    following = ops.where(after <= last, following, ops.full_like(following, np.inf))
    eps = as_dtype(epsilon, dtype)
    boundary = _limit_boundaries(value, below, through, previous, following, above_target, eps)
    return ops.where(count > 0, boundary, 0.5 * ops.ones_like(boundary))


def bisection_rounds(epsilon: Tensor, width: Tensor) -> Tensor:
    """Rounds that bracket a boundary within epsilon / 2 on rows of squashed width `width`:
    `ceil(log2(width / epsilon)) + 1`, between 12 and 48.

    Newton from a start many epsilons inside a gap can stall (no entry near the boundary, so
    no curvature): at epsilon 1e-5 on rows of 1000, 12 rounds (2.4e-4) left 4 of 32 rows
    unconverged after 50 steps, 16 rounds none, in 18 steps.
    """
    epsilon = ops.convert_to_tensor(epsilon)
    width = reduce_max(ops.cast(width, epsilon.dtype))
    needed = ops.ceil(ops.log(maximum(width, epsilon) / epsilon) / math.log(2.0)) + 1
    return ops.cast(ops.clip(needed, 12, 48), "int32")


def bisection_boundaries(
    z: Tensor,
    a: Tensor,
    above_target: Tensor,
    rounds: int | Tensor = 12,
    epsilon: float | Tensor | None = None,
) -> Tensor:
    """Bucket boundaries by bisection on counts, without sorting.

    Each round counts the weight above the midpoint of every boundary's bracket (one
    compare-and-sum pass, no transcendental, no sort) and halves the bracket, which starts as
    the range of the row's squashed scores: `rounds` rounds place each boundary within
    `range * 2**-rounds`. Exact counts over the whole row, so it needs no subsample. With
    `epsilon`, the bracket's entries are then placed as in the limit of well separated entries
    (see `quantile_boundaries`), which Newton finishes from; without it, the bracket's middle
    is returned.

    Args:
        z: `[rows, n]` squashed scores.
        a: `[rows, n]` weights, zero for padding.
        above_target: `[rows, m - 1]` mass above each boundary.
        rounds: bisection rounds (an int or a scalar tensor).
        epsilon: the transition width, for the limit placement.

    Returns:
        `[rows, m - 1]` boundaries.
    """
    z, a, above_target, dtype = _as_one_dtype(z, a, above_target)
    valid = a > 0
    infinity = float(np.inf)
    bottom = reduce_min(ops.where(valid, z, infinity), axis=-1, keepdims=True)
    top = reduce_max(ops.where(valid, z, -infinity), axis=-1, keepdims=True)
    nonempty = ops.isfinite(bottom)
    bottom = ops.where(nonempty, bottom, ops.zeros_like(bottom))
    top = ops.where(nonempty, top, ops.ones_like(top))

    def halve(i, low, high):
        middle = 0.5 * low + 0.5 * high
        above = _backend.accurate_sum(
            a[:, :, None] * ops.cast(z[:, :, None] > middle[:, None, :], dtype), axis=1
        )
        too_much_above = above > above_target
        return (
            i + 1,
            ops.where(too_much_above, middle, low),
            ops.where(too_much_above, high, middle),
        )

    # Invariant: more than the target weight lies above `low`, at most the target above `high`.
    start_low = (bottom - 1) * ops.ones_like(above_target)
    start_high = top * ops.ones_like(above_target)
    start = (ops.convert_to_tensor(0, dtype="int32"), start_low, start_high)
    _, low, high = ops.while_loop(lambda i, low, high: i < rounds, halve, start)
    if epsilon is None:
        return 0.5 * low + 0.5 * high
    zz = z[:, :, None]
    valid = valid[:, :, None]
    # The straddling group: the lowest entry above `low` (the bracket holds at most one
    # distinct score once it is narrower than the gaps around the boundary).
    value = reduce_min(ops.where(valid & (zz > low[:, None, :]), zz, infinity), axis=1)
    value = ops.where(ops.isfinite(value), value, high)
    lower = zz < value[:, None, :]
    higher = zz > value[:, None, :]
    weight = a[:, :, None]
    below = _backend.accurate_sum(weight * ops.cast(lower, dtype), axis=1)
    through = 1 - _backend.accurate_sum(weight * ops.cast(higher, dtype), axis=1)
    previous = reduce_max(ops.where(valid & lower, zz, -infinity), axis=1)
    following = reduce_min(ops.where(valid & higher, zz, infinity), axis=1)
    eps = as_dtype(epsilon, dtype)
    boundary = _limit_boundaries(value, below, through, previous, following, above_target, eps)
    return ops.where(nonempty, boundary, 0.5 * ops.ones_like(boundary))
