"""Pure tensor functions: soft selection, sorting and the transport solvers behind them."""

from keras_softquantile.ops import transport
from keras_softquantile.ops._guards import ConvergenceError
from keras_softquantile.ops.perturbed import perturbed_quantile_split
from keras_softquantile.ops.selection import (
    soft_quantile_masks,
    soft_quantile_split,
    soft_topk_mask,
)
from keras_softquantile.ops.sorting import soft_quantile, soft_rank, soft_sort, soft_sort_with
from keras_softquantile.ops.squashing import squash_scores
from keras_softquantile.ops.transport import TransportResult

__all__ = [
    "ConvergenceError",
    "TransportResult",
    "perturbed_quantile_split",
    "soft_quantile",
    "soft_quantile_masks",
    "soft_quantile_split",
    "soft_rank",
    "soft_sort",
    "soft_sort_with",
    "soft_topk_mask",
    "squash_scores",
    "transport",
]
