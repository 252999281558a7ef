"""Listwise ranking losses on soft ranks: Spearman correlation and NDCG.

Each list is one row of `y_pred` (`[batch, list_size]` scores); `y_true` is a
`[batch, list_size]` tensor of labels (negative labels mark padding) or a dict
`{"labels": ..., "mask": ...}` with a boolean mask (True = valid item), as in keras-rs. The
losses replace the hard ranks of the scores by `keras_softquantile.ops.soft_rank` (and the hard
top-k by `keras_softquantile.ops.soft_topk_mask`), which are exactly invariant to padding: a
padded list gives the loss and gradients of the same list without its padding, and padded
scores receive zero gradient (even if they hold NaN). `call` returns one loss per list,
`[batch]`; sample weights weight the lists.

In `fit`, Keras requires `y_true` to have the structure of the model's output, so a model
with one output `[batch, list_size]` takes its padding as negative labels, not as a dict.
"""

from __future__ import annotations

import numbers

import keras
from keras import ops

from keras_softquantile import ops as soft_ops
from keras_softquantile.epsilon import check_epsilon
from keras_softquantile.losses import _lists

__all__ = ["SoftNDCGLoss", "SpearmanLoss"]

DEFAULT_RANKING_EPSILON = 0.1
"""The default `epsilon` of the ranking losses: on lists of tens of items, a soft rank spreads
over a few neighbouring positions, enough for every item to receive gradient."""


def check_k(k) -> int | None:
    """Validates the NDCG cutoff: a positive integer or None."""
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"`k` must be a positive integer or None. Received: k={k!r}")
    if k < 1:
        raise ValueError(f"`k` must be a positive integer or None. Received: k={k!r}")
    return int(k)


class _RankingLoss(keras.losses.Loss):
    """A loss per list from `(labels, scores, mask)`; subclasses implement `_list_losses`."""

    def __init__(self, epsilon, reduction, name, dtype):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.epsilon = check_epsilon(epsilon)

    def __call__(self, y_true, y_pred, sample_weight=None):
        # Checked before Keras casts every input to the loss's dtype (an integer `y_pred` or a
        # float mask would pass unnoticed); the mask then travels as negative labels.
        labels, scores, mask = _lists.list_inputs(y_true, y_pred)
        y_true = _lists.padding_as_labels(labels, mask)
        return super().__call__(y_true, scores, sample_weight=sample_weight)

    def call(self, y_true, y_pred):
        return self._list_losses(*_lists.list_inputs(y_true, y_pred))

    def get_config(self) -> dict:
        return {**super().get_config(), "dtype": self.dtype, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="keras_softquantile")
class SpearmanLoss(_RankingLoss):
    """One minus the soft Spearman correlation between scores and labels, per list.

    With soft ascending ranks `r = soft_rank(y_pred)` and the hard ranks `s` of the labels
    (ties sharing their average rank), both over the valid items of a list, the loss is

        1 - corr(r, s),

    `corr` the Pearson correlation. It tends to one minus Spearman's rank correlation as
    `epsilon -> 0` with distinct scores, lies in [0, 2], and is 0 when the scores order the
    items as the labels do. A list whose labels or soft ranks are constant (a single valid
    item, equal labels, equal scores) has no correlation: its loss is 1, with zero gradient.

    >>> loss = keras_softquantile.losses.SpearmanLoss(epsilon=1e-3)
    >>> y_true = np.array([[0.0, 1.0, 2.0, -1.0]], "float32")  # the last item is padding
    >>> y_pred = np.array([[0.1, 0.5, 0.9, 7.0]], "float32")
    >>> round(float(loss(y_true, y_pred)), 4)
    0.0

    Args:
        epsilon: positive float, the smoothing of the ranks (quantile-level units; below
            `1 / list_size` the ranks are nearly hard).
        reduction: Keras reduction of the per-list losses.
        name: optional name.
        dtype: the dtype of the computation.

    Returns:
        The mean loss over lists with the default reduction; `call` gives `[batch]`.
    """

    def __init__(
        self,
        epsilon: float = DEFAULT_RANKING_EPSILON,
        reduction: str | None = "sum_over_batch_size",
        name: str | None = None,
        dtype=None,
    ):
        super().__init__(epsilon, reduction, name, dtype)

    def _list_losses(self, labels, scores, mask):
        ranks = soft_ops.soft_rank(scores, epsilon=self.epsilon, mask=mask)
        return 1 - _lists.pearson(ranks, _lists.average_ranks(labels, mask), mask)


@keras.saving.register_keras_serializable(package="keras_softquantile")
class SoftNDCGLoss(_RankingLoss):
    """One minus the soft NDCG of each list (optionally at a cutoff `k`).

    With soft descending ranks `r_i = soft_rank(y_pred, descending=True)` (0 for the highest
    score) and gains `2^label_i - 1`, the soft DCG of a list sums over its valid items

        w_i (2^label_i - 1) / log2(2 + r_i),

    where `w_i = 1` without a cutoff, and with one the soft membership of item i in the top
    `k` scores (`keras_softquantile.ops.soft_topk_mask`). It is divided by the ideal DCG (the
    items in label order, the first `k` of them with a cutoff) and the loss is `1 - NDCG`,
    which tends to one minus the hard NDCG@k as `epsilon -> 0` with distinct scores. A list
    with no relevant item (all labels 0) has no NDCG: its loss is 0, with zero gradient.

    >>> loss = keras_softquantile.losses.SoftNDCGLoss(epsilon=1e-3)
    >>> y_true = np.array([[0.0, 1.0, 2.0]], "float32")
    >>> y_pred = np.array([[0.1, 0.9, 0.5]], "float32")  # labels 1 and 2 swapped
    >>> round(float(loss(y_true, y_pred)), 4)
    0.2033

    Args:
        k: the cutoff (a positive integer), or None for the whole list. Lists with fewer
            than `k` valid items count all of them.
        epsilon: positive float, the smoothing of the ranks and of the top-k membership.
        reduction: Keras reduction of the per-list losses.
        name: optional name.
        dtype: the dtype of the computation.

    Returns:
        The mean loss over lists with the default reduction; `call` gives `[batch]`.
    """

    def __init__(
        self,
        k: int | None = None,
        epsilon: float = DEFAULT_RANKING_EPSILON,
        reduction: str | None = "sum_over_batch_size",
        name: str | None = None,
        dtype=None,
    ):
        super().__init__(epsilon, reduction, name, dtype)
        self.k = check_k(k)

    def _list_losses(self, labels, scores, mask):
        ranks = soft_ops.soft_rank(scores, epsilon=self.epsilon, descending=True, mask=mask)
        if self.k is None:
            selected = ops.ones_like(scores)
        else:
            selected = soft_ops.soft_topk_mask(scores, self.k, epsilon=self.epsilon, mask=mask)
        ndcg, has_relevant = _lists.ndcg(labels, ranks, selected, mask, self.k)
        return ops.where(has_relevant, 1 - ndcg, ops.zeros_like(ndcg))

    def get_config(self) -> dict:
        return {**super().get_config(), "k": self.k}
