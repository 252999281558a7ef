"""Argument checks and argument rules shared by the public ops, layers and model.

Every public op validates its inputs once, at its boundary, through these helpers, so that a
bad argument fails with a `ValueError`/`TypeError` that names the argument and echoes the value
received (Keras style: the message ends with `Received: name=value`), never with an opaque
backend traceback. The helpers take and return the active Keras backend's tensors (and accept
numpy arrays and nested lists); dtypes are given and returned as strings ("float32").

This module is also the one home of the rules the package states in several places: the
default `epsilon`, the solver names, the outputs of a split, the hard split size
`floor(quantile * n)` and the smallest usable `epsilon` of a dtype.

Checks that depend on run-time values (dynamic shapes inside `tf.function`, a tensor `epsilon`)
raise when the values can be read (eager execution), and are otherwise TensorFlow graph
assertions. The helpers return the checked tensor passed through an identity that depends on
the assertion: use the returned tensor in place of the argument, so that the assertion runs
before any op that could fail on the bad input with a less helpful message. XLA and `jax.jit`
cannot raise; for those checks a boolean "ok" tensor is available (`check_same_shape`,
`epsilon_ok`) so that the caller can turn its output into NaN instead of a plausible number.
"""

from __future__ import annotations

import itertools
import math
import numbers
import reprlib
import sys
from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from keras_softquantile.ops import _backend

__all__: list[str] = []

DEFAULT_EPSILON = 1e-2
"""The default smoothing `epsilon` of the soft ops: the width, in quantile-level units (the
scores are squashed per row, so it does not depend on their scale), of each soft bucket
boundary."""

SOLVERS = ("auto", "newton", "sinkhorn")
"""The transport solvers an op, layer or model accepts as `solver`."""

SPLIT_OUTPUTS = ("weights", "mean", "sorted")
"""What a lower/upper split returns (`output`): the soft bucket weights, the weighted means of
the values, or the values in each bucket in score order."""

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
"""The floating-point dtypes accepted for scores and values."""

# Machine epsilons between `epsilon` and the smallest usable smoothing: below about this many
# ulps of 1, `1 / epsilon` and the memberships' logits lose all precision (NaN memberships).
EPSILON_ULPS = 8

# Added to `quantile * n` before the floor, so that a product that rounds just below an
# integer (0.29 * 100 = 28.999999999999996) still counts that entry.
_SPLIT_SLACK = 1e-9

_repr = reprlib.Repr()
_repr.maxlist = _repr.maxtuple = 8
_repr.maxother = _repr.maxstring = 80
_repr.maxlevel = 3


def _short(value) -> str:
    """`repr(value)`, shortened for large nested lists and arrays."""
    if isinstance(value, np.ndarray) and value.size > 16:
        return f"array(shape={value.shape}, dtype={value.dtype})"
    return _repr.repr(value)


def _dtype_name(dtype) -> str:
    """A dtype (string, numpy, or any backend's) as Keras's standard name, e.g. "float32"."""
    try:
        return keras.backend.standardize_dtype(dtype)
    except (TypeError, ValueError):  # dtypes Keras does not know (strings, resources)
        return str(getattr(dtype, "name", dtype))


def _is_tensor(x) -> bool:
    """Whether `x` is a tensor of the active backend (a tracer included) or a Keras variable."""
    return isinstance(x, keras.Variable) or ops.is_tensor(x)


def _not_dense(x) -> bool:
    """Whether `x` is a ragged or sparse tensor of an imported framework.

    Looked up in `sys.modules` rather than imported: an object can only be one of these types
    if its framework is loaded already.
    """
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(x, tf.RaggedTensor | tf.SparseTensor):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor) and x.layout != torch.strided:
        return True
    sparse = sys.modules.get("jax.experimental.sparse")
    return sparse is not None and isinstance(x, sparse.JAXSparse)


def _static_shape(x) -> tuple | None:
    """The static shape of `x` as a tuple (None for unknown dimensions), or None when even
    the rank is unknown (possible only for TensorFlow graph tensors)."""
    try:
        return tuple(x.shape)
    except ValueError:  # TensorFlow: "Cannot take the length of shape with unknown rank"
        return None


def _shape_text(x) -> str:
    shape = _static_shape(x)
    return "<unknown>" if shape is None else str(shape)


def _fully_defined(shape: tuple | None) -> bool:
    return shape is not None and all(d is not None for d in shape)


def _compatible(a: tuple | None, b: tuple | None) -> bool:
    """Whether static shapes may describe the same tensor (unknown parts match anything)."""
    if a is None or b is None:
        return True
    if len(a) != len(b):
        return False
    return all(x is None or y is None or x == y for x, y in zip(a, b, strict=True))


def _shape_vector(x):
    """The run-time shape of `x` (of known rank) as a 1-D int32 tensor, for messages."""
    return ops.stack([ops.cast(d, "int32") for d in ops.shape(x)])


def float_tensor(x, name: str):
    """Converts `x` to a floating-point tensor of rank >= 1, or raises naming `name`.

    Accepts the active backend's tensors and `keras.Variable`s (kept as they are, so they stay
    differentiable and traceable), numpy arrays and (nested) lists of floats. Arrays and lists
    keep their own precision: a list of Python floats is float64 (float32 on JAX without
    `jax_enable_x64`).

    Raises:
        TypeError: `x` is not numeric, not floating-point, or a ragged/sparse tensor.
        ValueError: `x` is a ragged nested list (rows of different lengths), or a scalar.
    """
    if _not_dense(x):
        raise TypeError(
            f"`{name}` must be a dense tensor (pad ragged rows and pass a `mask`). "
            f"Received: {name} of type {type(x).__name__}"
        )
    if _is_tensor(x):
        tensor = ops.convert_to_tensor(x)
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
        if _dtype_name(array.dtype) not in FLOAT_DTYPES:
            raise TypeError(
                f"`{name}` must be a floating-point tensor (float16, bfloat16, float32 or "
                f"float64). Received: {name}.dtype={array.dtype}"
            )
        tensor = ops.convert_to_tensor(array)
    dtype = _dtype_name(tensor.dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"`{name}` must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64). Received: {name}.dtype={dtype}"
        )
    if _static_shape(tensor) == ():
        raise ValueError(
            f"`{name}` must have at least one dimension (the axis to select along). "
            f"Received: {name}.shape=()"
        )
    return tensor


def _empty_axis_message(name: str) -> str:
    return (
        f"`{name}` must have at least one entry along `axis` (the axis to select along); "
        "it is empty."
    )


def check_axis_length(x, axis: int, name: str = "scores"):
    """Requires at least one entry along `axis` of `x` and returns `x`.

    A statically empty axis is a `ValueError` naming `name` and echoing the shape. A dynamic
    length (inside `tf.function`) is checked by a graph assertion (an `InvalidArgumentError`
    with the same message); the returned tensor depends on it. Under XLA the assertion is
    dropped, but an empty axis then gives an empty output, so nothing plausible is returned.
    (JAX and PyTorch shapes are always static.)

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
            f"{_empty_axis_message(name)} Received: {name}.shape={_shape_text(x)}, axis={axis}"
        )
    if n is not None or _backend.values_available(x):
        return x
    assertions = _backend.assert_that(
        ops.shape(x)[axis] > 0,
        [f"{_empty_axis_message(name)} Received: {name}.shape=", _shape_vector(x), f"axis={axis}"],
    )
    return _backend.with_dependencies(x, assertions)


def compute_dtype(dtype) -> str:
    """The dtype the transport is solved in: "float32" for half precision, else `dtype`.

    Args:
        dtype: a dtype string or any backend's dtype.

    Returns:
        The dtype's standard name.
    """
    dtype = _dtype_name(dtype)
    return "float32" if dtype in ("float16", "bfloat16") else dtype


def normalize_axis(axis: int, rank: int, name: str = "axis") -> int:
    """Returns `axis` (an int, numpy ints included) as a non-negative int, or raises."""
    if isinstance(axis, bool | np.bool_) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"`{name}` must be an int. Received: {name}={axis!r}")
    if not -rank <= axis < rank:
        raise ValueError(
            f"`{name}` is out of range for a tensor of rank {rank}. Received: {name}={axis}"
        )
    return int(axis) % rank


def epsilon_minimum(dtype) -> float:
    """The smallest accepted `epsilon` for scores of `dtype`: 8 machine epsilons.

    Measured on the compute dtype (`compute_dtype`: float32 for half precision), so about
    9.5e-7 for float32/float16/bfloat16 scores and 1.8e-15 for float64. Below it the
    transport's logits `1 / epsilon` overwhelm the dtype's precision and the memberships
    turn NaN. (float32 problems with many targets are solved in float64 internally; the
    minimum still follows the scores' compute dtype.)

    Args:
        dtype: the scores' dtype (or its compute dtype), a string or any backend's dtype.

    Returns:
        The minimum as a Python float (an exact power of two).
    """
    return EPSILON_ULPS * float(np.finfo(compute_dtype(dtype)).eps)


def epsilon_too_small_message(dtype) -> str:
    """The message for an `epsilon` below `epsilon_minimum(dtype)` (without `Received:`).

    Names the compute dtype of `dtype` (float32 for half precision).
    """
    dtype = compute_dtype(dtype)
    minimum = epsilon_minimum(dtype)
    hint = "" if dtype == "float64" else " Use float64 scores for a sharper selection."
    return (
        f"`epsilon` is too small for {dtype} computations: it must be >= {minimum:.4g} "
        f"(8 x the {dtype} machine epsilon), or the memberships underflow to NaN.{hint}"
    )


def epsilon_ok(eps_tensor, dtype):
    """Whether `epsilon` is usable: a scalar bool tensor, finite and >= `epsilon_minimum`.

    Works under XLA and `jax.jit` (where `check_epsilon` cannot raise), so that the caller
    can put NaN in its output when it is False, e.g. for a negative or underflowing tensor
    epsilon.

    Args:
        eps_tensor: `epsilon`, a scalar tensor (or number).
        dtype: the scores' dtype or their compute dtype.

    Returns:
        A scalar boolean tensor.
    """
    dtype = compute_dtype(dtype)
    eps = ops.cast(ops.reshape(ops.convert_to_tensor(eps_tensor), ()), dtype)
    minimum = ops.convert_to_tensor(epsilon_minimum(dtype), dtype)
    return ops.logical_and(ops.isfinite(eps), ops.greater_equal(eps, minimum))


def check_positive(value, name: str) -> float:
    """A real number that is finite and > 0 (a smoothing, a noise scale), as a Python float.

    Raises:
        TypeError: `value` is not a real number (bools and None included).
        ValueError: `value` is not finite, or not > 0.
    """
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a positive float. Received: {name}={value!r}")
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"`{name}` must be a finite number > 0. Received: {name}={value!r}")
    return float(value)


def check_epsilon(epsilon, dtype):
    """Validates `epsilon` and returns it as a scalar tensor of `dtype`'s compute dtype.

    `epsilon` may be a Python number or a scalar tensor/variable (a layer's annealed epsilon).
    It must be finite, > 0 and >= `epsilon_minimum(dtype)` (8 machine epsilons of the compute
    dtype: about 9.5e-7 in float32, 1.8e-15 in float64). Numbers, and tensors whose values can
    be read (eager execution), are checked here (`ValueError`); inside a traced function, by
    assertions on which the returned tensor depends (tf.function: an `InvalidArgumentError`
    with the same messages). XLA and `jax.jit` cannot raise: see `epsilon_ok`.

    Args:
        epsilon: a positive float, or a scalar floating-point tensor.
        dtype: the compute dtype of the scores.

    Returns:
        `epsilon` as a scalar tensor of `dtype`.
    """
    dtype = compute_dtype(dtype)
    minimum = epsilon_minimum(dtype)
    if isinstance(epsilon, bool | np.bool_) or epsilon is None:
        raise TypeError(f"`epsilon` must be a positive float. Received: epsilon={epsilon!r}")
    if isinstance(epsilon, numbers.Real):
        value = check_positive(epsilon, "epsilon")
        if value < minimum:
            raise ValueError(f"{epsilon_too_small_message(dtype)} Received: epsilon={epsilon!r}")
        return ops.convert_to_tensor(value, dtype)
    if isinstance(epsilon, str | bytes):
        raise TypeError(f"`epsilon` must be a positive float. Received: epsilon={epsilon!r}")
    try:
        tensor = ops.convert_to_tensor(epsilon)
    except (TypeError, ValueError):
        raise TypeError(
            f"`epsilon` must be a positive float or a scalar float tensor. "
            f"Received: epsilon={_short(epsilon)}"
        ) from None
    received_dtype = _dtype_name(tensor.dtype)
    if received_dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"`epsilon` must be a positive float. Received: epsilon.dtype={received_dtype}"
        )
    shape = _static_shape(tensor)
    if shape not in ((), None):
        raise ValueError(f"`epsilon` must be a scalar. Received: epsilon.shape={shape}")
    original = ops.reshape(tensor, ())
    cast = ops.cast(original, dtype)
    if _backend.values_available(tensor):
        # Read the value received, not `original` / `cast`: under `jax.jit` even operations on
        # a concrete array give tracers.
        received = np.asarray(ops.convert_to_numpy(tensor)).reshape(())
        value = float(received)
        used = float(received.astype(dtype))
        if not (math.isfinite(value) and value > 0 and math.isfinite(used)):
            raise ValueError(f"`epsilon` must be a finite number > 0. Received: epsilon={value}")
        if value < minimum or used < minimum:
            raise ValueError(f"{epsilon_too_small_message(dtype)} Received: epsilon={value}")
        return cast
    # Positivity on the value received, the minimum on the value the solver will use.
    positive = ops.logical_and(
        ops.logical_and(ops.greater(original, 0), ops.isfinite(original)), ops.isfinite(cast)
    )
    large_enough = ops.logical_or(
        ops.logical_not(positive), ops.greater_equal(cast, ops.convert_to_tensor(minimum, dtype))
    )
    assertions = [
        *_backend.assert_that(
            positive, ["`epsilon` must be a finite number > 0. Received: epsilon=", original]
        ),
        *_backend.assert_that(
            large_enough, [f"{epsilon_too_small_message(dtype)} Received: epsilon=", original]
        ),
    ]
    return _backend.with_dependencies(cast, assertions)


def check_solver(solver: str) -> str:
    """One of `SOLVERS` ("auto", "newton", "sinkhorn"), or a `ValueError`."""
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"`solver` must be one of {SOLVERS}. Received: solver={solver!r}")
    return solver


def check_split_output(output: str) -> str:
    """One of `SPLIT_OUTPUTS` ("weights", "mean", "sorted"), or a `ValueError`."""
    if not isinstance(output, str) or output not in SPLIT_OUTPUTS:
        raise ValueError(f"`output` must be one of {SPLIT_OUTPUTS}. Received: output={output!r}")
    return output


def _is_non_number(value) -> bool:
    """Whether a scalar is something `float()` would wrongly accept as a level."""
    return value is None or isinstance(value, bool | np.bool_ | str | bytes)


def _real_levels(value, name: str, expected: str) -> tuple[tuple[float, ...], bool]:
    """`value` (a number or a flat sequence/array/tensor of numbers) as floats; whether it was
    scalar.

    Strings (even "0.5"), bools, None and complex numbers are a `TypeError`; nested or
    ragged sequences a `ValueError`; tensors whose values are not known when the op is called
    (traced tensors) a `TypeError`. Range checks (NaN included) are the caller's.
    """
    received = f"Received: {name}={_short(value)}"
    if _is_non_number(value):
        raise TypeError(f"`{name}` must be {expected}. {received}")
    if isinstance(value, list | tuple) and any(_is_non_number(v) for v in value):
        raise TypeError(f"`{name}` must be {expected}; strings, bools and None are not. {received}")
    tensor = _is_tensor(value)
    if not (tensor or isinstance(value, numbers.Real | Sequence | np.ndarray)):
        raise TypeError(f"`{name}` must be {expected}. {received}")
    try:
        array = ops.convert_to_numpy(value) if tensor else np.asarray(value)
    except ValueError:
        raise ValueError(f"`{name}` must be {expected} (a flat list). {received}") from None
    except (TypeError, NotImplementedError, RuntimeError):  # traced tensors
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
    if _dtype_name(array.dtype) == "bfloat16":  # ml_dtypes' bfloat16 is not a numpy float
        array = array.astype(np.float32)
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


def _shapes_equal(a, b):
    """Scalar bool tensor: `a` and `b` (of the same known rank) have the same run-time shape."""
    return ops.all(ops.equal(_shape_vector(a), _shape_vector(b)))


def _require_rank(x, name: str, other) -> None:
    """Inside a traced function, a tensor of unknown rank cannot be compared with `other`
    using `keras.ops` (only TensorFlow graphs have such tensors): a `ValueError`."""
    if _static_shape(x) is None:
        raise ValueError(
            f"`{name}` must have a known rank (that of the scores, {len(other.shape)}) "
            f"inside a traced function. Received: {name}.shape=<unknown>"
        )


def check_mask(mask, scores):
    """Validates a boolean padding mask of the same shape as `scores`.

    Static shapes are checked here (`ValueError`); dynamic ones (inside `tf.function`) by a
    graph assertion on which the returned mask depends.

    Returns:
        The mask as a boolean tensor of the active backend, or None.
    """
    if mask is None:
        return None
    if _not_dense(mask):
        raise TypeError(
            f"`mask` must be a dense boolean tensor. Received: mask of type {type(mask).__name__}"
        )
    if not _is_tensor(mask):
        try:
            array = np.asarray(mask)
        except (TypeError, ValueError):
            array = None
        if array is None or array.dtype == object:
            raise ValueError(
                f"`mask` must be a rectangular boolean tensor like the scores. "
                f"Received: mask={_short(mask)}"
            )
        if array.dtype != bool:
            raise TypeError(
                f"`mask` must be a boolean tensor (True = valid entry). "
                f"Received: mask.dtype={_dtype_name(array.dtype)}"
            )
        mask = array
    mask = ops.convert_to_tensor(mask)
    dtype = _dtype_name(mask.dtype)
    if dtype != "bool":
        raise TypeError(
            f"`mask` must be a boolean tensor (True = valid entry). Received: mask.dtype={dtype}"
        )
    mask_shape, scores_shape = _static_shape(mask), _static_shape(scores)
    if not _compatible(mask_shape, scores_shape):
        raise ValueError(
            f"`mask` must have the same shape as the scores. "
            f"Received: mask.shape={_shape_text(mask)}, scores.shape={_shape_text(scores)}"
        )
    if _backend.values_available(mask, scores) or (
        _fully_defined(mask_shape) and _fully_defined(scores_shape)
    ):
        return mask
    _require_rank(mask, "mask", scores)
    assertions = _backend.assert_that(
        _shapes_equal(mask, scores),
        [
            "`mask` must have the same shape as the scores. Received: mask.shape=",
            _shape_vector(mask),
            "scores.shape=",
            _shape_vector(scores),
        ],
    )
    return _backend.with_dependencies(mask, assertions)


def check_same_shape(values, scores, name: str = "values"):
    """Requires `values` and `scores` to have the same shape.

    Static shapes are checked here: incompatible ones raise a `ValueError` naming `name` and
    echoing both shapes. Shapes not fully known (inside `tf.function`) are checked at run time
    by a graph assertion (`InvalidArgumentError` with the same message). The returned `values`
    depends on that assertion, so use it in place of the argument: every op that reads it then
    runs after the check, and a mismatch fails with this message rather than with a downstream
    op's (e.g. `SelectV2 ... must be broadcastable`).

    XLA drops assertions. `shapes_ok` is a scalar boolean tensor, True when the shapes match
    (a constant True when both are static, as they always are on JAX and PyTorch); under
    `jit_compile` the caller should turn its output into NaN when it is False, so a mismatch
    never yields a plausible result.

    Args:
        values: a float tensor that must be shaped like `scores`.
        scores: the scores tensor.
        name: the name of `values` in messages.

    Returns:
        `(values, shapes_ok)`: the checked values and the scalar boolean check result.
    """
    message = f"`{name}` and `scores` must have the same shape."
    values_shape, scores_shape = _static_shape(values), _static_shape(scores)
    if not _compatible(values_shape, scores_shape):
        raise ValueError(
            f"{message} Received: {name}.shape={_shape_text(values)}, "
            f"scores.shape={_shape_text(scores)}"
        )
    if _fully_defined(values_shape) and _fully_defined(scores_shape):
        return values, ops.convert_to_tensor(True)
    _require_rank(values, name, scores)
    shapes_ok = _shapes_equal(values, scores)
    if _backend.values_available(values, scores):  # unreachable: eager shapes are known
        return values, shapes_ok
    assertions = _backend.assert_that(
        shapes_ok,
        [
            f"{message} Received: {name}.shape=",
            _shape_vector(values),
            "scores.shape=",
            _shape_vector(scores),
        ],
    )
    return (
        _backend.with_dependencies(values, assertions),
        _backend.with_dependencies(shapes_ok, assertions),
    )


def static_length(x, axis: int, op: str, minimum: int = 0) -> int:
    """The static length of `axis`, required by ops whose output size depends on it."""
    n = x.shape[axis]
    if n is None:
        raise ValueError(
            f"`{op}` needs a statically known length along `axis` (its output size depends "
            f"on it). Received: shape={_shape_text(x)}, axis={axis}"
        )
    if n < minimum:
        raise ValueError(
            f"`{op}` needs at least {minimum} entry along `axis`. "
            f"Received: shape={_shape_text(x)}, axis={axis}"
        )
    return int(n)


def assert_finite_scores(x, valid, name: str = "scores"):
    """Raises if the rows `x` (`[rows, n]`) are empty along `n`, or a valid entry is not finite.

    When the values can be read (eager execution), or for a statically empty axis, this is a
    `ValueError`; inside a traced function a graph assertion (tf.function: an
    `InvalidArgumentError` carrying the same message), on which the returned tensor depends.
    Under XLA and `jax.jit` the check cannot raise: the ops keep a NaN confined to its own
    batch row instead.

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
    finite = ops.isfinite(x)
    if valid is not None:
        finite = ops.logical_or(finite, ops.logical_not(valid))
    message = f"`{name}` must be finite: it contains NaN or infinite values at valid positions"
    tensors = (x,) if valid is None else (x, valid)
    if _backend.values_available(*tensors):
        if not bool(ops.convert_to_numpy(ops.all(finite))):
            bad = ops.convert_to_numpy(x)[~ops.convert_to_numpy(finite)]
            raise ValueError(
                f"{message}. Received: {name} with {int(bad.size)} non-finite "
                f"entries, the first being {float(bad[0])}"
            )
        return x
    assertions = _backend.assert_that(ops.all(finite), [message + "."])
    if x.shape[-1] is None:
        length = ops.shape(x)[-1]
        assertions += _backend.assert_that(
            length > 0, [f"{_empty_axis_message(name)} Received: {name}.shape[axis]=", length]
        )
    return _backend.with_dependencies(x, assertions)


def check_split_quantile(quantile) -> float:
    """The level q of a lower/upper split, a real number in (0, 0.5] (NaN is a ValueError)."""
    if _is_non_number(quantile) or not isinstance(quantile, numbers.Real):
        raise TypeError(f"`quantile` must be a float in (0, 0.5]. Received: quantile={quantile!r}")
    if not 0.0 < float(quantile) <= 0.5:
        raise ValueError(f"`quantile` must lie in (0, 0.5]. Received: quantile={quantile!r}")
    return float(quantile)


def hard_split_size(n: int, quantile: float) -> int:
    """The number of entries in each of the lower and upper buckets of a split of `n` entries,
    `floor(quantile * n)`: what the hard split holds, and the length of `output="sorted"`.

    The product is floored with a slack of 1e-9, so that one that rounds just below an
    integer (0.29 * 100 = 28.999999999999996) still counts that entry.

    Args:
        n: the number of (valid) entries, a Python int.
        quantile: the split level, in (0, 0.5].

    Returns:
        The bucket size, a Python int.
    """
    return math.floor(quantile * n + _SPLIT_SLACK)


def hard_split_sizes(counts, quantile: float, n: int | None = None):
    """`hard_split_size` of each entry of the int tensor `counts` (valid entries per row), as
    an int32 tensor of the same shape, equal to the Python rule on every backend.

    Computed in float64 where the backend has it. Without float64 (JAX without
    `jax_enable_x64`), float32 would count one entry fewer for some levels in long rows
    (0.123 from 133813 entries on), so the sizes are then looked up in a table of the `n + 1`
    possible counts made in Python.

    Args:
        counts: an int tensor of valid-entry counts, each in `[0, n]`.
        quantile: the split level, in (0, 0.5].
        n: the static row length (the largest possible count), or None when unknown.

    Returns:
        An int32 tensor shaped like `counts`.
    """
    if _backend.float64_available() or n is None:
        dtype = "float64" if _backend.float64_available() else "float32"
        # `convert_to_tensor` with the dtype, not `cast`: TensorFlow would round the Python
        # float to float32 first (0.29 -> 0.28999999165).
        product = ops.convert_to_tensor(quantile, dtype) * ops.cast(counts, dtype)
        return ops.cast(ops.floor(product + ops.convert_to_tensor(_SPLIT_SLACK, dtype)), "int32")
    # The same float64 products as `hard_split_size`, made by numpy.
    table = np.floor(quantile * np.arange(n + 1, dtype=np.float64) + _SPLIT_SLACK)
    return ops.take(ops.convert_to_tensor(table.astype(np.int32)), counts, axis=0)


def min_split_length(quantile: float) -> int:
    """The fewest valid entries for which each bucket of a split at `quantile` holds at least
    one entry (`hard_split_size(n, quantile) >= 1`)."""
    length = max(1, math.ceil(1 / quantile) - 1)
    while hard_split_size(length, quantile) < 1:
        length += 1
    return length
