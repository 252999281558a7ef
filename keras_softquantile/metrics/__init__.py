"""Keras metrics of the quantile selection."""

from keras_softquantile.metrics.quantile_objective import HardQuantileObjective
from keras_softquantile.metrics.ranking import NDCG, SpearmanCorrelation

__all__ = ["NDCG", "HardQuantileObjective", "SpearmanCorrelation"]
