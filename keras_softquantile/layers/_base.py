"""Shared machinery of the soft selection layers: epsilon weight, argument checks, masks."""

from __future__ import annotations

import numbers

import keras
import numpy as np
from keras import ops

from keras_softquantile import epsilon as _epsilon
from keras_softquantile.ops import _backend, _validation

__all__: list[str] = []


def check_epsilon(epsilon, dtype=None) -> float:
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
    return _epsilon.check_epsilon(epsilon, dtype)


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


def _values_readable(*tensors) -> bool:
    """Whether Python can read the tensors' values now (`_backend.values_available`), except
    PyTorch's shape-only "meta" tensors (Keras's symbolic calls), which have no values."""
    if not _backend.values_available(*tensors):
        return False
    return not any(getattr(getattr(t, "device", None), "type", None) == "meta" for t in tensors)


def _static_rank(x) -> int | None:
    """The rank of `x`, or None when unknown (a TensorFlow graph tensor of unknown rank)."""
    try:
        return len(x.shape)
    except (TypeError, ValueError):
        return None


def _not_rectangular(layer: str, mask) -> ValueError:
    return ValueError(
        f"`{layer}` got a mask that is not a rectangular boolean tensor. "
        f"Received: mask of type {type(mask).__name__}"
    )


def scores_mask(mask, scores, layer: str):
    """A Keras mask turned into the op's boolean `mask` of the full shape of `scores`.

    Keras masks cover leading axes (a `Masking` layer's mask on `[batch, n, features]` is
    `[batch, n]`); they are broadcast over the trailing axes of `scores`.
    """
    if mask is None:
        return None
    received = mask
    if isinstance(mask, list | tuple | np.ndarray | np.generic | bool | int | float):
        try:
            mask = np.asarray(mask)
        except ValueError:  # nested lists of different lengths
            raise _not_rectangular(layer, received) from None
        if mask.dtype.kind in "USa":
            raise TypeError(f"`{layer}` got a mask of strings. Received: mask.dtype=string")
        if mask.dtype == object:
            raise _not_rectangular(layer, received)
    try:
        mask = ops.convert_to_tensor(mask)
    except (TypeError, ValueError):
        raise _not_rectangular(layer, received) from None
    dtype = keras.backend.standardize_dtype(mask.dtype)
    if dtype == "string":
        raise TypeError(f"`{layer}` got a mask of strings. Received: mask.dtype=string")
    if dtype != "bool":
        mask = ops.cast(mask, "bool")
    rank, scores_rank = _static_rank(mask), len(scores.shape)
    if rank is None:
        raise ValueError(f"`{layer}` needs a mask of known rank. Received: mask.shape={mask.shape}")
    extra = scores_rank - rank
    compatible = extra >= 0 and all(
        m is None or s is None or m == s
        for m, s in zip(tuple(mask.shape), tuple(scores.shape)[:rank], strict=True)
    )
    if not compatible:
        raise ValueError(
            f"`{layer}` got a mask whose shape is not a prefix of the scores' shape. "
            f"Received: mask.shape={tuple(mask.shape)}, scores.shape={tuple(scores.shape)}"
        )
    if extra == 0:
        return mask
    for _ in range(extra):
        mask = ops.expand_dims(mask, -1)
    return ops.broadcast_to(mask, ops.shape(scores))


def merge_masks(*masks):
    """Logical AND of the non-None masks, or None."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    merged = ops.cast(present[0], "bool")
    for m in present[1:]:
        merged = ops.logical_and(merged, ops.cast(m, "bool"))
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
    dtype policy. It is a `keras_softquantile.epsilon.EpsilonWeight`, which callbacks find
    with `keras_softquantile.epsilon.epsilon_weights(model)`.

    Args:
        epsilon: positive float, the initial smoothing.
        trainable_epsilon: learn `log(epsilon)`.
        axis: the axis to select along.
        solver: "auto", "newton" or "sinkhorn".
        **kwargs: base layer arguments (`name`, `dtype`, ...).
    """

    def __init__(self, epsilon, trainable_epsilon, axis, solver, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = check_epsilon(epsilon, self.compute_dtype)
        self.trainable_epsilon = check_bool(trainable_epsilon, "trainable_epsilon")
        self.axis = check_axis(axis)
        self.solver = _validation.check_solver(solver)
        self.supports_masking = True
        self._epsilon_weight = _epsilon.EpsilonWeight(
            self.epsilon, trainable=self.trainable_epsilon, dtype_for_minimum=self.compute_dtype
        )

    @property
    def epsilon_variable(self):
        """The epsilon weight (`log(epsilon)` if trainable), a Keras variable; None before
        `build`."""
        return self._epsilon_weight.variable

    def _build_epsilon(self) -> None:
        self._epsilon_weight.build(self)

    def _require_built(self) -> None:
        if not self._epsilon_weight.built:
            raise RuntimeError(
                f"`{type(self).__name__}` has no epsilon weight before it is built. Call the "
                "layer (or `layer.build(input_shape)`) first."
            )

    def get_epsilon(self):
        """The current epsilon as a scalar tensor (`exp` of the weight if trainable)."""
        self._require_built()
        return self._epsilon_weight.value()

    def set_epsilon(self, value: float) -> None:
        """Assigns a new epsilon (> 0) to the weight, e.g. from an annealing callback."""
        self._require_built()
        self._epsilon_weight.assign(value)

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


def check_no_padding(mask, inputs, axis: int, layer: str):
    """Checks that a Keras mask reaching a layer whose op has no padding support is all True.

    When values can be read (eager execution) a `ValueError`; inside a traced function a
    TensorFlow graph assertion (`InvalidArgumentError`), on which the returned tensor depends.
    XLA and `jax.jit` cannot raise, so the layer must also pass its output through
    `nan_where_padded` with the returned tensor: the rows (slices along `axis`) that hold a
    padded entry then come out NaN, never a plausible sort of padding.

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
    position = axis % len(inputs.shape)
    rows_ok = ops.all(mask, axis=position, keepdims=True)
    message = (
        f"`{layer}` cannot exclude padded entries: its op has no mask support. Remove the mask "
        "(or use SoftTopK / SoftQuantileMasks, which honour it). Received: a mask with False "
        "entries"
    )
    all_valid = ops.all(rows_ok)
    if _values_readable(mask):
        if not bool(ops.convert_to_numpy(all_valid)):
            values = np.asarray(ops.convert_to_numpy(mask))
            padded = int(values.size - np.count_nonzero(values))
            raise ValueError(f"{message} ({padded} of them)")
        return rows_ok
    return _backend.with_dependencies(rows_ok, _backend.assert_that(all_valid, [message]))


def nan_where_padded(output, rows_ok, axis: int, reduced: bool = False):
    """`output` with NaN in the rows that `check_no_padding` found padded.

    Args:
        output: the op's output: shaped like the input, or with `axis` replaced by another
            length, or (`reduced`) with `axis` removed.
        rows_ok: what `check_no_padding` returned (None: `output` is returned as is).
        axis: the layer's `axis`, relative to the input.
        reduced: whether `output` lacks `axis`.

    Returns:
        `output`, NaN in every row with padding (only reachable inside a traced function;
        elsewhere `check_no_padding` has raised first).
    """
    if rows_ok is None or _values_readable(rows_ok):
        return output
    if reduced:
        rows_ok = ops.squeeze(rows_ok, axis=axis % len(rows_ok.shape))
    return ops.where(rows_ok, output, ops.cast(float("nan"), output.dtype))
