"""The perturbed-selection estimator: Monte-Carlo smoothing of the hard quantile split."""

from __future__ import annotations

import numbers

import keras
import numpy as np
from keras import ops

from keras_softquantile.ops import _backend, _validation
from keras_softquantile.ops._layout import Prepared, _dims
from keras_softquantile.ops._ot.problem import Tensor

__all__ = ["perturbed_quantile_split"]

_SEED_MESSAGE = (
    "`seed` must be an int, a pair of ints (a stateless seed) or a "
    "`keras.random.SeedGenerator`. Received: seed={!r}"
)


def check_num_samples(num_samples) -> int:
    """A Monte-Carlo sample count: an int >= 2 (the baseline leaves one sample out)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise TypeError(f"`num_samples` must be an int >= 2. Received: num_samples={num_samples!r}")
    if num_samples < 2:
        raise ValueError(f"`num_samples` must be >= 2. Received: num_samples={num_samples!r}")
    return int(num_samples)


def _score_function_term(hard, direction):
    """Zero in value; its gradient is the perturbation estimate of d E[hard] / d z.

    `hard` holds one hard outcome per sample, `[S, rows, ...]`, and `direction[s, r]` is
    `<noise_s, z_r> / sigma`. Differentiating `(hard_s - baseline_s) * direction_s` gives
    `(hard_s - baseline_s) noise_s / sigma`, the estimator of Berthet et al. (2020) with a
    leave-one-out baseline as control variate: the baseline is independent of `noise_s`, so
    the estimate stays unbiased and its variance drops.
    """
    hard = ops.stop_gradient(hard)
    samples = hard.shape[0]  # num_samples, always static
    baseline = (ops.sum(hard, axis=0, keepdims=True) - hard) / float(samples - 1)
    for _ in range(len(hard.shape) - len(direction.shape)):
        direction = ops.expand_dims(direction, -1)
    centred = direction - ops.stop_gradient(direction)
    return ops.mean((hard - baseline) * centred, axis=0)


def perturbed_quantile_split(
    values: Tensor,
    scores: Tensor,
    quantile: float = 0.25,
    *,
    sigma: float = 0.02,
    num_samples: int = 100,
    axis: int = -1,
    mask: Tensor | None = None,
    output: str = "weights",
    seed: int | Tensor | None = None,
    return_weights: bool = False,
    name: str | None = None,
):
    """The lower/upper quantile split smoothed by random perturbations of the scores.

    The Monte-Carlo alternative to the optimal-transport `soft_quantile_split` (the "perturbed
    optimizers" of Berthet et al., 2020). The squashed scores `z` (see `squash_scores`, so
    `sigma` is in quantile-level units like `epsilon`) get Gaussian noise, the hard split of
    `argsort(z + sigma * noise)` is taken for `num_samples` draws, and the outputs are the
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

    The noise comes from `keras.random.normal`, so it runs on every Keras backend. With the
    same stateless seed, TensorFlow draws the same numbers as before the port to Keras 3 (and
    XLA its own stream, of the same law); JAX and PyTorch draw other numbers of the same law.

    Bad arguments raise `ValueError` or `TypeError`; non-finite valid scores raise when the
    values can be read (inside `tf.function`, an `InvalidArgumentError`). Under `jax.jit` and
    XLA, where errors cannot be raised, rows that break a promise (mismatched shapes included)
    come out NaN.

    >>> scores = np.array([[0.3, -1.2, 2.0, 0.1, -0.4, 1.1, 0.8, -2.0]], "float32")
    >>> low, high = keras_softquantile.ops.perturbed_quantile_split(
    ...     scores, scores, 0.25, sigma=1e-3, seed=(1, 2))
    >>> keras.ops.convert_to_numpy(high)  # the two largest scores, as keras.ops.top_k(scores, 2)
    array([[0., 0., 1., 0., 0., 1., 0., 0.]], dtype=float32)

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
        seed: an int, a pair of ints or a shape-[2] integer tensor: a stateless seed, the
            same seed gives the same draws (inside `tf.function` and `jax.jit` too; on
            PyTorch the pair is mixed into the 32-bit seed of a `torch.Generator`). Or a
            `keras.random.SeedGenerator`: each call draws with its next seed, so calls differ
            and a generator made with the same seed repeats the sequence (under `jax.jit` it
            needs Keras's stateless scope, as in a model's train step). Or None: fresh noise
            each call, from Keras's global seed generator (`keras.utils.set_random_seed`
            seeds it; not under `jax.jit`, where Keras refuses unseeded draws).
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
    sigma = _validation.check_positive(sigma, "sigma")
    num_samples = check_num_samples(num_samples)
    output = _validation.check_split_output(output)
    with keras.name_scope(name or "perturbed_quantile_split"):
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
        noise = keras.random.normal((num_samples, *_dims(z)), dtype=dtype, seed=_seed(seed))
        noise = ops.where(valid, noise, ops.zeros_like(noise))
        perturbed = ops.stop_gradient(z) + sigma * noise
        # Padding sorts last, so the first `count` ranks are the valid entries.
        largest = float(np.finfo(dtype).max)
        perturbed = ops.where(valid, perturbed, ops.full_like(perturbed, largest))
        order = ops.cast(ops.argsort(perturbed, axis=-1), "int32")  # stable on every backend
        ranks = ops.cast(ops.argsort(order, axis=-1), "int32")
        count = ops.cast(prepared.count[..., 0], "int32")  # [rows]
        k = _validation.hard_split_sizes(count, quantile, prepared.n)
        low_hard = ops.cast(ranks < k[:, None], dtype)
        high_hard = ops.cast(ops.logical_and(ranks >= (count - k)[:, None], valid), dtype)
        direction = ops.sum(noise * z, axis=-1) / sigma  # [S, rows]
        low_weights = ops.mean(low_hard, axis=0) + _score_function_term(low_hard, direction)
        high_weights = ops.mean(high_hard, axis=0) + _score_function_term(high_hard, direction)
        # Rows with non-finite scores (or mismatched shapes) are NaN under XLA and `jax.jit`,
        # where the checks in `Prepared` cannot raise.
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
                prepared.output(prepared.layout.restore(ops.stop_gradient(w)))
                for w in (low_weights, high_weights)
            )
            return pair, weights
        return pair


class _StatelessSeed(keras.random.SeedGenerator):
    """A fixed stateless seed `[2]` in the form `keras.random` takes: a seed generator whose
    `next()` always returns that seed (it holds no state variable), so the same seed gives
    the same draws, inside traced functions too."""

    def __init__(self, seed):  # no `super().__init__()`: that would create a state variable
        self.name = "stateless_seed"
        self._seed = seed

    def next(self, ordered=True):
        del ordered
        if _backend.NAME == "jax":
            return ops.cast(self._seed, "uint32")  # a raw JAX key
        if _backend.NAME == "torch":
            # Keras seeds a `torch.Generator` from the sum of the two entries; mixing them
            # first keeps seeds such as (1, 2) and (2, 1) apart. PyTorch runs eagerly here
            # (Keras draws outside `torch.compile`), so the values can be read.
            first, second = (int(v) for v in ops.convert_to_numpy(self._seed))
            mixed = (first * 0x9E3779B1 + second) & 0xFFFFFFFF
            mixed = (mixed ^ 0x80000000) - 0x80000000  # as int32
            return ops.convert_to_tensor([mixed, 0], dtype="int32")
        return self._seed


def _seed(seed):
    """`seed` as `keras.random` takes it: None (Keras's global seed generator), a
    `keras.random.SeedGenerator`, or a fixed stateless seed."""
    if seed is None or isinstance(seed, keras.random.SeedGenerator):
        return seed
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        seed = int(seed) & 0xFFFFFFFF
        return _StatelessSeed(ops.convert_to_tensor([0, (seed ^ 0x80000000) - 0x80000000], "int32"))
    if isinstance(seed, bool | str | bytes | float):
        raise ValueError(_SEED_MESSAGE.format(seed))
    try:
        tensor = ops.convert_to_tensor(seed)
    except (TypeError, ValueError):
        raise ValueError(_SEED_MESSAGE.format(seed)) from None
    dtype = keras.backend.standardize_dtype(tensor.dtype)
    if "int" not in dtype or tuple(tensor.shape) != (2,):
        raise ValueError(_SEED_MESSAGE.format(seed))
    return _StatelessSeed(ops.cast(tensor, "int32"))


def _mean(weights, values, prepared: Prepared, k):
    values = ops.where(prepared.valid, values, ops.zeros_like(values))
    size = ops.cast(ops.maximum(k, 1), values.dtype)
    return prepared.layout.restore_reduced(ops.sum(weights * values, axis=-1) / size)


def _sorted(prepared: Prepared, values, order, direction, quantile: float):
    n = _validation.static_length(prepared.layout.rows, -1, "perturbed_quantile_split")
    k = _validation.hard_split_size(n, quantile)
    # Gathering keeps the gradient with respect to `values`; the score-function term adds
    # the one with respect to the scores.
    tiled = ops.broadcast_to(ops.expand_dims(values, 0), _dims(order))
    ordered = ops.take_along_axis(tiled, order, axis=-1)  # [S, rows, n]
    low = ordered[..., :k]
    high = ordered[..., n - k :]
    low = ops.mean(low, axis=0) + _score_function_term(low, direction)
    high = ops.mean(high, axis=0) + _score_function_term(high, direction)
    return (
        prepared.layout.restore_reduced(prepared.poison(low), k),
        prepared.layout.restore_reduced(prepared.poison(high), k),
    )
