"""Shared machinery of the soft selection layers: epsilon weight, argument checks, masks."""

from __future__ import annotations

import math
import numbers

import keras
import numpy as np
import tensorflow as tf

from keras_softquantile.ops import _validation

__all__: list[str] = []

_SOLVERS = ("auto", "newton", "sinkhorn")


def check_epsilon(epsilon, dtype: str | tf.DType | None = None) -> float:
    """Validates a construction-time `epsilon` and returns it as a float.

    It must be a finite real number > 0 and, when the layer's compute `dtype` is given, at
    least `_validation.epsilon_minimum(dtype)` (8 machine epsilons of the dtype the transport
    is solved in: about 9.5e-7 for float32 and half-precision layers, 1.8e-15 for float64).

    Args:
        epsilon: the value to check.
        dtype: the layer's compute dtype, or None to skip the minimum.

    Returns:
        `epsilon` as a Python float.
    """
    if isinstance(epsilon, bool | np.bool_) or not isinstance(epsilon, numbers.Real):
        raise TypeError(f"`epsilon` must be a positive float. Received: epsilon={epsilon!r}")
    if not (math.isfinite(float(epsilon)) and float(epsilon) > 0):
        raise ValueError(f"`epsilon` must be a finite number > 0. Received: epsilon={epsilon!r}")
    if dtype is not None:
        # The ops' minimum and message, so that a layer fails at construction, not at call.
        dtype = _validation.compute_dtype(tf.as_dtype(keras.backend.standardize_dtype(dtype)))
        if float(epsilon) < _validation.epsilon_minimum(dtype):
            raise ValueError(
                f"{_validation.epsilon_too_small_message(dtype)} Received: epsilon={epsilon!r}"
            )
    return float(epsilon)


def check_bool(value, name: str) -> bool:
    """`value` as a Python bool (numpy bools accepted), or a `TypeError` naming `name`."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"`{name}` must be a bool. Received: {name}={value!r}")
    return bool(value)


def check_axis(axis) -> int:
    """`axis` as a Python int (numpy ints accepted), or a `TypeError`."""
    if isinstance(axis, bool | np.bool_) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"`axis` must be an int. Received: axis={axis!r}")
    return int(axis)


def check_solver(solver) -> str:
    """One of "auto", "newton", "sinkhorn", or a `ValueError`."""
    if not isinstance(solver, str) or solver not in _SOLVERS:
        raise ValueError(f"`solver` must be one of {_SOLVERS}. Received: solver={solver!r}")
    return solver


def normalize_axis(axis: int, shape, layer: str, name: str = "inputs") -> int:
    """`axis` as a non-negative int for an input of `shape`, or a `ValueError` naming the layer."""
    rank = len(shape)
    if rank < 2:
        raise ValueError(
            f"`{layer}` expects {name} of rank >= 2 (a batch axis and the axis to select "
            f"along). Received: {name}.shape={tuple(shape)}"
        )
    if not -rank <= axis < rank:
        raise ValueError(
            f"`{layer}` got `axis` out of range for {name} of rank {rank}. Received: axis={axis}"
        )
    return axis % rank


def check_float_input(x, layer: str, name: str = "inputs") -> None:
    """Raises `TypeError` unless the (possibly symbolic) input has a floating dtype."""
    dtype = keras.backend.standardize_dtype(x.dtype)
    if not dtype.startswith(("float", "bfloat")):
        raise TypeError(
            f"`{layer}` expects floating-point {name}. Cast integer inputs first "
            f"(e.g. with `keras.ops.cast`). Received: {name}.dtype={dtype}"
        )


def scores_mask(mask, scores: tf.Tensor, layer: str) -> tf.Tensor | None:
    """A Keras mask turned into the op's boolean `mask` of the full shape of `scores`.

    Keras masks cover leading axes (a `Masking` layer's mask on `[batch, n, features]` is
    `[batch, n]`); they are broadcast over the trailing axes of `scores`.
    """
    if mask is None:
        return None
    try:
        mask = tf.convert_to_tensor(mask)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{layer}` got a mask that is not a rectangular boolean tensor. "
            f"Received: mask of type {type(mask).__name__}"
        ) from None
    if mask.dtype == tf.string:
        raise TypeError(f"`{layer}` got a mask of strings. Received: mask.dtype=string")
    if mask.dtype != tf.bool:
        mask = tf.cast(mask, tf.bool)
    if mask.shape.rank is None:
        raise ValueError(f"`{layer}` needs a mask of known rank. Received: mask.shape={mask.shape}")
    extra = scores.shape.rank - mask.shape.rank
    if extra < 0 or not mask.shape.is_compatible_with(scores.shape[: mask.shape.rank]):
        raise ValueError(
            f"`{layer}` got a mask whose shape is not a prefix of the scores' shape. "
            f"Received: mask.shape={mask.shape}, scores.shape={scores.shape}"
        )
    if extra == 0:
        return mask
    mask = tf.reshape(mask, tf.concat([tf.shape(mask), tf.ones([extra], tf.int32)], 0))
    return tf.broadcast_to(mask, tf.shape(scores))


def merge_masks(*masks):
    """Logical AND of the non-None masks, or None."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    merged = keras.ops.cast(present[0], "bool")
    for m in present[1:]:
        merged = keras.ops.logical_and(merged, keras.ops.cast(m, "bool"))
    return merged


def check_quantiles(quantiles) -> list[float]:
    """Strictly increasing levels in (0, 1), as a list (what `get_config` stores)."""
    return list(_validation.check_quantiles(quantiles))


class SoftLayer(keras.layers.Layer):
    """Base of the soft layers: the entropic `epsilon` as a weight of the layer.

    By default the weight is non-trainable and holds `epsilon` itself, so a callback can
    anneal it with `set_epsilon` during `fit` without retracing the train function. With
    `trainable_epsilon=True` it holds `log(epsilon)` and is trained (epsilon stays positive).
    The weight is never autocast: the transport reads it in float32 (or float64) whatever the
    dtype policy.
    """

    def _init_common(self, epsilon, trainable_epsilon, axis, solver) -> None:
        self.epsilon = check_epsilon(epsilon, self.compute_dtype)
        self.trainable_epsilon = check_bool(trainable_epsilon, "trainable_epsilon")
        self.axis = check_axis(axis)
        self.solver = check_solver(solver)
        self.supports_masking = True
        self.epsilon_variable = None

    def _build_epsilon(self) -> None:
        if self.trainable_epsilon:
            self.epsilon_variable = self.add_weight(
                name="log_epsilon",
                shape=(),
                initializer=keras.initializers.Constant(math.log(self.epsilon)),
                trainable=True,
                autocast=False,
            )
        else:
            self.epsilon_variable = self.add_weight(
                name="epsilon",
                shape=(),
                initializer=keras.initializers.Constant(self.epsilon),
                trainable=False,
                autocast=False,
            )

    def _require_built(self) -> None:
        if self.epsilon_variable is None:
            raise RuntimeError(
                f"`{type(self).__name__}` has no epsilon weight before it is built. Call the "
                "layer (or `layer.build(input_shape)`) first."
            )

    def get_epsilon(self) -> tf.Tensor:
        """The current epsilon as a scalar tensor (`exp` of the weight if trainable)."""
        self._require_built()
        value = tf.convert_to_tensor(self.epsilon_variable)
        return tf.exp(value) if self.trainable_epsilon else value

    def set_epsilon(self, value: float) -> None:
        """Assigns a new epsilon (> 0) to the weight, e.g. from an annealing callback."""
        self._require_built()
        value = check_epsilon(value, self.compute_dtype)
        self.epsilon_variable.assign(math.log(value) if self.trainable_epsilon else value)

    def _epsilon_config(self) -> dict:
        return {
            "epsilon": self.epsilon,
            "trainable_epsilon": self.trainable_epsilon,
            "axis": self.axis,
            "solver": self.solver,
        }


def static_axis_length(axis: int, shape, layer: str, name: str = "inputs") -> int:
    """The static length of `axis`, which the sorting ops need, or a `ValueError`."""
    position = normalize_axis(axis, shape, layer, name)
    n = shape[position]
    if n is None:
        raise ValueError(
            f"`{layer}` needs a statically known length along `axis` (its transport has one "
            f"target per entry). Received: {name}.shape={tuple(shape)}, axis={axis}"
        )
    return int(n)


def check_no_padding(mask, inputs: tf.Tensor, axis: int, layer: str) -> tf.Tensor | None:
    """Checks that a Keras mask reaching a layer whose op has no padding support is all True.

    Eagerly a `ValueError`; in a graph an assertion (`InvalidArgumentError`), on which the
    returned tensor depends. XLA drops the assertion, so the layer must also pass its output
    through `nan_where_padded` with the returned tensor: the rows (slices along `axis`) that
    hold a padded entry then come out NaN, never a plausible sort of padding.

    Args:
        mask: the Keras mask (a prefix of the shape of `inputs`), or None.
        inputs: the layer's input.
        axis: the layer's `axis`.
        layer: the layer's class name, for messages.

    Returns:
        None without a mask; else a boolean tensor shaped like `inputs` with `axis` of length
        1, True for the rows without padding.
    """
    if mask is None:
        return None
    mask = scores_mask(mask, inputs, layer)
    position = axis % inputs.shape.rank
    rows_ok = tf.reduce_all(mask, axis=position, keepdims=True)
    message = (
        f"`{layer}` cannot exclude padded entries: its op has no mask support. Remove the mask "
        "(or use SoftTopK / SoftQuantileMasks, which honour it). Received: a mask with False "
        "entries"
    )
    all_valid = tf.reduce_all(rows_ok)
    if tf.executing_eagerly():
        if not bool(all_valid):
            padded = int(tf.size(mask)) - int(tf.math.count_nonzero(mask))
            raise ValueError(f"{message} ({padded} of them)")
        return rows_ok
    assertion = tf.debugging.Assert(all_valid, [message])
    with tf.control_dependencies([assertion]):
        return tf.identity(rows_ok)


def nan_where_padded(
    output: tf.Tensor, rows_ok: tf.Tensor | None, axis: int, reduced: bool = False
) -> tf.Tensor:
    """`output` with NaN in the rows that `check_no_padding` found padded.

    Args:
        output: the op's output: shaped like the input, or with `axis` replaced by another
            length, or (`reduced`) with `axis` removed.
        rows_ok: what `check_no_padding` returned (None: `output` is returned as is).
        axis: the layer's `axis`, relative to the input.
        reduced: whether `output` lacks `axis`.

    Returns:
        `output`, NaN in every row with padding (only reachable under XLA; elsewhere
        `check_no_padding` has raised first).
    """
    if rows_ok is None or tf.executing_eagerly():
        return output
    if reduced:
        rows_ok = tf.squeeze(rows_ok, axis=axis % rows_ok.shape.rank)
    return tf.where(rows_ok, output, tf.constant(float("nan"), output.dtype))
