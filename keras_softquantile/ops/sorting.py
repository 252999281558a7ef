"""Soft sorting, ranking and quantiles by entropic optimal transport onto ordered targets."""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_softquantile.ops import _backend, _validation
from keras_softquantile.ops._layout import Prepared, constant_masses
from keras_softquantile.ops._ot.problem import Tensor
from keras_softquantile.ops._validation import DEFAULT_EPSILON
from keras_softquantile.ops.squashing import larger

__all__ = ["soft_quantile", "soft_rank", "soft_sort", "soft_sort_with"]


def _sorting_masses(prepared: Prepared, n: int):
    """The n targets' masses: `1 / n` each, or with a mask `[rows, n]`, `1 / v` for the first
    v targets of a row with v valid entries and 0 for the rest.

    Zero-mass targets stay empty, so the valid entries are sorted onto the first v targets
    exactly as the row without its padding would be (the targets' spacing does not enter the
    memberships; see `transport`).
    """
    if not prepared.masked:
        return constant_masses([1.0 / n] * n)
    dtype = "float64" if _backend.float64_available() else prepared.dtype
    count = ops.cast(prepared.count, dtype)  # [rows, 1]
    filled = ops.cast(ops.arange(n, dtype=dtype)[None, :] < count, dtype)
    # An all-padding row has nothing to place (the solver zeroes its targets), but its masses
    # must still have a positive total to be normalised.
    return ops.where(count > 0, filled / larger(count, ops.ones_like(count)), 1.0 / n)


def _solve_sorting(prepared: Prepared, epsilon, solver, op: str):
    n = _validation.static_length(prepared.layout.rows, -1, op, minimum=1)
    return n, prepared.solve(_sorting_masses(prepared, n), epsilon, solver, op)


def _sorted_rows(values, prepared: Prepared, epsilon, solver, descending: bool, op: str):
    """`[rows, n]`: the soft reordering of `values` (rows), zero past each row's valid count."""
    n, result = _solve_sorting(prepared, epsilon, solver, op)
    # Padding may hold anything (NaN included): it must not reach the sums, even times zero.
    values = ops.where(prepared.valid, values, ops.zeros_like(values))
    # Target j's barycentre: sum_i P_ij v_i / b_j = sum_i pi_ij v_i since a_i = b_j (= 1/v).
    ordered = result.membership_weighted_sums(values)
    if not descending:
        return ordered
    if not prepared.masked:
        return ops.flip(ordered, axis=-1)
    # Reverse each row's first v positions; positions past v stay zero.
    slots = ops.arange(n, dtype="int32")[None, :]
    count = ops.cast(prepared.count, "int32")
    index = ops.where(slots < count, count - 1 - slots, slots)
    return ops.take_along_axis(ordered, index, axis=-1)


def soft_sort(
    x: Tensor,
    *,
    epsilon: float | Tensor = DEFAULT_EPSILON,
    axis: int = -1,
    descending: bool = False,
    mask: Tensor | None = None,
    solver: str = "auto",
    name: str | None = None,
):
    """Soft sort of `x` along `axis`.

    The soft counterpart of `keras.ops.sort(x, axis)` (reversed if `descending`): output
    position j is the transport-weighted average of the entries assigned to the j-th of n
    ordered targets. As
    `epsilon -> 0` it converges to the hard sort; for `epsilon > 0` it is smooth in `x`, its
    entries are convex combinations of `x` that preserve `sum(x)` exactly, and it is
    equivariant to positive rescaling (`soft_sort(c * x) = c * soft_sort(x)`, `c > 0`).
    `epsilon` is in quantile-level units: choose it below `1 / n` for a nearly hard sort.

    With a `mask`, a row with v valid entries gives in its first v positions exactly (to
    rounding) what the row without its padding gives, and zeros after them; padded entries
    get zero gradient, even if they hold NaN.

    It solves an n x n transport (Sinkhorn, polished by Newton steps), so time and memory grow
    as n^2: meant for rows of up to a few thousand entries.

    Bad arguments raise `ValueError` or `TypeError`; non-finite valid scores and a solver that
    did not converge raise when the values can be read (inside `tf.function`, an
    `InvalidArgumentError`). Under `jax.jit` and XLA, where errors cannot be raised, rows that
    break a promise come out NaN.

    >>> x = np.array([3.0, 1.0, 2.0], "float32")
    >>> np.round(keras.ops.convert_to_numpy(keras_softquantile.ops.soft_sort(x, epsilon=1e-3)), 4)
    array([1., 2., 3.], dtype=float32)

    Args:
        x: float tensor with a static length along `axis`.
        epsilon: positive float or scalar tensor; smaller is sharper.
        axis: the axis to sort along.
        descending: sort from largest to smallest.
        mask: optional boolean tensor like `x`, True for valid entries; the sorted valid
            entries fill the first positions of each row, and the rest are 0.
        solver: "auto", "newton" or "sinkhorn".
        name: optional name scope.

    Returns:
        A tensor like `x`.
    """
    with keras.name_scope(name or "soft_sort"):
        prepared = Prepared(x, axis, mask, name="x")
        rows = prepared.layout.rows
        ordered = _sorted_rows(rows, prepared, epsilon, solver, descending, "soft_sort")
        return prepared.output(prepared.layout.restore(ordered))


def soft_sort_with(
    values: Tensor,
    scores: Tensor,
    *,
    epsilon: float | Tensor = DEFAULT_EPSILON,
    axis: int = -1,
    descending: bool = False,
    mask: Tensor | None = None,
    solver: str = "auto",
    name: str | None = None,
):
    """Soft reordering of `values` by ascending `scores`.

    The soft counterpart of
    `keras.ops.take_along_axis(values, keras.ops.argsort(scores, axis), axis)`: output
    position j averages the values of the entries whose scores the transport assigns to the
    j-th ordered target. Converges to the hard reordering as `epsilon -> 0` with
    distinct scores. `soft_sort(x)` is `soft_sort_with(x, x)`. A `mask` works as in
    `soft_sort`.

    Bad arguments raise `ValueError` or `TypeError`; non-finite valid scores and a solver that
    did not converge raise when the values can be read (inside `tf.function`, an
    `InvalidArgumentError`). Under `jax.jit` and XLA, where errors cannot be raised, rows that
    break a promise (mismatched shapes included) come out NaN.

    Args:
        values: float tensor like `scores`.
        scores: float tensor with a static length along `axis`.
        epsilon: positive float or scalar tensor; smaller is sharper.
        axis: the axis to sort along.
        descending: order by descending score.
        mask: optional boolean tensor like `scores`, True for valid entries (see `soft_sort`).
        solver: "auto", "newton" or "sinkhorn".
        name: optional name scope.

    Returns:
        A tensor like `values`.
    """
    with keras.name_scope(name or "soft_sort_with"):
        prepared = Prepared(scores, axis, mask)
        rows = prepared.values(values, own_precision=True)
        ordered = _sorted_rows(rows, prepared, epsilon, solver, descending, "soft_sort_with")
        dtype = keras.backend.standardize_dtype(ops.convert_to_tensor(values).dtype)
        return ops.cast(prepared.layout.restore(ordered), dtype)


def soft_rank(
    x: Tensor,
    *,
    epsilon: float | Tensor = DEFAULT_EPSILON,
    axis: int = -1,
    descending: bool = False,
    mask: Tensor | None = None,
    solver: str = "auto",
    name: str | None = None,
):
    """Soft ranks of `x` along `axis`, in [0, n - 1].

    The soft counterpart of `keras.ops.argsort(keras.ops.argsort(x, axis), axis)` (0 for the
    smallest entry): entry i's rank is the expected target position under the transport plan.
    Ranks always sum to `n (n - 1) / 2`, are invariant to shifting and positively rescaling `x`,
    and converge to the hard ranks as `epsilon -> 0` with distinct entries (ties share the
    average rank).

    With a `mask`, the valid entries of a row with v of them get exactly (to rounding) the
    ranks in [0, v - 1] that the row without its padding gives; padded entries get rank 0
    and zero gradient, even if they hold NaN.

    Bad arguments raise `ValueError` or `TypeError`; non-finite valid scores and a solver that
    did not converge raise when the values can be read (inside `tf.function`, an
    `InvalidArgumentError`). Under `jax.jit` and XLA, where errors cannot be raised, rows that
    break a promise come out NaN.

    >>> x = np.array([3.0, 1.0, 2.0], "float32")
    >>> np.round(keras.ops.convert_to_numpy(keras_softquantile.ops.soft_rank(x, epsilon=1e-3)), 4)
    array([2., 0., 1.], dtype=float32)
    >>> x = np.array([3.0, 1.0, np.nan], "float32")
    >>> ranks = keras_softquantile.ops.soft_rank(x, epsilon=1e-3, mask=np.array([1, 1, 0], bool))
    >>> np.round(keras.ops.convert_to_numpy(ranks), 4)
    array([1., 0., 0.], dtype=float32)

    Args:
        x: float tensor with a static length along `axis`.
        epsilon: positive float or scalar tensor; smaller is sharper.
        axis: the axis to rank along.
        descending: rank 0 for the largest entry.
        mask: optional boolean tensor like `x`, True for valid entries; padded entries get
            rank 0.
        solver: "auto", "newton" or "sinkhorn".
        name: optional name scope.

    Returns:
        A tensor like `x`.
    """
    with keras.name_scope(name or "soft_rank"):
        prepared = Prepared(x, axis, mask, name="x")
        n, result = _solve_sorting(prepared, epsilon, solver, "soft_rank")
        positions = ops.arange(n, dtype=prepared.dtype)
        ranks = ops.einsum("rnj,j->rn", result.memberships, positions)
        if descending:
            # Padded entries (zero memberships) keep rank 0.
            ranks = ops.where(prepared.valid, (prepared.count - 1) - ranks, ranks)
        return prepared.output(prepared.layout.restore(ranks))


def _order_statistic_buckets(n: int, levels: tuple[float, ...]):
    """Buckets isolating the order statistics that numpy's linear quantile interpolates.

    Returns the bucket masses, and for each level the (bucket, weight) pairs to combine.
    """
    needed = set()
    plans = []
    for q in levels:
        position = q * (n - 1)
        lower = min(math.floor(position), n - 1)
        fraction = position - lower
        upper = min(lower + 1, n - 1)
        needed.update((lower, upper))
        plans.append((lower, upper, fraction))
    singles = sorted(needed)
    sizes, bucket_of = [], {}
    start = 0
    for position in singles:
        if position > start:
            sizes.append(position - start)
        bucket_of[position] = len(sizes)
        sizes.append(1)
        start = position + 1
    if start < n:
        sizes.append(n - start)
    masses = [s / n for s in sizes]
    combos = [((bucket_of[lo], 1 - f), (bucket_of[hi], f)) for lo, hi, f in plans]
    return masses, combos


def soft_quantile(
    x: Tensor,
    q,
    *,
    epsilon: float | Tensor = DEFAULT_EPSILON,
    axis: int = -1,
    solver: str = "auto",
    name: str | None = None,
):
    """Soft quantiles of `x` along `axis`.

    The soft counterpart of `numpy.quantile(x, q, axis)` with its default linear
    interpolation: the two order statistics that the hard quantile interpolates are each
    isolated as a one-entry target of a small transport (a handful of targets, solved by
    Newton in O(n)), and interpolated with the same weights. Converges to the hard quantile as
    `epsilon -> 0` with distinct entries, and is equivariant to shifts and positive rescaling.

    Bad arguments raise `ValueError` or `TypeError`; non-finite valid scores and a solver that
    did not converge raise when the values can be read (inside `tf.function`, an
    `InvalidArgumentError`). Under `jax.jit` and XLA, where errors cannot be raised, rows that
    break a promise come out NaN.

    >>> x = np.array([4.0, 1.0, 3.0, 2.0], "float32")
    >>> round(float(keras_softquantile.ops.soft_quantile(x, 0.5, epsilon=1e-3)), 4)
    2.5

    Args:
        x: float tensor with a static length along `axis`.
        q: a level or a list of levels in [0, 1].
        epsilon: positive float or scalar tensor; smaller is sharper.
        axis: the axis to take quantiles along.
        solver: "auto", "newton" or "sinkhorn".
        name: optional name scope.

    Returns:
        For a scalar `q`, `x` reduced along `axis`; for a list, `x` with `axis` replaced by
        one entry per level.
    """
    levels, scalar = _validation.check_probabilities(q)
    with keras.name_scope(name or "soft_quantile"):
        prepared = Prepared(x, axis, None, name="x")
        n = _validation.static_length(prepared.layout.rows, -1, "soft_quantile", minimum=1)
        masses, combos = _order_statistic_buckets(n, levels)
        result = prepared.solve(constant_masses(masses), epsilon, solver, "soft_quantile")
        # A one-entry bucket's barycentre is sum_i pi_ij x_i (its mass is 1/n = a_i).
        barycentres = result.membership_weighted_sums(prepared.layout.rows)
        # lo + f (hi - lo), exact for equal order statistics; as (1 - f) lo + f hi where their
        # signs differ, so that hi - lo cannot overflow.
        columns = []
        for (b_lo, w_lo), (b_hi, w_hi) in combos:
            lower, upper = barycentres[:, b_lo], barycentres[:, b_hi]
            same_sign = ops.equal(lower >= 0, upper >= 0)
            columns.append(
                ops.where(same_sign, lower + w_hi * (upper - lower), w_lo * lower + w_hi * upper)
            )
        if scalar:
            return prepared.output(prepared.layout.restore_reduced(columns[0]))
        stacked = ops.stack(columns, axis=-1)
        return prepared.output(prepared.layout.restore_reduced(stacked, len(levels)))
