"""The soft and hard quantile selections that an objective `f(A_low, A_high)` receives.

Shared by `QuantileObjectiveModel` and the `QuantileObjective` loss and metric, so that all
three evaluate the same `f` on the same selection. `values` are A with padding zeroed, `valid`
marks the entries that are not padding, and `output` is the objective's input form
("weights", "mean" or "sorted", see `keras_softquantile.objectives`).
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from keras_softquantile import objectives
from keras_softquantile import ops as soft_ops
from keras_softquantile.ops import _backend, _validation

__all__: list[str] = []


def _dtype(x) -> str:
    return keras.backend.standardize_dtype(x.dtype)


def selection_pair(values, low_weights, high_weights, output: str):
    """`(low, high)` in the objective's form ("weights" or "mean") from membership weights."""
    low = objectives.Selection(values, low_weights)
    high = objectives.Selection(values, high_weights)
    if output == "mean":
        return low.mean(), high.mean()
    return low, high


def soft_selection(values, scores, valid, *, quantile, epsilon, output: str, solver: str):
    """The entropic-OT selection: `(low, high)` as the objective receives them, and the soft
    membership weights `(low_w, high_w)` `[batch, n]`."""
    if output == "sorted":
        (low, high), diagnostics = soft_ops.soft_quantile_split(
            values,
            scores,
            quantile,
            epsilon=epsilon,
            output="sorted",
            solver=solver,
            return_diagnostics=True,
        )
        k = low.shape[-1]
        memberships = diagnostics.memberships
        low_w = ops.sum(memberships[..., :k], axis=-1)
        high_w = ops.sum(memberships[..., memberships.shape[-1] - k :], axis=-1)
        return (low, high), (low_w, high_w)
    low_w, high_w = soft_ops.soft_quantile_split(
        values,
        scores,
        quantile,
        epsilon=epsilon,
        mask=valid,
        output="weights",
        solver=solver,
    )
    return selection_pair(values, low_w, high_w, output), (low_w, high_w)


def hard_selection(values, scores, valid, *, quantile, output: str):
    """The hard `(low, high)` in the objective's form, and the hard boolean masks (no
    gradient flows to `scores`).

    The split of a stable `argsort` (equal scores in index order, padding last): the lower
    bucket holds ranks `< k` and the upper ranks `>= count - k`, `k = floor(quantile count)`.
    Where counting is faster (XLA on CPUs, and long rows in TensorFlow graphs on CPUs, see
    `_backend.counts_faster`) the masks are counted instead of sorted
    (`bucket_masks_by_counting`, as one compiled stage); both give the same masks.
    """
    scores = ops.stop_gradient(scores)
    # NaN scores (a NaN theta under XLA, where the data checks cannot raise) order nothing:
    # such a row's values become NaN, so that `f` of its hard selection is NaN, not a number.
    broken = ops.any(ops.logical_and(ops.isnan(scores), valid), axis=-1, keepdims=True)
    values = ops.where(broken, ops.full_like(values, np.nan), values)
    largest = float(np.finfo(_dtype(scores)).max)
    key = ops.where(valid, scores, ops.full_like(scores, largest))
    n = values.shape[-1]
    count = ops.sum(ops.cast(valid, "int32"), axis=-1, keepdims=True)
    k = _validation.hard_split_sizes(count, quantile, n)
    if output == "sorted":
        order = ops.argsort(key, axis=-1)  # stable on every backend: padding sorts last
        low_mask, high_mask = bucket_masks_by_sorting(key, valid, k, count, order)
        k_static = math.floor(quantile * n + 1e-9)
        ordered = ops.take_along_axis(values, order, axis=-1)
        return (ordered[:, :k_static], ordered[:, n - k_static :]), (low_mask, high_mask)
    if _backend.counts_faster(n):
        low_mask, high_mask = _run_counting(key, valid, k, count)
    else:
        low_mask, high_mask = bucket_masks_by_sorting(key, valid, k, count)
    weights = [ops.cast(m, _dtype(values)) for m in (low_mask, high_mask)]
    return selection_pair(values, *weights, output), (low_mask, high_mask)


def bucket_masks_by_sorting(key, valid, k, count, order=None):
    """`(low, high)` boolean masks `[batch, n]`: stable ranks `< k` and `>= count - k` of
    `key` among the `valid` entries (`key` is largest at padding), from one argsort.

    A stable sort orders the pairs `(key, index)` lexicographically, so the buckets are the
    entries up to the pair at rank `k - 1` and from the pair at rank `count - k` on: one sort,
    then elementwise comparisons (a second sort for the ranks cost as much as the first).
    """
    if order is None:
        order = ops.argsort(key, axis=-1)
    index = ops.expand_dims(ops.arange(ops.shape(key)[-1], dtype=order.dtype), 0)
    last = ops.shape(key)[-1] - 1

    def pair_at(rank):
        """The `(key, index)` pair at `rank` `[batch, 1]` of each row (clipped into it)."""
        position = ops.take_along_axis(order, ops.clip(rank, 0, last), axis=-1)
        return ops.take_along_axis(key, position, axis=-1), ops.cast(position, index.dtype)

    nonempty = k > 0
    low_key, low_index = pair_at(k - 1)
    low_mask = nonempty & ((key < low_key) | ((key == low_key) & (index <= low_index)))
    high_key, high_index = pair_at(count - k)
    high_mask = nonempty & valid & ((key > high_key) | ((key == high_key) & (index >= high_index)))
    return low_mask, high_mask


def bucket_masks_by_counting(key, valid, k, count):
    """The masks of `bucket_masks_by_sorting`, without a sort: per row, the key at a stable
    rank is found bit by bit (a binary search over the keys' ordered bit patterns, one count
    per bit), and ties are split in index order by a cumulative sum.

    32 (64 for float64) passes over the data; under XLA on CPUs that is several times faster
    than its sort.
    """
    codes = _ordered_codes(key)
    lower = _first_by_rank(codes, k)
    upper = ops.logical_and(valid, ops.logical_not(_first_by_rank(codes, count - k)))
    return lower, ops.logical_and(upper, k > 0)


# Inside TensorFlow graphs the 33 counting passes run as one XLA cluster (see `_backend`).
_run_counting = _backend.compiled_stage(bucket_masks_by_counting)


def _ordered_codes(key):
    """Integers of the keys' width whose order is the keys' order (-0 equal to +0)."""
    if _dtype(key) not in ("float32", "float64"):
        key = ops.cast(key, "float32")  # exact, order kept
    width = 64 if _dtype(key) == "float64" else 32
    key = ops.where(key == 0, ops.zeros_like(key), key)  # -0.0 has other bits than +0.0
    bits = _backend.bitcast(key, f"int{width}")
    # Negative floats order backwards in their bits: flip all but the sign bit.
    flip = ops.convert_to_tensor(2 ** (width - 1) - 1, f"int{width}")
    return ops.where(bits < 0, ops.bitwise_xor(bits, flip), bits)


def _first_by_rank(codes, rank):
    """The entries of stable rank `< rank` `[batch, 1]` (`codes` `[batch, n]`, ties in index
    order)."""
    dtype = _dtype(codes)
    width = 64 if dtype == "int64" else 32

    def constant(value):
        return ops.convert_to_tensor(value, dtype)

    def at_most(bound):
        return ops.sum(ops.cast(codes <= bound, "int32"), axis=-1, keepdims=True)

    target = ops.maximum(rank, 1)
    # The smallest code v with at least `target` codes <= v: the sign bit, then each bit
    # from the top is 0 where the codes up to "this bit 0, the rest 1" already number enough.
    negative = at_most(constant(-1)) >= target
    value = ops.where(negative, constant(-(2 ** (width - 1))), constant(0))
    for bit in range(width - 2, -1, -1):
        enough = at_most(ops.bitwise_or(value, constant(2**bit - 1))) >= target
        value = ops.where(enough, value, ops.bitwise_or(value, constant(2**bit)))
    below = codes < value
    tied = ops.cast(codes == value, "int32")
    needed = rank - ops.sum(ops.cast(below, "int32"), axis=-1, keepdims=True)
    first_ties = ops.logical_and(tied > 0, ops.cumsum(tied, axis=-1) <= needed)
    return ops.logical_and(ops.logical_or(below, first_ties), rank > 0)


def objective_values(objective_function, pair):
    """`f(low, high)` as a tensor: one value per instance `[batch]`, or a scalar."""
    value = ops.convert_to_tensor(objective_function(*pair))
    if len(value.shape) not in (0, 1):
        raise ValueError(
            "The objective must return one value per instance [batch] or a scalar. "
            f"Received: an output of shape {tuple(value.shape)}"
        )
    return value
