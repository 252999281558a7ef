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
from keras_softquantile.ops import _validation

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

    The split of `argsort` (stable: equal scores in index order, padding last): the lower
    bucket holds ranks `< k` and the upper ranks `>= count - k`. A stable sort orders the
    pairs `(score, index)` lexicographically, so the buckets are the entries up to the pair
    at rank `k - 1` and from the pair at rank `count - k` on: one sort, then elementwise
    comparisons (a second sort for the ranks themselves cost as much as the first).
    """
    scores = ops.stop_gradient(scores)
    largest = float(np.finfo(_dtype(scores)).max)
    key = ops.where(valid, scores, ops.full_like(scores, largest))
    order = ops.argsort(key, axis=-1)  # stable on every backend: padding sorts last
    n = values.shape[-1]
    count = ops.sum(ops.cast(valid, "int32"), axis=-1, keepdims=True)
    k = _validation.hard_split_sizes(count, quantile, n)
    index = ops.expand_dims(ops.arange(ops.shape(key)[-1], dtype=order.dtype), 0)
    last = ops.shape(key)[-1] - 1

    def pair_at(rank):
        """The `(score, index)` pair at `rank` `[batch, 1]` of each row (clipped into it)."""
        position = ops.take_along_axis(order, ops.clip(rank, 0, last), axis=-1)
        return ops.take_along_axis(key, position, axis=-1), position

    nonempty = k > 0
    low_key, low_index = pair_at(k - 1)
    low_mask = nonempty & (
        (key < low_key) | ((key == low_key) & (index <= ops.cast(low_index, index.dtype)))
    )
    high_key, high_index = pair_at(count - k)
    high_mask = (
        nonempty
        & valid
        & ((key > high_key) | ((key == high_key) & (index >= ops.cast(high_index, index.dtype))))
    )
    if output == "sorted":
        k_static = math.floor(quantile * n + 1e-9)
        ordered = ops.take_along_axis(values, order, axis=-1)
        pair = (ordered[:, :k_static], ordered[:, n - k_static :])
    else:
        weights = [ops.cast(m, _dtype(values)) for m in (low_mask, high_mask)]
        pair = selection_pair(values, *weights, output)
    return pair, (low_mask, high_mask)


def objective_values(objective_function, pair):
    """`f(low, high)` as a tensor: one value per instance `[batch]`, or a scalar."""
    value = ops.convert_to_tensor(objective_function(*pair))
    if len(value.shape) not in (0, 1):
        raise ValueError(
            "The objective must return one value per instance [batch] or a scalar. "
            f"Received: an output of shape {tuple(value.shape)}"
        )
    return value
