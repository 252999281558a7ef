"""Argument checks shared by the public ops.

Every public op validates its inputs once, at its boundary, through these helpers, so that a
bad argument fails with a `ValueError`/`TypeError` that names the argument and echoes the value
received (Keras style: the message ends with `Received: name=value`), never with an opaque
TensorFlow traceback.

Checks that depend on run-time values (dynamic shapes inside `tf.function`, a tensor `epsilon`)
are graph assertions. The helpers return the checked tensor passed through an identity that
depends on the assertion: use the returned tensor in place of the argument, so that the
assertion runs before any op that could fail on the bad input with a less helpful message.
XLA drops assertions; for those checks a boolean "ok" tensor is available (`check_same_shape`,
`epsilon_ok`) so that the caller can turn its output into NaN instead of a plausible number.
"""

from __future__ import annotations

import itertools
import math
import numbers
import reprlib
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

__all__: list[str] = []

_SOLVERS = ("auto", "newton", "sinkhorn")

# Machine epsilons between `epsilon` and the smallest usable smoothing: below about this many
# ulps of 1, `1 / epsilon` and the memberships' logits lose all precision (NaN memberships).
EPSILON_ULPS = 8

_repr = reprlib.Repr()
_repr.maxlist = _repr.maxtuple = 8
_repr.maxother = _repr.maxstring = 80
_repr.maxlevel = 3


def _short(value) -> str:
    """`repr(value)`, shortened for large nested lists and arrays."""
    if isinstance(value, np.ndarray) and value.size > 16:
        return f"array(shape={value.shape}, dtype={value.dtype})"
    return _repr.repr(value)


def _with_dependency(tensor: tf.Tensor, assertions: list) -> tf.Tensor:
    """`tensor` through an identity that runs only after `assertions` (no-op when empty)."""
    if not assertions:
        return tensor
    with tf.control_dependencies(assertions):
        return tf.identity(tensor)


def float_tensor(x, name: str) -> tf.Tensor:
    """Converts `x` to a floating-point tensor of rank >= 1, or raises naming `name`.

    Raises:
        TypeError: `x` is not numeric, not floating-point, or a ragged/sparse tensor.
        ValueError: `x` is a ragged nested list (rows of different lengths), or a scalar.
    """
    if isinstance(x, tf.RaggedTensor | tf.SparseTensor):
        raise TypeError(
            f"`{name}` must be a dense tensor (pad ragged rows and pass a `mask`). "
            f"Received: {name} of type {type(x).__name__}"
        )
    if isinstance(x, tf.Tensor | tf.Variable):
        tensor = tf.convert_to_tensor(x)
    else:
        try:
            array = np.asarray(x)
        except ValueError:
            # numpy refuses nested lists whose rows differ in length ("inhomogeneous shape").
            raise ValueError(
                f"`{name}` must be a rectangular array: nested lists must have the same length "
                f"at each level (pad short rows and pass a `mask`). Received: {name}={_short(x)}"
            ) from None
        if array.dtype == object:
            raise TypeError(f"`{name}` must be a numeric tensor. Received: {name}={_short(x)}")
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


def _empty_axis_message(name: str) -> str:
    return (
        f"`{name}` must have at least one entry along `axis` (the axis to select along); "
        "it is empty."
    )


def check_axis_length(x: tf.Tensor, axis: int, name: str = "scores") -> tf.Tensor:
    """Requires at least one entry along `axis` of `x` and returns `x`.

    A statically empty axis is a `ValueError` naming `name` and echoing the shape. A dynamic
    length (inside `tf.function`) is checked by a graph assertion (an `InvalidArgumentError`
    with the same message); the returned tensor depends on it. Under XLA the assertion is
    dropped, but an empty axis then gives an empty output, so nothing plausible is returned.

    Args:
        x: the tensor, of known rank.
        axis: a valid (possibly negative) axis of `x`.
        name: the argument's name in messages.

    Returns:
        `x`, or in a graph with a dynamic length, `x` through an identity after the check.
    """
    n = x.shape[axis]
    if n == 0:
        raise ValueError(
            f"{_empty_axis_message(name)} Received: {name}.shape={x.shape}, axis={axis}"
        )
    if n is not None or tf.executing_eagerly():
        return x
    shape = tf.shape(x)
    assertion = tf.debugging.Assert(
        shape[axis] > 0,
        [f"{_empty_axis_message(name)} Received: {name}.shape=", shape, f"axis={axis}"],
    )
    return _with_dependency(x, [assertion])


def compute_dtype(dtype: tf.DType) -> tf.DType:
    """The dtype the transport is solved in: float32 for half precision, else `dtype`."""
    return tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype


def normalize_axis(axis: int, rank: int, name: str = "axis") -> int:
    """Returns `axis` (an int, numpy ints included) as a non-negative int, or raises."""
    if isinstance(axis, bool | np.bool_) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"`{name}` must be an int. Received: {name}={axis!r}")
    if not -rank <= axis < rank:
        raise ValueError(
            f"`{name}` is out of range for a tensor of rank {rank}. Received: {name}={axis}"
        )
    return int(axis) % rank


def epsilon_minimum(dtype: tf.DType | str) -> float:
    """The smallest accepted `epsilon` for scores of `dtype`: 8 machine epsilons.

    Measured on the compute dtype (`compute_dtype`: float32 for half precision), so about
    9.5e-7 for float32/float16/bfloat16 scores and 1.8e-15 for float64. Below it the
    transport's logits `1 / epsilon` overwhelm the dtype's precision and the memberships
    turn NaN. (float32 problems with many targets are solved in float64 internally; the
    minimum still follows the scores' compute dtype.)

    Args:
        dtype: the scores' dtype (or its compute dtype).

    Returns:
        The minimum as a Python float (an exact power of two).
    """
    dtype = compute_dtype(tf.as_dtype(dtype))
    return EPSILON_ULPS * float(np.finfo(dtype.as_numpy_dtype).eps)


def epsilon_too_small_message(dtype: tf.DType) -> str:
    """The message for an `epsilon` below `epsilon_minimum(dtype)` (without `Received:`)."""
    minimum = epsilon_minimum(dtype)
    hint = "" if dtype == tf.float64 else " Use float64 scores for a sharper selection."
    return (
        f"`epsilon` is too small for {dtype.name} computations: it must be >= {minimum:.4g} "
        f"(8 x the {dtype.name} machine epsilon), or the memberships underflow to NaN.{hint}"
    )


def epsilon_ok(eps_tensor, dtype: tf.DType) -> tf.Tensor:
    """Whether `epsilon` is usable: a scalar bool tensor, finite and >= `epsilon_minimum`.

    Works under XLA (where `check_epsilon`'s graph assertions are dropped), so that the caller
    can put NaN in its output when it is False, e.g. for a negative or underflowing tensor
    epsilon.

    Args:
        eps_tensor: `epsilon`, a scalar tensor (or number).
        dtype: the scores' dtype or their compute dtype.

    Returns:
        A scalar boolean tensor.
    """
    dtype = compute_dtype(tf.as_dtype(dtype))
    eps = tf.cast(tf.reshape(tf.convert_to_tensor(eps_tensor), []), dtype)
    minimum = tf.constant(epsilon_minimum(dtype), dtype)
    return tf.logical_and(tf.math.is_finite(eps), eps >= minimum)


def check_epsilon(epsilon, dtype: tf.DType) -> tf.Tensor:
    """Validates `epsilon` and returns it as a scalar tensor of `dtype`.

    `epsilon` may be a Python number or a scalar tensor/variable (a layer's annealed epsilon).
    It must be finite, > 0 and >= `epsilon_minimum(dtype)` (8 machine epsilons of the compute
    dtype: about 9.5e-7 in float32, 1.8e-15 in float64). Numbers and eager tensors are checked
    here (`ValueError`); in a graph, by assertions (`InvalidArgumentError` with the same
    messages) on which the returned tensor depends. XLA drops the assertions: see `epsilon_ok`.

    Args:
        epsilon: a positive float, or a scalar floating-point tensor.
        dtype: the compute dtype of the scores.

    Returns:
        `epsilon` as a scalar tensor of `dtype`.
    """
    dtype = compute_dtype(tf.as_dtype(dtype))
    minimum = epsilon_minimum(dtype)
    if isinstance(epsilon, bool | np.bool_) or epsilon is None:
        raise TypeError(f"`epsilon` must be a positive float. Received: epsilon={epsilon!r}")
    if isinstance(epsilon, numbers.Real):
        value = float(epsilon)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"`epsilon` must be a finite number > 0. Received: epsilon={epsilon!r}"
            )
        if value < minimum:
            raise ValueError(f"{epsilon_too_small_message(dtype)} Received: epsilon={epsilon!r}")
        return tf.constant(value, dtype)
    if isinstance(epsilon, str | bytes):
        raise TypeError(f"`epsilon` must be a positive float. Received: epsilon={epsilon!r}")
    try:
        tensor = tf.convert_to_tensor(epsilon)
    except (TypeError, ValueError):
        raise TypeError(
            f"`epsilon` must be a positive float or a scalar float tensor. "
            f"Received: epsilon={_short(epsilon)}"
        ) from None
    if not tensor.dtype.is_floating:
        raise TypeError(
            f"`epsilon` must be a positive float. Received: epsilon.dtype={tensor.dtype.name}"
        )
    if tensor.shape.rank not in (0, None):
        raise ValueError(f"`epsilon` must be a scalar. Received: epsilon.shape={tensor.shape}")
    original = tf.reshape(tensor, [])
    cast = tf.cast(original, dtype)
    if tf.executing_eagerly():
        value = float(original)
        if not (math.isfinite(value) and value > 0 and math.isfinite(float(cast))):
            raise ValueError(f"`epsilon` must be a finite number > 0. Received: epsilon={value}")
        if value < minimum or float(cast) < minimum:
            raise ValueError(f"{epsilon_too_small_message(dtype)} Received: epsilon={value}")
        return cast
    # Positivity on the value received, the minimum on the value the solver will use.
    positive = tf.logical_and(
        tf.logical_and(original > 0, tf.math.is_finite(original)), tf.math.is_finite(cast)
    )
    large_enough = tf.logical_or(tf.logical_not(positive), cast >= tf.constant(minimum, dtype))
    assertions = [
        tf.debugging.Assert(
            positive, ["`epsilon` must be a finite number > 0. Received: epsilon=", original]
        ),
        tf.debugging.Assert(
            large_enough,
            [f"{epsilon_too_small_message(dtype)} Received: epsilon=", original],
        ),
    ]
    return _with_dependency(cast, assertions)


def check_solver(solver: str) -> str:
    """One of "auto", "newton", "sinkhorn", or a `ValueError`."""
    if not isinstance(solver, str) or solver not in _SOLVERS:
        raise ValueError(f"`solver` must be one of {_SOLVERS}. Received: solver={solver!r}")
    return solver


def _is_non_number(value) -> bool:
    """Whether a scalar is something `float()` would wrongly accept as a level."""
    return value is None or isinstance(value, bool | np.bool_ | str | bytes)


def _real_levels(value, name: str, expected: str) -> tuple[tuple[float, ...], bool]:
    """`value` (a number or a flat sequence/array of numbers) as floats; whether it was scalar.

    Strings (even "0.5"), bools, None and complex numbers are a `TypeError`; nested or
    ragged sequences a `ValueError`. Range checks (NaN included) are the caller's.
    """
    received = f"Received: {name}={_short(value)}"
    if _is_non_number(value):
        raise TypeError(f"`{name}` must be {expected}. {received}")
    if isinstance(value, list | tuple) and any(_is_non_number(v) for v in value):
        raise TypeError(f"`{name}` must be {expected}; strings, bools and None are not. {received}")
    if not isinstance(value, numbers.Real | Sequence | np.ndarray | tf.Tensor | tf.Variable):
        raise TypeError(f"`{name}` must be {expected}. {received}")
    try:
        array = np.asarray(value)
    except ValueError:
        raise ValueError(f"`{name}` must be {expected} (a flat list). {received}") from None
    except (TypeError, NotImplementedError):  # symbolic tensors
        raise TypeError(
            f"`{name}` must be {expected}, known when the op is called (not a symbolic "
            f"tensor). {received}"
        ) from None
    if array.dtype == object:
        flat = array.ravel()
        if not all(isinstance(v, numbers.Real) and not _is_non_number(v) for v in flat):
            if any(isinstance(v, Sequence | np.ndarray) for v in flat):
                raise ValueError(f"`{name}` must be {expected} (a flat list). {received}")
            raise TypeError(f"`{name}` must be {expected}. {received}")
        array = array.astype(np.float64)
    if array.dtype.kind not in "iuf":
        raise TypeError(f"`{name}` must be {expected}. {received}")
    if array.ndim > 1:
        raise ValueError(
            f"`{name}` must be {expected} (a flat list, not an array of shape "
            f"{array.shape}). {received}"
        )
    return tuple(float(v) for v in array.ravel()), array.ndim == 0


def check_quantiles(quantiles, name: str = "quantiles") -> tuple[float, ...]:
    """Validates a non-empty, strictly increasing flat sequence of levels in (0, 1).

    A single number is accepted as a one-level sequence.

    Raises:
        TypeError: a level is not a number (strings, bools, None), or `quantiles` is not a
            number or sequence.
        ValueError: `quantiles` is nested, empty, out of (0, 1) (NaN included) or not
            strictly increasing.
    """
    values, _ = _real_levels(quantiles, name, "a sequence of floats in (0, 1)")
    received = f"Received: {name}={_short(quantiles)}"
    if not values:
        raise ValueError(f"`{name}` must not be empty. {received}")
    if any(not (0.0 < q < 1.0) for q in values):
        raise ValueError(f"`{name}` must lie strictly in (0, 1). {received}")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"`{name}` must be strictly increasing. {received}")
    return values


def check_probabilities(q, name: str = "q") -> tuple[tuple[float, ...], bool]:
    """Validates quantile levels in [0, 1] (any order); returns them and whether q was scalar.

    Raises:
        TypeError: a level is not a number (strings, bools, None).
        ValueError: `q` is nested or empty, or a level is outside [0, 1] (NaN included).
    """
    levels, scalar = _real_levels(q, name, "a float or a flat list of floats")
    received = f"Received: {name}={_short(q)}"
    if not levels:
        raise ValueError(f"`{name}` must be a float or a flat list of floats. {received}")
    if any(not (0.0 <= v <= 1.0) for v in levels):
        raise ValueError(f"`{name}` must lie in [0, 1]. {received}")
    return levels, scalar


def _shapes_equal(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Scalar bool: `a` and `b` have the same run-time shape (ranks may differ)."""
    shape_a, shape_b = tf.shape(a), tf.shape(b)
    if a.shape.rank is not None and a.shape.rank == b.shape.rank:
        return tf.reduce_all(tf.equal(shape_a, shape_b))
    return tf.cond(
        tf.equal(tf.size(shape_a), tf.size(shape_b)),
        lambda: tf.reduce_all(tf.equal(shape_a, shape_b)),
        lambda: tf.constant(False),
    )


def check_mask(mask, scores: tf.Tensor) -> tf.Tensor | None:
    """Validates a boolean padding mask of the same shape as `scores`.

    Static shapes are checked here (`ValueError`); dynamic ones by a graph assertion on which
    the returned mask depends.

    Returns:
        The mask as a boolean tensor, or None.
    """
    if mask is None:
        return None
    if isinstance(mask, tf.RaggedTensor | tf.SparseTensor):
        raise TypeError(
            f"`mask` must be a dense boolean tensor. Received: mask of type {type(mask).__name__}"
        )
    try:
        mask = tf.convert_to_tensor(mask)
    except (TypeError, ValueError):
        raise ValueError(
            f"`mask` must be a rectangular boolean tensor like the scores. "
            f"Received: mask={_short(mask)}"
        ) from None
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
    if tf.executing_eagerly() or (
        mask.shape.is_fully_defined() and scores.shape.is_fully_defined()
    ):
        return mask
    assertion = tf.debugging.Assert(
        _shapes_equal(mask, scores),
        [
            "`mask` must have the same shape as the scores. Received: mask.shape=",
            tf.shape(mask),
            "scores.shape=",
            tf.shape(scores),
        ],
    )
    return _with_dependency(mask, [assertion])


def check_same_shape(
    values: tf.Tensor, scores: tf.Tensor, name: str = "values"
) -> tuple[tf.Tensor, tf.Tensor]:
    """Requires `values` and `scores` to have the same shape.

    Static shapes are checked here: incompatible ones raise a `ValueError` naming `name` and
    echoing both shapes. Shapes not fully known (inside `tf.function`) are checked at run time
    by a graph assertion (`InvalidArgumentError` with the same message). The returned `values`
    depends on that assertion, so use it in place of the argument: every op that reads it then
    runs after the check, and a mismatch fails with this message rather than with a downstream
    op's (e.g. `SelectV2 ... must be broadcastable`).

    XLA drops assertions. `shapes_ok` is a scalar boolean tensor, True when the shapes match
    (a constant True when both are static); under `jit_compile` the caller should turn its
    output into NaN when it is False, so a mismatch never yields a plausible result.

    Args:
        values: a float tensor that must be shaped like `scores`.
        scores: the scores tensor.
        name: the name of `values` in messages.

    Returns:
        `(values, shapes_ok)`: the checked values and the scalar boolean check result.
    """
    message = f"`{name}` and `scores` must have the same shape."
    if not values.shape.is_compatible_with(scores.shape):
        raise ValueError(
            f"{message} Received: {name}.shape={values.shape}, scores.shape={scores.shape}"
        )
    if values.shape.is_fully_defined() and scores.shape.is_fully_defined():
        return values, tf.constant(True)
    shapes_ok = _shapes_equal(values, scores)
    if tf.executing_eagerly():  # unreachable in practice: eager shapes are always known
        return values, shapes_ok
    assertion = tf.debugging.Assert(
        shapes_ok,
        [f"{message} Received: {name}.shape=", tf.shape(values), "scores.shape=", tf.shape(scores)],
    )
    return _with_dependency(values, [assertion]), _with_dependency(shapes_ok, [assertion])


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


def assert_finite_scores(x: tf.Tensor, valid: tf.Tensor | None, name: str = "scores") -> tf.Tensor:
    """Raises if the rows `x` (`[rows, n]`) are empty along `n`, or a valid entry is not finite.

    Eagerly (or for a statically empty axis) this is a `ValueError`; inside `tf.function` an
    `InvalidArgumentError` carrying the same message, on which the returned tensor depends.
    Under XLA the check cannot raise: the ops keep a NaN confined to its own batch row instead.

    Args:
        x: the scores as rows, the selection axis last.
        valid: optional boolean tensor like `x`, False for padding.
        name: the argument's name in messages.

    Returns:
        `x` (in a graph, through an identity that runs after the checks).
    """
    if x.shape[-1] == 0:
        # Normally caught earlier, with the full shape, by `check_axis_length`.
        raise ValueError(f"{_empty_axis_message(name)} Received: {name}.shape[axis]=0")
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
        return x
    assertions = [tf.debugging.Assert(all_finite, [message + "."])]
    if x.shape[-1] is None:
        length = tf.shape(x)[-1]
        assertions.append(
            tf.debugging.Assert(
                length > 0, [f"{_empty_axis_message(name)} Received: {name}.shape[axis]=", length]
            )
        )
    return _with_dependency(x, assertions)


def check_split_quantile(quantile) -> float:
    """The level q of a lower/upper split, a real number in (0, 0.5] (NaN is a ValueError)."""
    if _is_non_number(quantile) or not isinstance(quantile, numbers.Real):
        raise TypeError(f"`quantile` must be a float in (0, 0.5]. Received: quantile={quantile!r}")
    if not 0.0 < float(quantile) <= 0.5:
        raise ValueError(f"`quantile` must lie in (0, 0.5]. Received: quantile={quantile!r}")
    return float(quantile)
