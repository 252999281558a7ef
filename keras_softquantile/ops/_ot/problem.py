"""The transport problem (validated and renormalised in the solver's precision) and its result."""

from __future__ import annotations

import functools
import numbers
from typing import Any, NamedTuple

import keras
import numpy as np
from keras import ops

from keras_softquantile.ops import _numerics

Tensor = Any  # a tensor of the active Keras backend


class TransportResult(NamedTuple):
    """The solution of one batch of transport problems, with convergence diagnostics.

    Attributes:
        memberships: `[rows, n, m]`, `pi_ij = P_ij / a_i`: item `i`'s soft membership in
            target `j`. Rows sum to one for valid items and are zero for padding.
        boundaries: `[rows, m - 1]`, the soft bucket boundaries `t` in squashed units.
        iterations: `[rows]` int32, iterations the solver spent on each row.
        marginal_error: `[rows]`, `max_j |sum_i a_i pi_ij - b_j|` of the returned memberships,
            in units of the total mass (multiply by n for a count).
        converged: `[rows]` bool, whether `marginal_error` is within the solver tolerance.
    """

    memberships: Tensor
    boundaries: Tensor
    iterations: Tensor
    marginal_error: Tensor
    converged: Tensor

    def membership_weighted_sums(self, values: Tensor) -> Tensor:
        """`[rows, m]`: `sum_i pi_ij values_i` for `values` `[rows, n]`, in their dtype.

        Target `j`'s barycentre `sum_i a_i pi_ij values_i / b_j` wherever the source weights
        equal the target masses (`a_i = b_j`, e.g. `n` targets of mass `1 / n` for sorting, or
        the one-entry targets of an order statistic).
        """
        values = ops.convert_to_tensor(values)
        memberships = ops.cast(self.memberships, values.dtype)
        # A row near the dtype's largest value (or of tiny values) is scaled by a power of two
        # first, so that the sum cannot overflow (ten entries at float32's largest value).
        scale = _numerics.row_scale(values)
        sums = ops.einsum("rnj,rn->rj", memberships, values * scale) / scale
        # Scaling back can still round just past the largest value (a membership column sums
        # to one within the solver's tolerance): the row's extreme value then (NaN stays NaN).
        high = ops.max(values, axis=-1, keepdims=True, initial=-float("inf"))
        low = ops.min(values, axis=-1, keepdims=True, initial=float("inf"))
        return ops.where(ops.isinf(sums), ops.where(sums > 0, high, low), sums)


class TransportProblem(NamedTuple):
    """One batch of transport problems, in the solver's precision (see `make_problem`).

    Attributes:
        z: `[rows, n]` squashed scores.
        weights: `[rows, n]` source weights `a`, renormalised to sum to one (zero rows stay
            zero).
        target_masses: `[rows, m]` target masses `b`, renormalised to sum to one (zero on
            empty rows: nothing to place).
        above_target: `[rows, m - 1]` `c_j = sum_{k > j} b_k`, the mass above each boundary.
        epsilon: scalar tensor, the transition width.
        tolerance: the marginal tolerance (a Python float).
        m: the number of targets (a static Python int).
    """

    z: Tensor
    weights: Tensor
    target_masses: Tensor
    above_target: Tensor
    epsilon: Tensor
    tolerance: float
    m: int

    @property
    def dtype(self) -> str:
        return keras.backend.standardize_dtype(self.z.dtype)

    def constant(self) -> TransportProblem:
        """The same problem with every tensor under `stop_gradient` (for the solver loops)."""
        stop = ops.stop_gradient
        return self._replace(
            z=stop(self.z),
            weights=stop(self.weights),
            target_masses=stop(self.target_masses),
            above_target=stop(self.above_target),
            epsilon=stop(self.epsilon),
        )


def default_tolerance(dtype) -> float:
    """Marginal tolerance (fraction of total mass) used when none is given.

    A row counts as converged when every bucket holds its target mass to within twice this:
    in float64 5e-13 of the total (bucket counts within 1e-9 for rows of up to 2000 entries),
    in float32 2e-6 (bucket counts within 2e-6 n), above the rounding of float32 memberships.

    Args:
        dtype: the solver's dtype: a string ("float64") or any backend's or NumPy's dtype.
    """
    return 2.5e-13 if keras.backend.standardize_dtype(dtype) == "float64" else 1e-6


def ridge(dtype) -> float:
    # K is in units of the total mass (at most 1/4). Residuals below machine precision carry
    # no information, so K is regularised at that level: where no item sits near a boundary
    # (K underflows) a noise-level residual moves it by about epsilon, through empty space,
    # instead of by noise / 0. Directions with K far above this are untouched, so implicit
    # gradients stay exact wherever they are not exponentially small.
    return float(np.finfo(keras.backend.standardize_dtype(dtype)).eps)


# Keras 3.15 computes some float64 ops in float32 outside TensorFlow (its type promotion maps
# 64-bit dtypes to 32-bit ones where the backend is not TensorFlow): `ops.maximum`,
# `ops.minimum` and `ops.cumsum` on PyTorch, `ops.floor` and `ops.ceil` on PyTorch and JAX.
# The float64 solver would lose its precision there (a float32 cumulative sum of memberships
# is off by ~1e-8, far above the float64 tolerance), so the solver uses these instead.


def maximum(x: Tensor, y) -> Tensor:
    """Elementwise maximum in the dtype of `x` (NaN in `x` propagates)."""
    return ops.where(x < y, y, x)


def minimum(x: Tensor, y) -> Tensor:
    """Elementwise minimum in the dtype of `x` (NaN in `x` propagates)."""
    return ops.where(y < x, y, x)


@functools.cache
def _cumsum_keeps(dtype: str) -> bool:
    """Whether `ops.cumsum` returns `dtype` (not on PyTorch for float64, Keras 3.15)."""
    probe = ops.cumsum(ops.zeros((2,), dtype=dtype), axis=-1)
    return keras.backend.standardize_dtype(probe.dtype) == dtype


def problem_shape(problem: TransportProblem, *_) -> tuple[int | None, int]:
    """`(n, m)` of a solver stage whose first argument is `problem`: entries per row (None
    when known only at run time) and targets (see `_backend.compiled_stage`)."""
    return problem.z.shape[-1], problem.m


def cumsum(x: Tensor, axis: int = -1) -> Tensor:
    """`ops.cumsum` along `axis` (-1 only where it falls back), in the dtype of `x`.

    Where `ops.cumsum` would round (see above), the sums are formed by doubling shifts
    (`ceil(log2(length))` padded additions, each a pairwise sum, so the rounding error grows
    with the logarithm of the length instead of the length).
    """
    dtype = keras.backend.standardize_dtype(x.dtype)
    if _cumsum_keeps(dtype):
        return ops.cumsum(x, axis=axis)
    if axis not in (-1, len(x.shape) - 1):
        raise ValueError(f"`cumsum` falls back along the last axis only. Received: axis={axis}")
    length, shift = x.shape[-1], 1
    while shift < length:
        padding = [(0, 0)] * (len(x.shape) - 1) + [(shift, 0)]
        x = x + ops.pad(x[..., :-shift], padding)
        shift *= 2
    return x


def sum_above(x: Tensor) -> Tensor:
    """`[..., m]` -> `[..., m - 1]`: entry `l` is the sum of `x` over the targets above `l`
    (accumulated from the top target down)."""
    return ops.flip(cumsum(ops.flip(x, axis=-1), axis=-1), axis=-1)[..., 1:]


def _empty(x: Tensor) -> bool:
    return 0 in tuple(x.shape)


def reduce_max(x: Tensor, axis: int | None = None, keepdims: bool = False) -> Tensor:
    """`ops.max`, with `tf.reduce_max`'s -inf over nothing: Keras refuses the maximum of an
    empty tensor (an empty batch), eagerly on TensorFlow and always on PyTorch."""
    if _empty(x):
        return ops.full_like(ops.sum(x, axis=axis, keepdims=keepdims), -np.inf)
    return ops.max(x, axis=axis, keepdims=keepdims)


def reduce_min(x: Tensor, axis: int | None = None, keepdims: bool = False) -> Tensor:
    """`ops.min`, with `tf.reduce_min`'s +inf over nothing (see `reduce_max`)."""
    if _empty(x):
        return ops.full_like(ops.sum(x, axis=axis, keepdims=keepdims), np.inf)
    return ops.min(x, axis=axis, keepdims=keepdims)


def as_dtype(value, dtype: str) -> Tensor:
    """`value` as a tensor of `dtype`; Python and NumPy numbers are converted directly (not
    through float32, which would round a float64 epsilon)."""
    if isinstance(value, numbers.Real):
        return ops.convert_to_tensor(float(value), dtype=dtype)
    return ops.cast(value, dtype)


def _rank(x: Tensor) -> int | None:
    try:
        return len(x.shape)
    except ValueError:  # a TensorFlow tensor of unknown rank
        return None


def _shape(x: Tensor) -> tuple:
    return tuple(x.shape) if _rank(x) is not None else None


def _compatible(shape: tuple, other: tuple) -> bool:
    if shape is None or other is None:
        return True
    return len(shape) == len(other) and all(
        d is None or e is None or d == e for d, e in zip(shape, other, strict=True)
    )


def _check_problem(z, a, b):
    z = ops.convert_to_tensor(z)
    dtype = keras.backend.standardize_dtype(z.dtype)
    a = ops.cast(a, dtype)
    b = ops.cast(b, dtype)
    if _rank(z) != 2:
        raise ValueError(f"`z` must have shape [rows, n]. Received: z.shape={_shape(z)}")
    if not _compatible(_shape(a), _shape(z)):
        raise ValueError(
            f"`weights` must have the shape of `z`. Received: weights.shape={_shape(a)}, "
            f"z.shape={_shape(z)}"
        )
    if _rank(b) == 1:
        # Broadcast to [rows, m] (adding zeros is exact; the row count may be dynamic).
        b = ops.zeros_like(z[:, :1]) + b[None, :]
    if _rank(b) != 2 or b.shape[-1] is None or b.shape[-1] < 2:
        raise ValueError(
            "`target_masses` must have shape [m] or [rows, m] with a static m >= 2. "
            f"Received: target_masses.shape={_shape(b)}"
        )
    return z, a, b


def make_problem(z, weights, target_masses, epsilon, tolerance: float | None) -> TransportProblem:
    """Validates the inputs and renormalises them in the dtype of `z` (the solver's precision).

    Raises:
        ValueError: `z` is not `[rows, n]`, `weights` not of its shape, or `target_masses` not
            `[m]` / `[rows, m]` with a static `m >= 2`.
    """
    z, a, b = _check_problem(z, weights, target_masses)
    dtype = keras.backend.standardize_dtype(z.dtype)
    eps = as_dtype(epsilon, dtype)
    tol = default_tolerance(dtype) if tolerance is None else float(tolerance)
    # Renormalise in the solver's precision: weights and masses rounded to float32 elsewhere
    # disagree in their totals by ~1e-8, far above a float64 tolerance. Empty rows (all
    # padding) have nothing to place: their targets are zero.
    a_total = ops.sum(a, axis=-1, keepdims=True)
    nonempty = a_total > 0
    a = a / ops.where(nonempty, a_total, ops.ones_like(a_total))
    b = b / ops.sum(b, axis=-1, keepdims=True) * ops.cast(nonempty, dtype)
    return TransportProblem(z, a, b, sum_above(b), eps, tol, int(b.shape[-1]))
