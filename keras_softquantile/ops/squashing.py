"""Squashing scores into (0, 1) so that `epsilon` does not depend on their scale."""

from __future__ import annotations

import tensorflow as tf

__all__ = ["squash_scores"]


def squash_scores(
    scores: tf.Tensor,
    *,
    mask: tf.Tensor | None = None,
    name: str | None = None,
) -> tf.Tensor:
    """Maps scores to `z = Phi((x - mean) / std)` along the last axis.

    `mean` and `std` are taken over the valid entries of each row and `Phi` is the standard
    normal CDF, so for roughly Gaussian scores `z` is roughly uniform on (0, 1) and is close to
    the empirical quantile level of each score. `z` is invariant to a shift and to a positive
    rescaling of a row, which makes every `epsilon` in this package scale-free: it is the width,
    in quantile-level units, over which an entry's membership moves from one bucket to the next.

    The computation is guarded for extreme inputs: rows are first shifted by their maximum and
    divided by their range (both exactly invariant, hence held constant for the gradient), so
    scores of +-1e30 neither overflow nor lose their order; a row whose valid entries are all
    equal maps to 0.5 everywhere, with zero (not NaN) gradient. Invalid entries (`mask` False)
    map to 0.5, never influence the valid ones, and receive zero gradient even if they hold NaN.

    Args:
        scores: float tensor `[..., n]`.
        mask: optional boolean tensor of the same shape, True for valid entries.
        name: optional name scope.

    Returns:
        A tensor like `scores` with values in [0, 1].
    """
    with tf.name_scope(name or "squash_scores"):
        x = tf.convert_to_tensor(scores)
        valid = tf.ones_like(x, dtype=tf.bool) if mask is None else mask
        x = tf.where(valid, x, tf.zeros_like(x))
        lowest = tf.constant(x.dtype.min, x.dtype)
        highest = tf.constant(x.dtype.max, x.dtype)
        top = tf.reduce_max(tf.where(valid, x, lowest), axis=-1, keepdims=True)
        bottom = tf.reduce_min(tf.where(valid, x, highest), axis=-1, keepdims=True)
        # Shift and scale are exact invariances of z, so they are constants for autodiff.
        top = tf.stop_gradient(tf.where(top > lowest, top, tf.zeros_like(top)))
        spread = tf.stop_gradient(top - bottom)
        spread = tf.where(spread > 0, spread, tf.ones_like(spread))
        # (x - top) / spread in two steps so +-1e30 scores do not overflow their difference.
        d = x / spread - top / spread
        d = tf.where(valid, d, tf.zeros_like(d))
        count = tf.reduce_sum(tf.cast(valid, x.dtype), axis=-1, keepdims=True)
        count = tf.maximum(count, 1)
        mean = tf.reduce_sum(d, axis=-1, keepdims=True) / count
        deviation = tf.where(valid, d - mean, tf.zeros_like(d))
        variance = tf.reduce_sum(tf.square(deviation), axis=-1, keepdims=True) / count
        spread_out = variance > 0
        std = tf.sqrt(tf.where(spread_out, variance, tf.ones_like(variance)))
        u = tf.where(spread_out & valid, deviation / std, tf.zeros_like(deviation))
        return 0.5 * tf.math.erfc(-u * tf.constant(0.5**0.5, x.dtype))
