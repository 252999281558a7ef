"""Keras 3 layers over `keras_softquantile.ops`."""

from keras_softquantile.layers.soft_quantile_masks import SoftQuantileMasks
from keras_softquantile.layers.soft_quantile_split import SoftQuantileSplit
from keras_softquantile.layers.soft_quantiles import SoftQuantiles
from keras_softquantile.layers.soft_rank import SoftRank
from keras_softquantile.layers.soft_sort import SoftSort
from keras_softquantile.layers.soft_topk import SoftTopK

__all__ = [
    "SoftQuantileMasks",
    "SoftQuantileSplit",
    "SoftQuantiles",
    "SoftRank",
    "SoftSort",
    "SoftTopK",
]
