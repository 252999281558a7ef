"""Robust regression losses that select examples across the batch: trimmed and quantile losses.

Both wrap a per-example loss `l_b` (squared error by default) and replace its batch mean by a
soft order statistic of the losses: the mean of the smallest `1 - trim` fraction
(`TrimmedRegressionLoss`) or the `q`-quantile (`QuantileRegressionLoss`, least-median
regression at `q = 0.5`). The selection is smooth (entropic optimal transport, temperature
`epsilon` in quantile-level units), so the examples near the cut still receive gradient.

Because the value of one example depends on the whole batch, these losses take no sample
weights: `loss(y_true, y_pred, sample_weight=w)` raises a `ValueError` (a weighted trim would
need weighted selection masses, which the ops do not provide). Keras masks on `y_pred` are not
supported either.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import keras
import numpy as np
from keras import ops

from keras_softquantile import ops as soft_ops
from keras_softquantile.epsilon import check_epsilon
from keras_softquantile.ops._validation import DEFAULT_EPSILON

__all__ = ["QuantileRegressionLoss", "TrimmedRegressionLoss"]


def _dtype_of(x) -> str:
    dtype = getattr(x, "dtype", None)
    return keras.backend.standardize_dtype(np.asarray(x).dtype if dtype is None else dtype)


def _check_float_predictions(y_pred) -> None:
    """Raises `TypeError` for integer or boolean predictions (before Keras casts them)."""
    dtype = _dtype_of(y_pred)
    if not dtype.startswith(("float", "bfloat")):
        raise TypeError(f"`y_pred` must be a floating-point tensor. Received: y_pred.dtype={dtype}")


def _shape(x) -> tuple:
    return tuple(x.shape)


def _align(y_true, y_pred):
    """`y_true` and `y_pred` of one shape `[batch, ...]` with at least two axes: a missing
    trailing axis of size one is added (targets `[batch]` for predictions `[batch, 1]`)."""
    if len(y_true.shape) == len(y_pred.shape) - 1 and y_pred.shape[-1] == 1:
        y_true = ops.expand_dims(y_true, -1)
    elif len(y_pred.shape) == len(y_true.shape) - 1 and y_true.shape[-1] == 1:
        y_pred = ops.expand_dims(y_pred, -1)
    compatible = len(y_true.shape) == len(y_pred.shape) and all(
        a is None or b is None or a == b for a, b in zip(y_true.shape, y_pred.shape, strict=True)
    )
    if not compatible or len(y_pred.shape) == 0:
        raise ValueError(
            "`y_true` and `y_pred` must have the same shape [batch, ...]. "
            f"Received: y_true.shape={_shape(y_true)}, y_pred.shape={_shape(y_pred)}"
        )
    if len(y_pred.shape) == 1:  # scalar targets: one value per example along a new axis
        y_true, y_pred = ops.expand_dims(y_true, -1), ops.expand_dims(y_pred, -1)
    return y_true, y_pred


def _resolve_loss(loss) -> Callable:
    """The per-example function of `loss` (None: squared error; a name; a Loss; a callable)."""
    if loss is None:
        loss = keras.losses.MeanSquaredError(reduction=None)
    elif isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return loss.call  # its unreduced values: the wrapped loss's own reduction is not used
    if not callable(loss):
        raise TypeError(
            "`loss` must be None, a Keras loss name, a `keras.losses.Loss` or a callable "
            f"(y_true, y_pred) -> [batch]. Received: loss={loss!r}"
        )
    return loss


class _AcrossBatchLoss(keras.losses.Loss):
    """A per-example loss whose batch values are combined by a soft selection (no sample
    weights); subclasses implement `_combine(losses) -> [batch]`."""

    def __init__(self, loss, epsilon, reduction, name, dtype):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if isinstance(loss, dict):  # from `get_config`
            loss = keras.losses.deserialize(loss)
        self._per_example = _resolve_loss(loss)
        self.loss = loss
        self.epsilon = check_epsilon(epsilon)

    def __call__(self, y_true, y_pred, sample_weight=None):
        _check_float_predictions(y_pred)
        if sample_weight is not None:
            raise ValueError(
                f"`{type(self).__name__}` selects examples across the batch, so an example's "
                "weight would have to change the selection too, which it cannot do exactly: "
                "pass no sample weights (nor class weights). Received: sample_weight of shape "
                f"{_shape(ops.convert_to_tensor(sample_weight))}"
            )
        return super().__call__(y_true, y_pred)

    def per_example_losses(self, y_true, y_pred):
        """The wrapped loss of each example, `[batch]`."""
        y_true, y_pred = _align(ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred))
        losses = ops.convert_to_tensor(self._per_example(y_true, y_pred))
        if len(losses.shape) == 0:
            raise ValueError(
                "`loss` must return one value per example [batch], not a reduced scalar. "
                f"Received: loss={self.loss!r}"
            )
        if len(losses.shape) > 1:
            # A sum and a division: Keras 3.15's `ops.mean` rounds float64 to float32 on PyTorch.
            axes = tuple(range(1, len(losses.shape)))
            size = ops.cast(ops.prod(ops.shape(losses)[1:]), losses.dtype)
            losses = ops.sum(losses, axis=axes) / size
        return ops.cast(losses, self.dtype)

    def call(self, y_true, y_pred):
        return self._combine(self.per_example_losses(y_true, y_pred))

    def get_config(self) -> dict:
        loss = self.loss
        if loss is not None and not isinstance(loss, str):
            loss = keras.losses.serialize(loss)
        return {**super().get_config(), "dtype": self.dtype, "loss": loss, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="keras_softquantile")
class TrimmedRegressionLoss(_AcrossBatchLoss):
    """Soft trimmed mean of per-example losses: the mean over the best `1 - trim` of the batch.

    With per-example losses `l_b` (from `loss`, squared error by default) and soft membership
    `w_b` in [0, 1] of example b in the smallest `1 - trim` fraction of the losses across the
    batch (`keras_softquantile.ops.soft_quantile_masks` at level `1 - trim`, so that
    `sum_b w_b = (1 - trim) * batch` exactly, fractional sizes included), the loss is

        sum_b w_b l_b / sum_b w_b,

    which tends to the mean of the `(1 - trim) * batch` smallest losses as `epsilon -> 0`.
    Examples with the largest losses (outliers, corrupted targets) are left out of the fit.
    `trim=0` is the plain mean of `l_b`, exactly. A batch of one example gives its own loss.

    `call` returns per-example contributions `[batch]`, `batch * w_b l_b / sum_b w_b`, whose
    mean (the default reduction, "sum_over_batch_size") is the trimmed mean; zero for the
    trimmed examples. Sample weights are refused (see the module docstring).

    >>> loss = keras_softquantile.losses.TrimmedRegressionLoss(trim=0.25, epsilon=1e-3)
    >>> y_true = np.zeros((4, 1), "float32")
    >>> y_pred = np.array([[1.0], [2.0], [3.0], [10.0]], "float32")
    >>> round(float(loss(y_true, y_pred)), 3)  # (1 + 4 + 9) / 3: the 100 is trimmed
    4.667

    Args:
        trim: the fraction of the batch to leave out, in [0, 1).
        loss: the per-example loss: None (squared error,
            `keras.losses.MeanSquaredError(reduction=None)`), a Keras loss name, a
            `keras.losses.Loss` (its unreduced `call` is used) or a callable
            `(y_true, y_pred) -> [batch]`. Values with more axes are averaged to `[batch]`.
        epsilon: positive float, the temperature of the selection (quantile-level units).
        reduction: Keras reduction of the contributions.
        name: optional name.
        dtype: the dtype of the computation.

    Returns:
        The trimmed mean (a scalar) with the default reduction.
    """

    def __init__(
        self,
        trim: float = 0.1,
        loss=None,
        epsilon: float = DEFAULT_EPSILON,
        reduction: str | None = "sum_over_batch_size",
        name: str | None = None,
        dtype=None,
    ):
        super().__init__(loss, epsilon, reduction, name, dtype)
        if isinstance(trim, bool) or not isinstance(trim, numbers.Real):
            raise TypeError(f"`trim` must be a float in [0, 1). Received: trim={trim!r}")
        if not 0 <= float(trim) < 1:
            raise ValueError(f"`trim` must lie in [0, 1). Received: trim={trim!r}")
        self.trim = float(trim)

    def _combine(self, losses):
        if self.trim == 0:
            return losses  # the plain mean, exactly
        kept = soft_ops.soft_quantile_masks(losses, (1 - self.trim,), epsilon=self.epsilon)[:, 0]
        batch = ops.cast(ops.shape(losses)[0], losses.dtype)
        return kept * losses * (batch / ops.sum(kept))

    def get_config(self) -> dict:
        return {**super().get_config(), "trim": self.trim}


@keras.saving.register_keras_serializable(package="keras_softquantile")
class QuantileRegressionLoss(_AcrossBatchLoss):
    """Soft `q`-quantile of per-example losses across the batch: least-quantile regression.

    With per-example losses `l_b` (from `loss`, squared error by default), the loss is
    `keras_softquantile.ops.soft_quantile(l, q)`, the soft counterpart of
    `numpy.quantile(l, q)` (linear interpolation), to which it tends as `epsilon -> 0`.
    `q=0.5` is least-median-of-squares regression: up to half the batch may be outliers.
    Only the examples near the `q`-quantile of the losses receive gradient.

    `call` returns the batch's quantile repeated for every example (`[batch]`), so that its
    mean (the default reduction) is the quantile. The batch size must be known when the loss
    is traced (the quantile's order statistics depend on it): under TensorFlow, `fit` on
    arrays leaves it unknown, so feed a `tf.data.Dataset` batched with `drop_remainder=True`
    or give the model's `keras.Input` a `batch_size` (JAX and PyTorch know it). Sample weights
    are refused (see the module docstring).

    >>> loss = keras_softquantile.losses.QuantileRegressionLoss(q=0.5, epsilon=1e-3)
    >>> y_true = np.zeros((5, 1), "float32")
    >>> y_pred = np.array([[1.0], [2.0], [3.0], [4.0], [100.0]], "float32")
    >>> round(float(loss(y_true, y_pred)), 3)  # the median of 1, 4, 9, 16, 10000
    9.0

    Args:
        q: the quantile level, in (0, 1]; 0.5 is the median.
        loss: the per-example loss, as for `TrimmedRegressionLoss`.
        epsilon: positive float, the temperature of the selection (quantile-level units).
        reduction: Keras reduction of the repeated quantile.
        name: optional name.
        dtype: the dtype of the computation.

    Returns:
        The soft quantile (a scalar) with the default reduction.
    """

    def __init__(
        self,
        q: float = 0.5,
        loss=None,
        epsilon: float = DEFAULT_EPSILON,
        reduction: str | None = "sum_over_batch_size",
        name: str | None = None,
        dtype=None,
    ):
        super().__init__(loss, epsilon, reduction, name, dtype)
        if isinstance(q, bool) or not isinstance(q, numbers.Real):
            raise TypeError(f"`q` must be a float in (0, 1]. Received: q={q!r}")
        if not 0 < float(q) <= 1:
            raise ValueError(f"`q` must lie in (0, 1]. Received: q={q!r}")
        self.q = float(q)

    def _combine(self, losses):
        if losses.shape[0] is None:
            raise ValueError(
                "`QuantileRegressionLoss` needs the batch size known when the loss is traced. "
                "Under TensorFlow, feed a tf.data.Dataset batched with drop_remainder=True, or "
                "give the model's keras.Input a batch_size. Received: a per-example loss of "
                f"shape {_shape(losses)}"
            )
        quantile = soft_ops.soft_quantile(losses, self.q, epsilon=self.epsilon)
        return ops.ones_like(losses) * quantile

    def get_config(self) -> dict:
        return {**super().get_config(), "q": self.q}
