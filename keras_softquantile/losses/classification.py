"""Top-k classification: the cross-entropy of the true class's soft top-k membership."""

from __future__ import annotations

import math
import numbers

import keras
from keras import ops

from keras_softquantile import ops as soft_ops
from keras_softquantile.epsilon import check_epsilon
from keras_softquantile.losses.regression import _check_float_predictions

__all__ = ["MEMBERSHIP_FLOOR", "TopKCrossEntropy"]

# The smallest membership whose log is taken: the loss is at most -log(1e-30) = 69.1 per k.
# Far below the cut the membership is about exp(-gap / epsilon), whose log still has a useful
# gradient (-1 / epsilon per unit of gap), so the floor is kept tiny (float32 holds 1e-30).
MEMBERSHIP_FLOOR = 1e-30

_DEFAULT_EPSILON = 0.05


def _at_least(x, floor):
    # Not `ops.maximum`: it returns float32 for float64 tensors on PyTorch (Keras 3.15).
    floor = ops.convert_to_tensor(floor, x.dtype)
    return ops.where(x > floor, x, floor)


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"`k` must be a positive integer. Received: k={k!r}")
    return int(k)


def _check_distribution(k_distribution, k: int) -> tuple[float, ...] | None:
    if k_distribution is None:
        return None
    if isinstance(k_distribution, str) or not hasattr(k_distribution, "__len__"):
        raise TypeError(
            "`k_distribution` must be a list of probabilities of k = 1, 2, ..., K. "
            f"Received: k_distribution={k_distribution!r}"
        )
    values = []
    for p in k_distribution:
        if isinstance(p, bool) or not isinstance(p, numbers.Real):
            raise TypeError(
                "`k_distribution` must hold real probabilities. "
                f"Received: k_distribution={k_distribution!r}"
            )
        values.append(float(p))
    if len(values) != k:
        raise ValueError(
            f"`k_distribution` gives the weights of k = 1..K with K = `k`, so it must have k={k} "
            f"entries. Received: k_distribution={k_distribution!r}"
        )
    if not all(math.isfinite(p) and p >= 0 for p in values) or not math.isclose(
        sum(values), 1.0, abs_tol=1e-6
    ):
        raise ValueError(
            "`k_distribution` must hold non-negative probabilities summing to 1. "
            f"Received: k_distribution={k_distribution!r}"
        )
    return tuple(values)


@keras.saving.register_keras_serializable(package="keras_softquantile")
class TopKCrossEntropy(keras.losses.Loss):
    """Top-k cross-entropy: `-log` of the true class's membership in the soft top-k.

    With `m_y(k)` the membership of the true class `y` in the soft top-k of the logits
    (`keras_softquantile.ops.soft_topk_mask` over the classes: memberships in [0, 1] summing
    to `k`, tending to the hard top-k indicator as `epsilon -> 0`), the loss of an example is

        -log(max(m_y(k), MEMBERSHIP_FLOOR)),

    near zero once the true class is safely among the `k` largest logits, whatever their
    order there. With `k_distribution = (p_1, ..., p_K)` the loss averages over k:
    `sum_k p_k * -log(max(m_y(k), MEMBERSHIP_FLOOR))`, e.g. `(0.5, 0, 0, 0, 0.5)` trains for
    top-1 and top-5 accuracy at once (Petersen et al., 2022). `MEMBERSHIP_FLOOR` is 1e-30, so
    each term is at most 69.08. The top-k membership is invariant to shifting and rescaling the
    logits, so this loss does not push logits apart beyond the cut; it learns rankings.

    `y_true` holds integer class ids `[batch]` (or `[batch, 1]`) or one-hot rows
    `[batch, classes]`; `y_pred` the logits `[batch, classes]`, or probabilities with
    `from_logits=False` (their logarithms are used, which rank the classes as the logits do).

    >>> loss = keras_softquantile.losses.TopKCrossEntropy(k=2, epsilon=1e-3)
    >>> logits = np.array([[3.0, 1.0, 2.0, 0.0], [3.0, 1.0, 2.0, 0.0]], "float32")
    >>> np.round(keras.ops.convert_to_numpy(loss.call(np.array([2, 3]), logits)), 2)
    array([ 0.  , 69.08], dtype=float32)

    Args:
        k: the number of guesses allowed, a positive int smaller than the number of classes
            (with `k_distribution`, the largest k, K).
        epsilon: positive float, the temperature of the top-k selection, in quantile-level
            units over the classes (0.05 by default).
        from_logits: whether `y_pred` holds logits (True) or probabilities.
        k_distribution: None, or K = `k` probabilities of k = 1..K to average the loss over.
        reduction: Keras reduction of the per-example losses.
        name: optional name.
        dtype: the dtype of the computation.

    Returns:
        The mean loss over the batch with the default reduction.

    References:
        Petersen, Kuehne, Borgelt, Deussen (2022). Differentiable Top-k Classification
        Learning. ICML. Berrada, Zisserman, Kumar (2018). Smooth Loss Functions for Deep
        Top-k Classification. ICLR.
    """

    def __init__(
        self,
        k: int = 5,
        epsilon: float = _DEFAULT_EPSILON,
        from_logits: bool = True,
        k_distribution=None,
        reduction: str | None = "sum_over_batch_size",
        name: str | None = None,
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.k = _check_k(k)
        self.epsilon = check_epsilon(epsilon)
        if not isinstance(from_logits, bool):
            raise TypeError(f"`from_logits` must be a bool. Received: from_logits={from_logits!r}")
        self.from_logits = from_logits
        self.k_distribution = _check_distribution(k_distribution, self.k)

    def __call__(self, y_true, y_pred, sample_weight=None):
        _check_float_predictions(y_pred)
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def _one_hot(self, y_true, y_pred):
        classes = y_pred.shape[-1]
        if len(y_true.shape) == 2 and y_true.shape[-1] == classes and classes != 1:
            return ops.cast(y_true, y_pred.dtype)
        if len(y_true.shape) == 2 and y_true.shape[-1] == 1:
            y_true = ops.squeeze(y_true, -1)
        if len(y_true.shape) != 1:
            raise ValueError(
                "`y_true` must hold class ids [batch] or one-hot rows [batch, classes]. "
                f"Received: y_true.shape={tuple(y_true.shape)}, y_pred.shape={tuple(y_pred.shape)}"
            )
        return ops.one_hot(ops.cast(y_true, "int32"), classes, dtype=y_pred.dtype)

    def call(self, y_true, y_pred):
        y_pred = ops.convert_to_tensor(y_pred)
        y_true = ops.convert_to_tensor(y_true)
        if len(y_pred.shape) != 2 or y_pred.shape[-1] is None:
            raise ValueError(
                "`y_pred` must hold logits [batch, classes] with a known number of classes. "
                f"Received: y_pred.shape={tuple(y_pred.shape)}"
            )
        classes = y_pred.shape[-1]
        if self.k >= classes:
            raise ValueError(
                f"`k` must be smaller than the number of classes ({classes}). Received: k={self.k}"
            )
        target = self._one_hot(y_true, y_pred)
        scores = y_pred if self.from_logits else ops.log(_at_least(y_pred, MEMBERSHIP_FLOOR))
        weights = self.k_distribution or (0.0,) * (self.k - 1) + (1.0,)
        loss = ops.zeros_like(y_pred[:, 0])
        for k, weight in enumerate(weights, start=1):
            if weight > 0:
                mask = soft_ops.soft_topk_mask(scores, k, epsilon=self.epsilon)
                membership = ops.sum(mask * target, axis=-1)
                loss = loss - weight * ops.log(_at_least(membership, MEMBERSHIP_FLOOR))
        return loss

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "dtype": self.dtype,
            "k": self.k,
            "epsilon": self.epsilon,
            "from_logits": self.from_logits,
            "k_distribution": None if self.k_distribution is None else list(self.k_distribution),
        }
