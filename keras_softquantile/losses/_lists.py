"""Ranking inputs as lists: `(y_true, y_pred)` -> `(labels, scores, mask)`, and list statistics.

The inputs follow keras-rs: `y_pred` is `[batch, list_size]` float scores, and `y_true` is
either a `[batch, list_size]` tensor of labels (negative labels mark padding) or a dict
`{"labels": ..., "mask": ...}` with a boolean mask (True = valid item). Shared by the ranking
losses and metrics.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

__all__: list[str] = []


def _dtype_of(x) -> str:
    dtype = getattr(x, "dtype", None)
    return keras.backend.standardize_dtype(np.asarray(x).dtype if dtype is None else dtype)


def _as_tensor(x):
    return x if ops.is_tensor(x) else ops.convert_to_tensor(x)


def check_predictions(y_pred) -> None:
    """Raises `TypeError` for non-float `y_pred` (called before Keras casts it to float)."""
    dtype = _dtype_of(y_pred)
    if not dtype.startswith(("float", "bfloat")):
        raise TypeError(
            f"`y_pred` must be a floating-point tensor of scores. Received: y_pred.dtype={dtype}"
        )


def _split_true(y_true):
    """`(labels, mask or None)` from a labels tensor or a `{"labels", "mask"}` dict."""
    if not isinstance(y_true, dict):
        return y_true, None
    unknown = sorted(set(y_true) - {"labels", "mask"})
    if "labels" not in y_true or unknown:
        raise ValueError(
            '`y_true` as a dict must have the key "labels" and optionally "mask", and no '
            f"other. Received: y_true with keys {sorted(y_true)}"
        )
    mask = y_true.get("mask")
    if mask is not None and _dtype_of(mask) != "bool":
        raise TypeError(
            "`y_true['mask']` must be a boolean tensor (True = valid item). "
            f"Received: y_true['mask'].dtype={_dtype_of(mask)}"
        )
    return y_true["labels"], mask


def _shape(x) -> tuple:
    return tuple(x.shape)


def _same(shape: tuple, other: tuple) -> bool:
    return len(shape) == len(other) and all(
        a is None or b is None or a == b for a, b in zip(shape, other, strict=True)
    )


def list_inputs(y_true, y_pred):
    """Validates ranking inputs and returns `(labels, scores, mask)`, each `[batch, list_size]`.

    `labels` and `scores` are in the dtype of `y_pred`, with padded labels set to 0; `mask` is
    boolean, True for valid items: a non-negative label, and True in `y_true["mask"]` if given.

    Raises:
        TypeError: `y_pred` is not a float tensor, or `y_true["mask"]` not boolean.
        ValueError: a dict `y_true` without "labels" or with other keys, a rank other than
            2, mismatched shapes, or lists of size 0.
    """
    labels, mask = _split_true(y_true)
    check_predictions(y_pred)
    scores = _as_tensor(y_pred)
    labels = _as_tensor(labels)
    if len(scores.shape) != 2:
        raise ValueError(
            "`y_pred` must have shape [batch, list_size] (one score per item of each list). "
            f"Received: y_pred.shape={_shape(scores)}"
        )
    if not _same(_shape(labels), _shape(scores)):
        raise ValueError(
            "`y_true` (its labels) and `y_pred` must have the same shape [batch, list_size]. "
            f"Received: y_true.shape={_shape(labels)}, y_pred.shape={_shape(scores)}"
        )
    if scores.shape[-1] == 0:
        raise ValueError(
            f"Lists must hold at least one item. Received: y_pred.shape={_shape(scores)}"
        )
    dtype = keras.backend.standardize_dtype(scores.dtype)
    labels = ops.cast(labels, dtype)
    valid = labels >= 0
    if mask is not None:
        mask = _as_tensor(mask)
        if not _same(_shape(mask), _shape(scores)):
            raise ValueError(
                "`y_true['mask']` must have the shape of `y_pred`. "
                f"Received: y_true['mask'].shape={_shape(mask)}, y_pred.shape={_shape(scores)}"
            )
        valid = ops.logical_and(valid, ops.cast(mask, "bool"))
    labels = ops.where(valid, labels, ops.zeros_like(labels))
    return labels, scores, valid


def padding_as_labels(labels, mask):
    """One labels tensor that carries the mask (padding as -1), the form Keras can cast."""
    return ops.where(mask, labels, -ops.ones_like(labels))


def average_ranks(values, mask):
    """Hard ascending ranks (0-based) among the valid entries of each row, ties sharing their
    average rank; 0 for padding. Pairwise counts, `[batch, n, n]` (lists are short)."""
    values = ops.stop_gradient(values)
    pairs = ops.logical_and(mask[:, None, :], mask[:, :, None])  # [b, i, j]: both valid
    below = ops.logical_and(pairs, values[:, None, :] < values[:, :, None])
    tied = ops.logical_and(pairs, values[:, None, :] == values[:, :, None])
    dtype = keras.backend.standardize_dtype(values.dtype)
    count = ops.sum(ops.cast(below, dtype), axis=-1)
    ties = ops.sum(ops.cast(tied, dtype), axis=-1)  # itself included
    ranks = count + 0.5 * (ties - 1)
    return ops.where(mask, ranks, ops.zeros_like(ranks))


def _safe_divide(numerator, denominator):
    """`numerator / denominator` where the denominator is positive, else 0 (zero gradient)."""
    positive = denominator > 0
    safe = ops.where(positive, denominator, ops.ones_like(denominator))
    return ops.where(positive, numerator / safe, ops.zeros_like(numerator))


def pearson(x, y, mask):
    """Pearson correlation of `x` and `y` over the valid entries of each row, `[batch]`; 0
    (with zero gradient) where either is constant over them."""
    weights = ops.cast(mask, x.dtype)
    count = ops.sum(weights, axis=-1, keepdims=True)
    count = ops.where(count > 0, count, ops.ones_like(count))
    x = ops.where(mask, x, ops.zeros_like(x))
    y = ops.where(mask, y, ops.zeros_like(y))
    dx = (x - ops.sum(x, axis=-1, keepdims=True) / count) * weights
    dy = (y - ops.sum(y, axis=-1, keepdims=True) / count) * weights
    covariance = ops.sum(dx * dy, axis=-1)
    product = ops.sum(dx * dx, axis=-1) * ops.sum(dy * dy, axis=-1)
    # The square root only of a positive product: its gradient at 0 would be infinite.
    positive = product > 0
    root = ops.sqrt(ops.where(positive, product, ops.ones_like(product)))
    return ops.where(positive, covariance / root, ops.zeros_like(covariance))


def gains(labels):
    """`2^label - 1` (0 for padding, whose labels are 0)."""
    return ops.power(ops.cast(2.0, labels.dtype), labels) - 1


def discounts(ranks):
    """`1 / log2(2 + rank)` for 0-based ranks."""
    return np.log(2.0) / ops.log(2 + ranks)


def ideal_dcg(labels, k: int | None):
    """DCG of the ideal (label-sorted) order, truncated at `k`, `[batch]`."""
    ordered = ops.flip(ops.sort(gains(labels), axis=-1), axis=-1)
    positions = ops.arange(ordered.shape[-1], dtype=ordered.dtype)
    weights = discounts(positions)
    if k is not None:
        weights = ops.where(positions < k, weights, ops.zeros_like(weights))
    return ops.sum(ordered * weights, axis=-1)


def ndcg(labels, ranks, selected, mask, k: int | None):
    """`(NDCG, has_relevant)`, `[batch]`: `sum_i selected_i gain_i discount(rank_i) / IDCG@k`
    over valid items, with descending `ranks` (0-based) and the weights `selected` of the
    top k (ones without `k`); NDCG is 0 (zero gradient) where no item is relevant."""
    terms = selected * gains(labels) * discounts(ranks)
    dcg = ops.sum(ops.where(mask, terms, ops.zeros_like(terms)), axis=-1)
    ideal = ideal_dcg(labels, k)
    return _safe_divide(dcg, ideal), ideal > 0
