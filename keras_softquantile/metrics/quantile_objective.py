"""`HardQuantileObjective`: the objective `f(A_low, A_high)` on the hard quantile selection."""

from __future__ import annotations

import keras

from keras_softquantile import objectives
from keras_softquantile.losses.quantile_objective import (
    _check_objective,
    _per_instance,
    _values_and_scores,
)
from keras_softquantile.models import _selection
from keras_softquantile.ops import _validation

__all__ = ["HardQuantileObjective"]


@keras.saving.register_keras_serializable(package="keras_softquantile")
class HardQuantileObjective(keras.metrics.Mean):
    """The mean of `f(A_low, A_high)` over instances, on the hard quantile selection.

    The counterpart of the `QuantileObjective` loss at `epsilon = 0`: `A_low` and `A_high`
    are the values whose scores are among the `floor(quantile * v)` lowest and highest of each
    row with `v` valid (not NaN) entries, selected by `argsort`, and `f` receives them in the
    form `output` gives, through the same functions as the `hard_objective` metric of
    `keras_softquantile.models.QuantileObjectiveModel`. `y_true` holds the values A
    `[batch, n]` (NaN marks padding), `y_pred` the scores `[batch, n]`. The result is the
    streaming mean over every instance seen (weighted by `sample_weight`, one weight per
    instance). With `output="sorted"`, an instance with padding gives NaN.

    >>> metric = keras_softquantile.metrics.HardQuantileObjective("spread", quantile=0.25)
    >>> A = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]], "float32")
    >>> metric.update_state(A, -A)  # reversed scores: the worst spread
    >>> float(metric.result())
    6.0

    Args:
        objective: "spread", "rank_weighted_spread" (needs `output="sorted"`) or a callable
            `f(low, high)` returning `[batch]` values or a scalar.
        quantile: the level q in (0, 0.5].
        output: "weights", "mean" or "sorted": what `objective` receives.
        name: the metric's name.
        dtype: the dtype of the metric's state and computation.

    Returns:
        `result()`: the mean objective, a scalar.
    """

    def __init__(
        self,
        objective="spread",
        quantile: float = 0.25,
        output: str = "weights",
        name: str = "hard_quantile_objective",
        dtype=None,
    ):
        super().__init__(name=name, dtype=dtype)
        self.objective, self.objective_function = _check_objective(objective, output)
        self.quantile = _validation.check_split_quantile(quantile)
        self.output = output

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Adds the hard objective of each instance of a batch to the mean."""
        y_true = keras.ops.convert_to_tensor(y_true, self.dtype)
        y_pred = keras.ops.convert_to_tensor(y_pred)
        valid, values, scores = _values_and_scores(y_true, y_pred)
        pair, _ = _selection.hard_selection(
            values, scores, valid, quantile=self.quantile, output=self.output
        )
        value = _selection.objective_values(self.objective_function, pair)
        return super().update_state(_per_instance(value, valid, self.output), sample_weight)

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "objective": objectives.serialize(self.objective),
            "quantile": self.quantile,
            "output": self.output,
        }
