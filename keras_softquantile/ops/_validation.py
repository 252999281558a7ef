"""Argument checks shared by the public ops.

Every public op validates its inputs once, at its boundary, through these helpers, so that a
bad argument fails with a `ValueError`/`TypeError` that names the argument and echoes the value
received, never with an opaque TensorFlow traceback.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

__all__: list[str] = []

_SOLVERS = ("auto", "newton", "sinkhorn")


def float_tensor(x, name: str) -> tf.Tensor:
    """Converts `x` to a floating-point tensor, or raises `TypeError` naming `name`."""
    if isinstance(x, tf.Tensor | tf.Variable):
        tensor = tf.convert_to_tensor(x)
    else:
        array = np.asarray(x)
        if array.dtype == object:
            raise TypeError(f"`{name}` must be a numeric tensor. Received: {name}={x!r}")
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(
                f"`{name}` must be a floating-point tensor (float16, bfloat16, float32 or "
                f"float64). Received: {name}.dtype={array.dtype}"
            )
        tensor = tf.convert_to_tensor(array)
    if not tensor.dtype.is_floating:
        raise TypeError(
            f"`{name}` must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64). Received: {name}.dtype={tensor.dtype.name}"
        )
    if tensor.shape.rank == 0:
        raise ValueError(
            f"`{name}` must have at least one dimension (the axis to select along). "
            f"Received: {name}.shape={tensor.shape}"
        )
    return tensor


def compute_dtype(dtype: tf.DType) -> tf.DType:
    """The dtype the transport is solved in: float32 for half precision, else `dtype`."""
    return tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype


def normalize_axis(axis: int, rank: int, name: str = "axis") -> int:
    """Returns `axis` as a non-negative int, or raises `ValueError`."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"`{name}` must be an int. Received: {name}={axis!r}")
    if not -rank <= axis < rank:
        raise ValueError(
            f"`{name}` is out of range for a tensor of rank {rank}. Received: {name}={axis}"
        )
    return int(axis) % rank


def check_epsilon(epsilon, dtype: tf.DType) -> tf.Tensor:
    """Validates `epsilon > 0` and returns it as a scalar tensor of `dtype`.

    `epsilon` may be a Python number or a scalar tensor/variable (a layer's annealed epsilon).
    Numbers are checked here; tensors are checked eagerly when possible, else by a graph
    assertion (a no-op under XLA).
    """
    if isinstance(epsilon, numbers.Number) and not isinstance(epsilon, bool):
        if not (math.isfinite(float(epsilon)) and float(epsilon) > 0):
            raise ValueError(
                f"`epsilon` must be a finite number > 0. Received: epsilon={epsilon!r}"
            )
        return tf.constant(float(epsilon), dtype)
    if isinstance(epsilon, bool) or epsilon is None:
        raise TypeError(f"`epsilon` must be a positive float. Received: epsilon={epsilon!r}")
    tensor = tf.convert_to_tensor(epsilon)
    if not tensor.dtype.is_floating:
        raise TypeError(
            f"`epsilon` must be a positive float. Received: epsilon.dtype={tensor.dtype.name}"
        )
    if tensor.shape.rank not in (0, None):
        raise ValueError(f"`epsilon` must be a scalar. Received: epsilon.shape={tensor.shape}")
    tensor = tf.cast(tf.reshape(tensor, []), dtype)
    if tf.executing_eagerly():
        value = float(tensor)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"`epsilon` must be a finite number > 0. Received: epsilon={value}")
    else:
        tf.debugging.Assert(
            tf.logical_and(tensor > 0, tf.math.is_finite(tensor)),
            ["`epsilon` must be a finite number > 0. Received: epsilon=", tensor],
        )
    return tensor


def check_solver(solver: str) -> str:
    if solver not in _SOLVERS:
        raise ValueError(f"`solver` must be one of {_SOLVERS}. Received: solver={solver!r}")
    return solver


def check_quantiles(quantiles, name: str = "quantiles") -> tuple[float, ...]:
    """Validates a non-empty, strictly increasing sequence of levels in (0, 1)."""
    if isinstance(quantiles, numbers.Number) and not isinstance(quantiles, bool):
        quantiles = (quantiles,)
    if not isinstance(quantiles, Sequence | np.ndarray) or isinstance(quantiles, str):
        raise TypeError(
            f"`{name}` must be a sequence of floats in (0, 1). Received: {name}={quantiles!r}"
        )
    values = tuple(float(q) for q in quantiles)
    if not values:
        raise ValueError(f"`{name}` must not be empty. Received: {name}={quantiles!r}")
    if any(not (0.0 < q < 1.0) for q in values):
        raise ValueError(f"`{name}` must lie strictly in (0, 1). Received: {name}={quantiles!r}")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"`{name}` must be strictly increasing. Received: {name}={quantiles!r}")
    return values


def check_probabilities(q, name: str = "q") -> tuple[tuple[float, ...], bool]:
    """Validates quantile levels in [0, 1] (any order); returns them and whether q was scalar."""
    if isinstance(q, bool):
        raise TypeError(f"`{name}` must be a float or a list of floats. Received: {name}={q!r}")
    scalar = np.ndim(q) == 0
    values = np.atleast_1d(np.asarray(q, dtype=object))
    try:
        levels = tuple(float(v) for v in values.ravel())
    except (TypeError, ValueError):
        raise TypeError(
            f"`{name}` must be a float or a list of floats. Received: {name}={q!r}"
        ) from None
    if values.ndim != 1 or not levels:
        raise ValueError(
            f"`{name}` must be a float or a flat list of floats. Received: {name}={q!r}"
        )
    if any(not (0.0 <= v <= 1.0) for v in levels):
        raise ValueError(f"`{name}` must lie in [0, 1]. Received: {name}={q!r}")
    return levels, scalar


def check_mask(mask, scores: tf.Tensor) -> tf.Tensor | None:
    """Validates a boolean padding mask of the same shape as `scores`."""
    if mask is None:
        return None
    mask = tf.convert_to_tensor(mask)
    if mask.dtype != tf.bool:
        raise TypeError(
            f"`mask` must be a boolean tensor (True = valid entry). "
            f"Received: mask.dtype={mask.dtype.name}"
        )
    if not mask.shape.is_compatible_with(scores.shape):
        raise ValueError(
            f"`mask` must have the same shape as the scores. "
            f"Received: mask.shape={mask.shape}, scores.shape={scores.shape}"
        )
    return mask


def check_same_shape(values: tf.Tensor, scores: tf.Tensor, name: str = "values") -> None:
    """Raises unless `values` and `scores` have the same shape (checked at run time if dynamic)."""
    message = f"`{name}` and `scores` must have the same shape."
    if not values.shape.is_compatible_with(scores.shape):
        raise ValueError(
            f"{message} Received: {name}.shape={values.shape}, scores.shape={scores.shape}"
        )
    if not (values.shape.is_fully_defined() and scores.shape.is_fully_defined()):
        tf.debugging.assert_equal(tf.shape(values), tf.shape(scores), message=message)


def static_length(x: tf.Tensor, axis: int, op: str, minimum: int = 0) -> int:
    """The static length of `axis`, required by ops whose output size depends on it."""
    n = x.shape[axis]
    if n is None:
        raise ValueError(
            f"`{op}` needs a statically known length along `axis` (its output size depends "
            f"on it). Received: shape={x.shape}, axis={axis}"
        )
    if n < minimum:
        raise ValueError(
            f"`{op}` needs at least {minimum} entry along `axis`. "
            f"Received: shape={x.shape}, axis={axis}"
        )
    return int(n)


def assert_finite_scores(x: tf.Tensor, valid: tf.Tensor | None, name: str = "scores") -> None:
    """Raises if a valid entry of `x` is NaN or infinite.

    Eagerly this is a `ValueError`; inside `tf.function` an `InvalidArgumentError` carrying
    the same message. Under XLA the check cannot raise: the ops keep a NaN confined to its own
    batch row instead.
    """
    finite = tf.math.is_finite(x)
    if valid is not None:
        finite = tf.logical_or(finite, tf.logical_not(valid))
    all_finite = tf.reduce_all(finite)
    message = f"`{name}` must be finite: it contains NaN or infinite values at valid positions"
    if tf.executing_eagerly():
        if not bool(all_finite):
            bad = tf.boolean_mask(x, tf.logical_not(finite))
            raise ValueError(
                f"{message}. Received: {name} with {int(tf.size(bad))} non-finite "
                f"entries, the first being {float(bad[0])}"
            )
    else:
        tf.debugging.Assert(all_finite, [message + "."])


def check_split_quantile(quantile) -> float:
    """The level q of a lower/upper split, a float in (0, 0.5]."""
    if isinstance(quantile, bool) or not isinstance(quantile, numbers.Real):
        raise TypeError(f"`quantile` must be a float in (0, 0.5]. Received: quantile={quantile!r}")
    if not 0.0 < float(quantile) <= 0.5:
        raise ValueError(f"`quantile` must lie in (0, 0.5]. Received: quantile={quantile!r}")
    return float(quantile)
