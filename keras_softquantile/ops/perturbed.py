"""The perturbed-selection estimator: Monte-Carlo smoothing of the hard quantile split."""

from __future__ import annotations

import math
import numbers

import tensorflow as tf
import tensorflow_probability as tfp

from keras_softquantile.ops import _validation
from keras_softquantile.ops._layout import Prepared

__all__ = ["perturbed_quantile_split"]

_OUTPUTS = ("weights", "mean", "sorted")


def _check_sigma(sigma) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"`sigma` must be a positive float. Received: sigma={sigma!r}")
    if not (math.isfinite(float(sigma)) and float(sigma) > 0):
        raise ValueError(f"`sigma` must be a finite number > 0. Received: sigma={sigma!r}")
    return float(sigma)


def check_num_samples(num_samples) -> int:
    """A Monte-Carlo sample count: an int >= 2 (the baseline leaves one sample out)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise TypeError(f"`num_samples` must be an int >= 2. Received: num_samples={num_samples!r}")
    if num_samples < 2:
        raise ValueError(f"`num_samples` must be >= 2. Received: num_samples={num_samples!r}")
    return int(num_samples)


def _score_function_term(hard: tf.Tensor, direction: tf.Tensor) -> tf.Tensor:
    """Zero in value; its gradient is the perturbation estimate of d E[hard] / d z.

    `hard` holds one hard outcome per sample, `[S, rows, ...]`, and `direction[s, r]` is
    `<noise_s, z_r> / sigma`. Differentiating `(hard_s - baseline_s) * direction_s` gives
    `(hard_s - baseline_s) noise_s / sigma`, the estimator of Berthet et al. (2020) with a
    leave-one-out baseline as control variate: the baseline is independent of `noise_s`, so
    the estimate stays unbiased and its variance drops.
    """
    hard = tf.stop_gradient(hard)
    samples = tf.cast(tf.shape(hard)[0], hard.dtype)
    baseline = (tf.reduce_sum(hard, axis=0, keepdims=True) - hard) / (samples - 1)
    extra = hard.shape.rank - direction.shape.rank
    direction = tf.reshape(direction, tf.concat([tf.shape(direction), [1] * extra], 0))
    centred = direction - tf.stop_gradient(direction)
    return tf.reduce_mean((hard - baseline) * centred, axis=0)


def perturbed_quantile_split(
    values: tf.Tensor,
    scores: tf.Tensor,
    quantile: float = 0.25,
    *,
    sigma: float = 0.02,
    num_samples: int = 100,
    axis: int = -1,
    mask: tf.Tensor | None = None,
    output: str = "weights",
    seed: int | tf.Tensor | None = None,
    return_weights: bool = False,
    name: str | None = None,
):
    """The lower/upper quantile split smoothed by random perturbations of the scores.

    The Monte-Carlo alternative to the optimal-transport `soft_quantile_split` (the "perturbed
    optimizers" of Berthet et al., 2020). The squashed scores `z` (see `squash_scores`, so
    `sigma` is in quantile-level units like `epsilon`) get Gaussian noise, the hard split of
    `tf.argsort(z + sigma * noise)` is taken for `num_samples` draws, and the outputs are the
    averages over the draws: a smooth function of the scores whose Jacobian is estimated by
    `E[hard(z + sigma * noise) noise^T] / sigma`, with a leave-one-out baseline subtracted
    (unbiased, lower variance). Each hard split holds `floor(quantile * n)` entries per bucket,
    so the averaged weights sum to that integer exactly, but the value and the gradient are
    random: their Monte-Carlo error shrinks like `1 / sqrt(num_samples)` and, for the
    gradient, grows like `1 / sigma`. Cost: `num_samples` sorts per row, against one Newton
    solve (a few passes over the row) for `soft_quantile_split`. As `sigma -> 0` the outputs
    converge to the hard split for distinct scores, with a gradient estimate whose variance
    grows without bound. For the same sharpness as `soft_quantile_split` at `epsilon`, take
    `sigma` about `1.75 * epsilon` (measured by `benchmarks/bench_estimators.py`, which also
    compares cost and gradient variance).

    >>> scores = tf.constant([[0.3, -1.2, 2.0, 0.1, -0.4, 1.1, 0.8, -2.0]])
    >>> low, high = keras_softquantile.ops.perturbed_quantile_split(
    ...     scores, scores, 0.25, sigma=1e-3, seed=(1, 2))
    >>> high  # the two largest scores, as in tf.math.top_k(scores, 2)
    <tf.Tensor: shape=(1, 8), dtype=float32, numpy=array([[0., 0., 1., 0., 0., 1., 0., 0.]], ...)>

    Args:
        values: float tensor like `scores`, the quantities to select.
        scores: float tensor, the scores that decide the selection.
        quantile: the level q in (0, 0.5].
        sigma: positive float, the standard deviation of the noise on the squashed scores.
        num_samples: number of noise draws, >= 2.
        axis: the axis along which scores compete.
        mask: optional boolean padding mask like `scores` (not with `output="sorted"`).
        output: "weights" (the averaged hard masks `(low, high)`, like `scores`), "mean" (the
            averaged hard means of `values`, `scores` without `axis`) or "sorted" (the averaged
            hard selections ordered by ascending score, `axis` of length
            `floor(quantile * n)`; needs a static n).
        seed: an int, a pair of ints or a shape-[2] integer tensor (a stateless seed: the same
            seed gives the same draws); None draws fresh noise each call.
        return_weights: with `output` "mean" or "sorted", also return the averaged hard masks
            `(low_weights, high_weights)`, like `scores`, without gradient.
        name: optional name scope.

    Returns:
        `(low, high)`; with `return_weights`, `((low, high), (low_weights, high_weights))`.

    References:
        Berthet, Blondel, Teboul, Cuturi, Vert, Bach (2020). Learning with differentiable
        perturbed optimizers. NeurIPS.
    """
    quantile = _validation.check_split_quantile(quantile)
    sigma = _check_sigma(sigma)
    num_samples = check_num_samples(num_samples)
    if output not in _OUTPUTS:
        raise ValueError(f"`output` must be one of {_OUTPUTS}. Received: output={output!r}")
    with tf.name_scope(name or "perturbed_quantile_split"):
        prepared = Prepared(scores, axis, mask)
        value_rows = prepared.values(values)
        dtype = prepared.dtype
        if output == "sorted" and prepared.masked:
            raise ValueError(
                "`output='sorted'` does not support `mask`: its output length "
                "floor(quantile * n) must be the same for every row. Received: a mask"
            )
        z = prepared.z
        valid = prepared.valid
        shape = tf.concat([[num_samples], tf.shape(z)], 0)
        noise = tfp.distributions.Normal(tf.constant(0, dtype), tf.constant(1, dtype)).sample(
            shape, seed=_stateless_seed(seed)
        )
        noise = tf.where(valid, noise, tf.zeros_like(noise))
        perturbed = tf.stop_gradient(z) + sigma * noise
        # Padding sorts last, so the first `count` ranks are the valid entries.
        perturbed = tf.where(valid, perturbed, tf.fill(tf.shape(perturbed), dtype.max))
        order = tf.argsort(perturbed, axis=-1, stable=True)
        ranks = tf.argsort(order, axis=-1, stable=True)
        count = tf.cast(prepared.count[..., 0], tf.int32)  # [rows]
        k = tf.cast(tf.floor(quantile * tf.cast(count, tf.float64) + 1e-9), tf.int32)
        low_hard = tf.cast(ranks < k[:, None], dtype)
        high_hard = tf.cast((ranks >= (count - k)[:, None]) & valid, dtype)
        direction = tf.reduce_sum(noise * z, axis=-1) / sigma  # [S, rows]
        low_weights = tf.reduce_mean(low_hard, 0) + _score_function_term(low_hard, direction)
        high_weights = tf.reduce_mean(high_hard, 0) + _score_function_term(high_hard, direction)
        # Rows with non-finite scores (or mismatched shapes) are NaN under XLA, where the
        # checks in `Prepared` cannot raise.
        low_weights, high_weights = prepared.poison(low_weights), prepared.poison(high_weights)
        if output == "sorted":
            low, high = _sorted(prepared, value_rows, order, direction, quantile)
        elif output == "mean":
            low = _mean(low_weights, value_rows, prepared, k)
            high = _mean(high_weights, value_rows, prepared, k)
        else:
            low = prepared.layout.restore(low_weights)
            high = prepared.layout.restore(high_weights)
        pair = (prepared.output(low), prepared.output(high))
        if return_weights:
            weights = tuple(
                prepared.output(prepared.layout.restore(tf.stop_gradient(w)))
                for w in (low_weights, high_weights)
            )
            return pair, weights
        return pair


def _stateless_seed(seed):
    if seed is None:
        return None
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return tf.constant([0, int(seed)], tf.int32)
    seed = tf.convert_to_tensor(seed)
    if not seed.dtype.is_integer or seed.shape != (2,):
        raise ValueError(
            f"`seed` must be an int or a pair of ints (a stateless seed). Received: seed={seed!r}"
        )
    return tf.cast(seed, tf.int32)


def _mean(weights: tf.Tensor, values: tf.Tensor, prepared: Prepared, k: tf.Tensor):
    values = tf.where(prepared.valid, values, tf.zeros_like(values))
    size = tf.cast(tf.maximum(k, 1), values.dtype)
    return prepared.layout.restore_reduced(tf.reduce_sum(weights * values, axis=-1) / size)


def _sorted(prepared: Prepared, values, order, direction, quantile: float):
    n = _validation.static_length(prepared.layout.rows, -1, "perturbed_quantile_split")
    k = math.floor(quantile * n + 1e-9)
    # Gathering keeps the gradient with respect to `values`; the score-function term adds
    # the one with respect to the scores.
    samples = tf.shape(order)[0]
    tiled = tf.tile(values[None], [samples, 1, 1])
    ordered = tf.gather(tiled, order, batch_dims=2)  # [S, rows, n]
    low = ordered[..., :k]
    high = ordered[..., n - k :]
    low = tf.reduce_mean(low, 0) + _score_function_term(low, direction)
    high = tf.reduce_mean(high, 0) + _score_function_term(high, direction)
    return (
        prepared.layout.restore_reduced(prepared.poison(low), k),
        prepared.layout.restore_reduced(prepared.poison(high), k),
    )
