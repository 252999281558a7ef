"""`QuantileObjective`: the objective `f(A_low, A_high)` of `QuantileObjectiveModel` as a loss."""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_softquantile import objectives
from keras_softquantile.epsilon import check_epsilon
from keras_softquantile.losses.regression import _check_float_predictions
from keras_softquantile.models import _selection
from keras_softquantile.ops import _validation

__all__ = ["QuantileObjective"]


def _check_objective(objective, output: str):
    """`(objective as kept, its function)`, refusing an objective that needs another output."""
    function = objectives.get(objective)
    _validation.check_split_output(output)
    required = getattr(function, "required_output", None)
    if required is not None and output != required:
        raise ValueError(
            f"The objective {function.__name__!r} depends on the order of the selected values "
            f"and needs output={required!r}. Received: output={output!r}"
        )
    return (objective if isinstance(objective, str) else function), function


def _values_and_scores(y_true, y_pred):
    """`(valid, values, scores)`: the padding mask (A not NaN), A and the scores zeroed there.

    Raises `ValueError` unless both are `[batch, n]` (scores `[batch, n, 1]` are squeezed).
    """
    values = ops.convert_to_tensor(y_true)
    scores = ops.convert_to_tensor(y_pred)
    if len(scores.shape) == 3 and scores.shape[-1] == 1:
        scores = ops.squeeze(scores, -1)
    shapes_match = len(values.shape) == 2 and len(scores.shape) == 2
    shapes_match = shapes_match and all(
        a is None or b is None or a == b for a, b in zip(values.shape, scores.shape, strict=True)
    )
    if not shapes_match:
        raise ValueError(
            "`y_true` (the values A) and `y_pred` (the scores) must both be [batch, n]. "
            f"Received: y_true.shape={tuple(values.shape)}, y_pred.shape={tuple(scores.shape)}"
        )
    scores = ops.cast(scores, values.dtype)
    valid = ops.logical_not(ops.isnan(values))
    values = ops.where(valid, values, ops.zeros_like(values))
    scores = ops.where(valid, scores, ops.zeros_like(scores))  # padding may hold anything
    return valid, values, scores


def _per_instance(value, valid, output: str):
    """The objective's value as `[batch]` (a scalar repeated); with `output="sorted"`, NaN for
    instances with padding, which that output cannot leave out."""
    value = value + ops.zeros_like(valid[:, 0], dtype=value.dtype)
    if output == "sorted":
        padded = ops.logical_not(ops.all(valid, axis=-1))
        value = ops.where(padded, ops.full_like(value, math.nan), value)
    return value


@keras.saving.register_keras_serializable(package="keras_softquantile")
class QuantileObjective(keras.losses.Loss):
    """The objective `f(A_low, A_high)` of a soft quantile selection, for any scoring model.

    `y_true` holds the values `A` `[batch, n]` of each instance (NaN marks padding, so rows
    may have different lengths) and `y_pred` the scores `[batch, n]` that a Keras model gives
    them; `A_low` and `A_high` are the values whose scores fall in the lower and upper
    `quantile` of each row, selected softly by `keras_softquantile.ops.soft_quantile_split`
    with temperature `epsilon`. The loss of an instance is `f(A_low, A_high)`, computed by the
    same functions as `keras_softquantile.models.QuantileObjectiveModel` (its `"ot"`
    estimator), so that training any scorer with this loss minimises the model's objective.

    `f` is a built-in name of `keras_softquantile.objectives` ("spread",
    "rank_weighted_spread") or a callable `f(low, high)` receiving the selection in the form
    `output` gives: `Selection(values, weights)` ("weights"), weighted means ("mean") or the
    selected values in ascending score order ("sorted"). Padded entries get no weight: a padded
    row gives exactly the loss and gradients of the row without its padding. "sorted" needs
    rows without padding: a padded row's loss is NaN there. An objective that returns a scalar
    is repeated for every instance. Sample weights weight the instances.

    >>> loss = keras_softquantile.losses.QuantileObjective("spread", quantile=0.25, epsilon=1e-3)
    >>> A = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]], "float32")
    >>> scores = np.array([[8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]], "float32")
    >>> round(float(loss(A, scores)), 3)  # mean(7, 8) - mean(1, 2): the scores are reversed
    6.0

    Args:
        objective: "spread", "rank_weighted_spread" (needs `output="sorted"`) or a callable
            `f(low, high)` returning `[batch]` values or a scalar (register it with
            `keras.saving.register_keras_serializable` to save a model compiled with it).
        quantile: the level q in (0, 0.5]; 0.25 selects the quartiles.
        epsilon: positive float, the temperature of the selection (quantile-level units).
        output: "weights", "mean" or "sorted": what `objective` receives.
        reduction: Keras reduction of the per-instance values.
        name: optional name.
        dtype: the dtype of the computation.

    Returns:
        The mean objective over the batch with the default reduction.
    """

    def __init__(
        self,
        objective="spread",
        quantile: float = 0.25,
        epsilon: float = 1e-2,
        output: str = "weights",
        reduction: str | None = "sum_over_batch_size",
        name: str | None = None,
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.objective, self.objective_function = _check_objective(objective, output)
        self.quantile = _validation.check_split_quantile(quantile)
        self.epsilon = check_epsilon(epsilon)
        self.output = output

    def __call__(self, y_true, y_pred, sample_weight=None):
        _check_float_predictions(y_pred)
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def call(self, y_true, y_pred):
        valid, values, scores = _values_and_scores(y_true, y_pred)
        pair, _ = _selection.soft_selection(
            values,
            scores,
            valid,
            quantile=self.quantile,
            epsilon=self.epsilon,
            output=self.output,
            solver="auto",
        )
        value = _selection.objective_values(self.objective_function, pair)
        return _per_instance(value, valid, self.output)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "dtype": self.dtype,
            "objective": objectives.serialize(self.objective),
            "quantile": self.quantile,
            "epsilon": self.epsilon,
            "output": self.output,
        }
