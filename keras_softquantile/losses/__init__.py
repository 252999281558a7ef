"""Keras losses built on the soft selection ops."""

from keras_softquantile.losses.classification import TopKCrossEntropy
from keras_softquantile.losses.quantile_objective import QuantileObjective
from keras_softquantile.losses.ranking import SoftNDCGLoss, SpearmanLoss
from keras_softquantile.losses.regression import QuantileRegressionLoss, TrimmedRegressionLoss

__all__ = [
    "QuantileObjective",
    "QuantileRegressionLoss",
    "SoftNDCGLoss",
    "SpearmanLoss",
    "TopKCrossEntropy",
    "TrimmedRegressionLoss",
]
