"""Differentiable soft top-k and quantile selection for Keras, by entropic optimal transport."""

from keras_softquantile import layers, ops
from keras_softquantile.layers import (
    SoftQuantileMasks,
    SoftQuantiles,
    SoftQuantileSplit,
    SoftRank,
    SoftSort,
    SoftTopK,
)
from keras_softquantile.ops import (
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
    "SoftQuantileMasks",
    "SoftQuantileSplit",
    "SoftQuantiles",
    "SoftRank",
    "SoftSort",
    "SoftTopK",
    "layers",
    "ops",
    "soft_quantile",
    "soft_quantile_masks",
    "soft_quantile_split",
    "soft_rank",
    "soft_sort",
    "soft_sort_with",
    "soft_topk_mask",
]
