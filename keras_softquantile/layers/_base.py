"""Shared machinery of the soft selection layers: epsilon weight, argument checks, masks."""

from __future__ import annotations

import math
import numbers

import keras
import tensorflow as tf

from keras_softquantile.ops import _validation

__all__: list[str] = []

_SOLVERS = ("auto", "newton", "sinkhorn")


def check_epsilon(epsilon) -> float:
    """Validates a construction-time `epsilon` (a finite float > 0) and returns it as a float."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise TypeError(f"`epsilon` must be a positive float. Received: epsilon={epsilon!r}")
    if not (math.isfinite(float(epsilon)) and float(epsilon) > 0):
        raise ValueError(f"`epsilon` must be a finite number > 0. Received: epsilon={epsilon!r}")
    return float(epsilon)


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool. Received: {name}={value!r}")
    return value


def check_axis(axis) -> int:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"`axis` must be an int. Received: axis={axis!r}")
    return int(axis)


def check_solver(solver) -> str:
    if solver not in _SOLVERS:
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
    mask = tf.convert_to_tensor(mask)
    if mask.dtype != tf.bool:
        mask = tf.cast(mask, tf.bool)
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
        self.epsilon = check_epsilon(epsilon)
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
        value = check_epsilon(value)
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


def assert_no_padding(mask, inputs: tf.Tensor, layer: str) -> list:
    """Checks that a Keras mask reaching a layer whose op has no padding support is all True.

    Eagerly a `ValueError`; in a graph an assertion (returned, to use as a control
    dependency; XLA ignores it).
    """
    if mask is None:
        return []
    mask = scores_mask(mask, inputs, layer)
    message = (
        f"`{layer}` cannot exclude padded entries: its op has no mask support. Remove the mask "
        "(or use SoftTopK / SoftQuantileMasks, which honour it). Received: a mask with False "
        "entries"
    )
    all_valid = tf.reduce_all(mask)
    if tf.executing_eagerly():
        if not bool(all_valid):
            raise ValueError(message)
        return []
    return [tf.debugging.Assert(all_valid, [message])]
