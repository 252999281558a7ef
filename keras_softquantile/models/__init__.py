"""The objective model: learn a scorer whose quantile selection minimises `f(A_low, A_high)`."""

from keras_softquantile.models.linear_scorer import LinearScorer
from keras_softquantile.models.quantile_objective_model import QuantileObjectiveModel

__all__ = ["LinearScorer", "QuantileObjectiveModel"]
