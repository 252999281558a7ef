"""Soft top-k masks, soft quantile-bucket memberships and the soft quantile split."""

from __future__ import annotations

import itertools
import math
import numbers

import keras
import numpy as np
from keras import ops

from keras_softquantile.ops import _backend, _validation, transport
from keras_softquantile.ops._layout import Prepared, constant_masses
from keras_softquantile.ops._ot.problem import Tensor
from keras_softquantile.ops._validation import DEFAULT_EPSILON
from keras_softquantile.ops.squashing import larger

__all__ = ["soft_quantile_masks", "soft_quantile_split", "soft_topk_mask"]


def _diagnostics(prepared: Prepared, result: transport.TransportResult):
    """Per-row diagnostics reshaped to the batch (leading) shape of the scores."""
    layout = prepared.layout
    m = result.memberships.shape[-1]
    return transport.TransportResult(
        memberships=prepared.output(layout.restore_with_trailing(result.memberships, m)),
        boundaries=layout.restore_reduced(result.boundaries, m - 1),
        iterations=layout.restore_reduced(result.iterations),
        marginal_error=layout.restore_reduced(result.marginal_error),
        converged=layout.restore_reduced(result.converged),
    )


@_backend.compiled_op
def soft_quantile_masks(
    scores: Tensor,
    quantiles=(0.25, 0.75),
    *,
    epsilon: float | Tensor = DEFAULT_EPSILON,
    axis: int = -1,
    mask: Tensor | None = None,
    solver: str = "auto",
    return_diagnostics: bool = False,
    name: str | None = None,
):
    """Soft membership of every score in the buckets cut at the given quantile levels.

    The soft counterpart of bucketing the scores at their empirical quantiles (for example
    `numpy.digitize(x, numpy.quantile(x, quantiles))`): bucket `j` holds the scores between
    quantile levels `q_{j-1}` and `q_j` (with `q_{-1} = 0`, `q_J = 1`), lowest bucket first.
    Memberships come from an entropic optimal transport of the scores onto one target per
    bucket, so the soft buckets keep the exact hard sizes: along `axis`, bucket `j` holds total
    mass `n * (q_j - q_{j-1})`, fractional sizes included (n = 10, q = 0.25 gives 2.5), and each
    entry's memberships sum to one. As `epsilon -> 0` with distinct scores, the memberships
    converge to the hard one-hot buckets. For `epsilon > 0` they are smooth in the scores, with
    exact implicit gradients.

    Scores are squashed to their approximate quantile level first (`squash_scores`), so the
    output does not change when the scores are shifted or multiplied by a positive constant,
    and `epsilon` is the width, in quantile-level units, of each soft bucket boundary: about
    `1.4 * epsilon` of the memberships' mass differs from the hard buckets per boundary.

    Inputs may be numpy arrays or tensors of the active Keras backend; outputs are tensors of
    that backend.

    Bad arguments raise `ValueError` or `TypeError`; non-finite valid scores and a solver that
    did not converge raise when the values can be read (inside `tf.function`, an
    `InvalidArgumentError`). Under `jax.jit` and XLA, where errors cannot be raised, rows that
    break a promise come out NaN.

    >>> x = np.array([[0.3, -1.2, 2.0, 0.1, -0.4, 1.1, 0.8, -2.0]], "float32")
    >>> masks = keras_softquantile.ops.soft_quantile_masks(x, epsilon=1e-3)
    >>> np.round(keras.ops.convert_to_numpy(masks)[0, :, 2])  # upper quartile: the two largest
    array([0., 0., 1., 0., 0., 1., 0., 0.], dtype=float32)

    Args:
        scores: float tensor of any rank >= 1.
        quantiles: strictly increasing levels in (0, 1) cutting the buckets.
        epsilon: positive float or scalar tensor; smaller is sharper.
        axis: the axis along which scores compete.
        mask: optional boolean tensor like `scores`; False entries are padding: they get zero
            membership and do not count in n.
        solver: "auto" (Newton up to 2048 buckets, then Sinkhorn), "newton" or "sinkhorn".
        return_diagnostics: also return the `TransportResult`, with per-row fields shaped like
            the batch dimensions of `scores`.
        name: optional name scope.

    Returns:
        Memberships of shape `scores.shape + (len(quantiles) + 1,)` in the dtype of `scores`
        (computed in float32 for float16/bfloat16); with `return_diagnostics`, a pair
        `(memberships, diagnostics)`.
    """
    levels = _validation.check_quantiles(quantiles)
    with keras.name_scope(name or "soft_quantile_masks"):
        prepared = Prepared(scores, axis, mask)
        edges = (0.0, *levels, 1.0)
        masses = constant_masses([hi - lo for lo, hi in itertools.pairwise(edges)])
        result = prepared.solve(masses, epsilon, solver, "soft_quantile_masks")
        masks = prepared.output(
            prepared.layout.restore_with_trailing(result.memberships, len(edges) - 1)
        )
        if return_diagnostics:
            return masks, _diagnostics(prepared, result)
        return masks


def _check_k(k, n: int | None):
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise TypeError(f"`k` must be a number of entries to select. Received: k={k!r}")
    if not math.isfinite(float(k)) or k < 0 or (n is not None and k > n):
        bound = "n" if n is None else f"n={n}"
        raise ValueError(f"`k` must lie in [0, {bound}]. Received: k={k!r}")
    return float(k)


@_backend.compiled_op
def soft_topk_mask(
    scores: Tensor,
    k: float,
    *,
    epsilon: float | Tensor = DEFAULT_EPSILON,
    axis: int = -1,
    mask: Tensor | None = None,
    solver: str = "auto",
    return_diagnostics: bool = False,
    name: str | None = None,
):
    """Soft mask of the `k` largest scores along `axis`.

    The soft counterpart of the indicator of `keras.ops.top_k(x, k)[1]`: values in [0, 1]
    that sum to exactly `k` along `axis` (fractional `k` allowed), largest for the largest
    scores. As `epsilon -> 0` with distinct scores it converges to the hard 0/1 mask. It is the
    two-bucket case of `soft_quantile_masks` at level `1 - k / n`, with the same scale-free
    `epsilon`, exact masses and exact implicit gradients. `k = 0` gives zeros and `k = n` ones.

    Bad arguments raise `ValueError` or `TypeError`; non-finite valid scores and a solver that
    did not converge raise when the values can be read (inside `tf.function`, an
    `InvalidArgumentError`). Under `jax.jit` and XLA, where errors cannot be raised, rows that
    break a promise come out NaN.

    >>> x = np.array([0.3, -1.2, 2.0, 0.1, 1.1], "float32")
    >>> mask = keras_softquantile.ops.soft_topk_mask(x, 2, epsilon=1e-3)
    >>> np.round(keras.ops.convert_to_numpy(mask))
    array([0., 0., 1., 0., 1.], dtype=float32)

    Args:
        scores: float tensor of any rank >= 1.
        k: number of entries to select, in [0, n] (n counts valid entries only when `mask`
            is given; rows with fewer than k valid entries select all of them).
        epsilon: positive float or scalar tensor; smaller is sharper.
        axis: the axis along which scores compete.
        mask: optional boolean tensor like `scores`; False entries are padding.
        solver: "auto", "newton" or "sinkhorn".
        return_diagnostics: also return the `TransportResult`.
        name: optional name scope.

    Returns:
        A mask like `scores` (same shape and dtype); with `return_diagnostics`, a pair.
    """
    with keras.name_scope(name or "soft_topk_mask"):
        prepared = Prepared(scores, axis, mask)
        k = _check_k(k, None if prepared.masked else prepared.n)
        dtype = prepared.dtype
        count = prepared.count  # [rows, 1]
        one = ops.ones_like(count)
        # Not `ops.cast(k, ...)`: TensorFlow would round the Python float to float32 first.
        fraction = ops.convert_to_tensor(k, dtype) / larger(count, one)
        fraction = ops.where(fraction < one, fraction, one)
        # k = 0 or k = n leave an empty bucket; solve a harmless problem and overwrite.
        degenerate = ops.logical_or(fraction <= 0, fraction >= 1)
        safe = ops.where(degenerate, ops.full_like(fraction, 0.5), fraction)
        masses = ops.concatenate([1 - safe, safe], axis=-1)
        result = prepared.solve(masses, epsilon, solver, "soft_topk_mask")
        selected = result.memberships[:, :, 1]
        hard = ops.cast(prepared.valid, dtype) * ops.cast(fraction >= 1, dtype)
        selected = prepared.poison(ops.where(degenerate, hard, selected))
        output = prepared.output(prepared.layout.restore(selected))
        if return_diagnostics:
            return output, _diagnostics(prepared, result)
        return output


@_backend.compiled_op
def soft_quantile_split(
    values: Tensor,
    scores: Tensor,
    quantile: float = 0.25,
    *,
    epsilon: float | Tensor = DEFAULT_EPSILON,
    axis: int = -1,
    mask: Tensor | None = None,
    output: str = "weights",
    solver: str = "auto",
    return_diagnostics: bool = False,
    name: str | None = None,
):
    """Soft selection of the `values` whose `scores` fall in the lower and upper quantile.

    The differentiable version of `A_low = A[lowest q*n scores]`, `A_high = A[highest q*n
    scores]`. One entropic transport assigns every entry to the lower bucket (mass `q`), the
    middle (mass `1 - 2q`) or the upper bucket (mass `q`), so both soft selections hold exactly
    `q * n` entries' worth of weight.

    Three views of the selection, by `output`:
      * "weights": the two membership masks `(low, high)`, each like `scores`.
      * "mean": the membership-weighted means of `values` over each bucket, shaped like
        `scores` without `axis`.
      * "sorted": the selected values themselves, ordered by ascending score, each of shape
        `[..., k]` along `axis` with `k = floor(quantile * n)`: the soft counterpart of
        the first and last k entries along `axis` of
        `numpy.take_along_axis(values, numpy.argsort(scores, axis), axis)`, to which it
        converges as `epsilon -> 0`. It solves a transport onto `2k + 1` ordered targets
        (Newton with a dense `2k x 2k` Hessian up to 2048 targets, Sinkhorn beyond), so it
        costs O(n k) memory and O(n k^2) time; it needs a static n and no `mask`.

    Bad arguments raise `ValueError` or `TypeError`; non-finite valid scores and a solver that
    did not converge raise when the values can be read (inside `tf.function`, an
    `InvalidArgumentError`). Under `jax.jit` and XLA, where errors cannot be raised, rows that
    break a promise (mismatched shapes included) come out NaN.

    Args:
        values: float tensor like `scores`, the quantities to select.
        scores: float tensor, the scores that decide the selection.
        quantile: the level q in (0, 0.5]; 0.25 gives the quartiles.
        epsilon: positive float or scalar tensor; smaller is sharper.
        axis: the axis along which scores compete.
        mask: optional boolean padding mask like `scores` (not with output="sorted").
        output: "weights", "mean" or "sorted".
        solver: "auto", "newton" or "sinkhorn".
        return_diagnostics: also return the `TransportResult`.
        name: optional name scope.

    Returns:
        `(low, high)` as described; with `return_diagnostics`, `((low, high), diagnostics)`.
    """
    quantile = _validation.check_split_quantile(quantile)
    output = _validation.check_split_output(output)
    with keras.name_scope(name or "soft_quantile_split"):
        prepared = Prepared(scores, axis, mask)
        value_rows = prepared.values(values)
        if output == "sorted":
            low, high, result = _split_sorted(prepared, value_rows, quantile, epsilon, solver, mask)
        else:
            # A middle bucket within rounding of empty (q = 0.5 - 1e-17) is left out: its two
            # boundaries would coincide and the problem is the two-bucket one.
            if 1 - 2 * quantile > 64 * np.finfo(prepared.dtype).eps:
                masses = constant_masses([quantile, 1 - 2 * quantile, quantile])
            else:
                masses = constant_masses([0.5, 0.5])
            result = prepared.solve(masses, epsilon, solver, "soft_quantile_split")
            low = result.memberships[:, :, 0]
            high = result.memberships[:, :, -1]
            if output == "weights":
                low = prepared.layout.restore(low)
                high = prepared.layout.restore(high)
            else:
                low = _weighted_mean(low, value_rows, prepared)
                high = _weighted_mean(high, value_rows, prepared)
        pair = (prepared.output(low), prepared.output(high))
        if return_diagnostics:
            return pair, _diagnostics(prepared, result)
        return pair


def _weighted_mean(weights, values, prepared: Prepared):
    values = ops.where(prepared.valid, values, ops.zeros_like(values))
    total = ops.sum(weights, axis=-1)
    mean = ops.sum(weights * values, axis=-1) / ops.where(total > 0, total, ops.ones_like(total))
    return prepared.layout.restore_reduced(mean)


def _split_sorted(prepared: Prepared, values, quantile: float, epsilon, solver, mask):
    if mask is not None:
        raise ValueError(
            "`output='sorted'` does not support `mask`: its output length floor(quantile * n) "
            "must be the same for every row. Received: a mask"
        )
    n = _validation.static_length(prepared.layout.rows, -1, "soft_quantile_split(output='sorted')")
    k = _validation.hard_split_size(n, quantile)
    if k == 0:
        empty = ops.zeros_like(values[:, :0], dtype=prepared.dtype)
        low = prepared.layout.restore_reduced(empty, 0)
        masses = constant_masses([0.5, 0.5])
        return low, low, prepared.solve(masses, epsilon, solver, "soft_quantile_split")
    middle = n - 2 * k
    masses = [1.0 / n] * k + ([middle / n] if middle > 0 else []) + [1.0 / n] * k
    result = prepared.solve(constant_masses(masses), epsilon, solver, "soft_quantile_split")
    # Barycentric projection: target j's value is sum_i P_ij v_i / b_j = sum_i pi_ij v_i here.
    gathered = result.membership_weighted_sums(values)
    low = prepared.layout.restore_reduced(gathered[:, :k], k)
    high = prepared.layout.restore_reduced(gathered[:, -k:], k)
    return low, high, result
