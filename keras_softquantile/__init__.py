"""Differentiable soft top-k and quantile selection for Keras, by entropic optimal transport."""

from keras_softquantile import callbacks, layers, models, objectives, ops
from keras_softquantile.layers import (
    SoftQuantileMasks,
    SoftQuantiles,
    SoftQuantileSplit,
    SoftRank,
    SoftSort,
    SoftTopK,
)
from keras_softquantile.models import LinearScorer, QuantileObjectiveModel
from keras_softquantile.ops import (
    perturbed_quantile_split,
    soft_quantile,
    soft_quantile_masks,
    soft_quantile_split,
    soft_rank,
    soft_sort,
    soft_sort_with,
    soft_topk_mask,
)

__version__ = "0.1.0"

__all__ = [
    "LinearScorer",
    "QuantileObjectiveModel",
    "SoftQuantileMasks",
    "SoftQuantileSplit",
    "SoftQuantiles",
    "SoftRank",
    "SoftSort",
    "SoftTopK",
    "callbacks",
    "layers",
    "models",
    "objectives",
    "ops",
    "perturbed_quantile_split",
    "soft_quantile",
    "soft_quantile_masks",
    "soft_quantile_split",
    "soft_rank",
    "soft_sort",
    "soft_sort_with",
    "soft_topk_mask",
]
