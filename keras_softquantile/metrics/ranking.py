"""Hard listwise ranking metrics: Spearman correlation and NDCG, streaming means over lists.

The counterparts of `keras_softquantile.losses.SpearmanLoss` and `SoftNDCGLoss` (which tend
to one minus these as their `epsilon` shrinks), with the same inputs: `y_pred` is
`[batch, list_size]` scores, `y_true` a `[batch, list_size]` tensor of labels (negative labels
mark padding) or a dict `{"labels": ..., "mask": ...}` with a boolean mask.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_softquantile.losses import _lists
from keras_softquantile.losses.ranking import check_k

__all__ = ["NDCG", "SpearmanCorrelation"]


class _ListMean(keras.metrics.Metric):
    """The weighted mean over lists of a per-list value; subclasses implement `_list_values`
    returning `(values, counted)`, both `[batch]` (lists not counted get no weight)."""

    def __init__(self, name, dtype):
        super().__init__(name=name, dtype=dtype)
        self.total = self.add_weight(name="total", shape=(), initializer="zeros")
        self.count = self.add_weight(name="count", shape=(), initializer="zeros")

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Adds the lists of a batch.

        Args:
            y_true: labels `[batch, list_size]` or a dict `{"labels", "mask"}`.
            y_pred: float scores `[batch, list_size]`.
            sample_weight: optional weight per list, `[batch]` or `[batch, 1]`.
        """
        labels, scores, mask = _lists.list_inputs(y_true, y_pred)
        labels, scores = (ops.cast(x, self.dtype) for x in (labels, scores))
        values, counted = self._list_values(labels, scores, mask)
        weights = ops.cast(counted, self.dtype)
        if sample_weight is not None:
            weights = weights * ops.reshape(ops.cast(sample_weight, self.dtype), (-1,))
        self.total.assign_add(ops.sum(weights * values))
        self.count.assign_add(ops.sum(weights))

    def result(self):
        return ops.divide_no_nan(self.total, self.count)  # 0 before any list counted

    def reset_state(self):
        self.total.assign(0.0)
        self.count.assign(0.0)


@keras.saving.register_keras_serializable(package="keras_softquantile")
class SpearmanCorrelation(_ListMean):
    """Mean Spearman rank correlation between scores and labels over lists.

    Per list, the Pearson correlation of the ranks of the scores and of the labels among its
    valid items, ties sharing their average rank; 0 for a list whose scores or labels are
    constant (one valid item included). The result is the mean over lists, weighted by
    `sample_weight`.

    >>> metric = keras_softquantile.metrics.SpearmanCorrelation()
    >>> metric.update_state(np.array([[0.0, 1.0, 2.0]]), np.array([[0.2, 0.1, 0.9]], "float32"))
    >>> round(float(metric.result()), 4)
    0.5

    Args:
        name: the metric's name.
        dtype: the dtype of the state.
    """

    def __init__(self, name: str = "spearman_correlation", dtype=None):
        super().__init__(name=name, dtype=dtype)

    def _list_values(self, labels, scores, mask):
        ranks = _lists.average_ranks(scores, mask)
        correlation = _lists.pearson(ranks, _lists.average_ranks(labels, mask), mask)
        return correlation, ops.ones_like(correlation)


@keras.saving.register_keras_serializable(package="keras_softquantile")
class NDCG(_ListMean):
    """Mean normalised discounted cumulative gain over lists (at a cutoff `k`).

    Per list, `DCG@k / IDCG@k` with `DCG@k = sum (2^label_i - 1) / log2(2 + rank_i)` over the
    valid items whose descending rank (0-based, by `keras.ops.argsort` of the scores; tied
    scores in an arbitrary order) is below `k`, and IDCG@k the same for the items in label
    order. Lists with no relevant item (all labels 0) have no NDCG and are left out of the
    mean. The result is the mean over lists, weighted by `sample_weight`.

    >>> metric = keras_softquantile.metrics.NDCG()
    >>> metric.update_state(np.array([[0.0, 1.0, 2.0]]), np.array([[0.1, 0.9, 0.5]], "float32"))
    >>> round(float(metric.result()), 4)  # labels 1 and 2 swapped
    0.7967

    Args:
        k: the cutoff (a positive integer), or None for the whole list.
        name: the metric's name (default "ndcg", or "ndcg_at_k").
        dtype: the dtype of the state.
    """

    def __init__(self, k: int | None = None, name: str | None = None, dtype=None):
        k = check_k(k)
        super().__init__(name=name or ("ndcg" if k is None else f"ndcg_at_{k}"), dtype=dtype)
        self.k = k

    def _list_values(self, labels, scores, mask):
        # Padding sorts last (and NaN in it is never compared).
        lowest = ops.full_like(scores, float("-inf"))
        order = ops.argsort(-ops.where(mask, scores, lowest), axis=-1)
        ranks = ops.cast(ops.argsort(order, axis=-1), scores.dtype)
        if self.k is None:
            selected = ops.ones_like(scores)
        else:
            selected = ops.cast(ranks < self.k, scores.dtype)
        return _lists.ndcg(labels, ranks, selected, mask, self.k)

    def get_config(self) -> dict:
        return {**super().get_config(), "k": self.k}
