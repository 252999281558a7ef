"""One pass over the data: memberships, residual, and the covariance K at given boundaries.

Boundaries are always held as `anchor + t` (see `scaled_offsets`); the low-level kernels take
`(z, anchor, t, inv_eps, m)` in that order, the solver-level ones a `TransportProblem`.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_softquantile.ops import _backend
from keras_softquantile.ops._ot.problem import (
    Tensor,
    TransportProblem,
    cumsum,
    maximum,
    minimum,
    reduce_max,
    ridge,
    sum_above,
)


def shifted_logits(u: list[Tensor]) -> list[Tensor]:
    """The logits `L_j = u_0 + ... + u_{j-1}` of m <= 3 buckets, minus their maximum.

    Formed so that no large logit is subtracted from another: entries far above a boundary
    have `|u| ~ 1 / epsilon` (7e4 at epsilon 1e-5), where a float32 `L_2 - L_1` would lose the
    order-one part that sets their split across the next boundary.
    """
    if len(u) == 1:
        positive = maximum(u[0], ops.zeros_like(u[0]))
        return [-positive, u[0] - positive]
    u0, u1 = u
    rise = maximum(u1, ops.zeros_like(u1))
    top = u0 + rise  # the largest logit where >= 0, else 0 is
    positive = top >= 0
    return [
        ops.where(positive, -top, ops.zeros_like(top)),
        ops.where(positive, -rise, u0),
        ops.where(positive, u1 - rise, u0 + u1),
    ]


def softmax_columns(logits: list[Tensor]) -> list[Tensor]:
    """Softmax over m <= 3 columns of shifted logits (one of them zero): m exps, 1 division;
    every column computed directly, so small memberships keep full relative precision (down
    to the smallest normal number: subnormal ones are flushed to zero on every backend)."""
    exps = [_backend.flushed_exp(x) for x in logits]
    inverse = 1 / sum(exps[1:], exps[0])
    return [e * inverse for e in exps]


def scaled_offsets(z: Tensor, anchor: Tensor, t: Tensor, inv_eps: Tensor, m: int) -> list[Tensor]:
    """`u_j = (z - (anchor_j + t_j)) / epsilon` for each of the m - 1 boundaries, `[rows, n]`.

    Boundaries are held as a constant anchor (the warm start) plus a small offset `t`, and
    `z - anchor` is formed first: exact for the entries near the boundary (they are close to
    the anchor), so a boundary is resolved far below the spacing of floating-point numbers
    around it. Written as `z - (anchor + t)`, a float32 boundary near 0.5 could only move in
    steps of 6e-8, which at epsilon 1e-5 sets a tied group's membership to within 0.6%.
    """
    return [((z - anchor[:, j : j + 1]) - t[:, j : j + 1]) * inv_eps for j in range(m - 1)]


def membership_columns(
    z: Tensor, anchor: Tensor, t: Tensor, inv_eps: Tensor, m: int
) -> list[Tensor]:
    """`pi` as m columns `[rows, n]` for m <= 3 (elementwise; nothing `[rows, n, m]`)."""
    return softmax_columns(shifted_logits(scaled_offsets(z, anchor, t, inv_eps, m)))


def memberships(z: Tensor, anchor: Tensor, t: Tensor, inv_eps: Tensor, m: int) -> Tensor:
    """`pi` `[rows, n, m]` at boundaries `anchor + t` `[rows, m - 1]`."""
    if m <= 3:
        return ops.stack(membership_columns(z, anchor, t, inv_eps, m), axis=-1)
    return ops.softmax(logits(z, anchor, t, inv_eps, m), axis=-1)


def logits(z: Tensor, anchor: Tensor, t: Tensor, inv_eps: Tensor, m: int) -> Tensor:
    """`[rows, n, m]` logits `L_j - L_h`, relative to each entry's home bucket `h` (the number
    of boundaries below it).

    `L_j - L_h` sums the `u_l` between `h` and `j` (see `scaled_offsets`), which all have
    one sign, instead of differencing running sums over every boundary: those reach `m /
    epsilon` and would drown the order-one terms that set an entry's split between the
    buckets next to it.
    """
    u = ((z[:, :, None] - anchor[:, None, :]) - t[:, None, :]) * inv_eps
    home = ops.sum(ops.cast(u > 0, "int32"), axis=-1, keepdims=True)
    index = ops.arange(m - 1, dtype="int32")
    zeros = ops.zeros_like(u)
    above = cumsum(ops.where(index >= home, u, zeros), axis=-1)
    # The running sum from the top boundary down (reverse cumulative sum).
    below = ops.flip(cumsum(ops.flip(ops.where(index < home, u, zeros), -1), -1), -1)
    edge = ops.zeros_like(u[:, :, :1])
    return ops.concatenate([edge, above], axis=-1) - ops.concatenate([below, edge], axis=-1)


def above(pi: Tensor) -> Tensor:
    """`U` `[rows, n, m - 1]`: probability of lying above each boundary."""
    return sum_above(pi)


def residual_and_covariance(
    problem: TransportProblem, anchor: Tensor, t: Tensor, with_covariance: bool = True
) -> tuple[Tensor, Tensor | None]:
    """`r` `[rows, m - 1]` and `K` `[rows, m - 1, m - 1]` at boundaries `anchor + t`."""
    z, a, above_target, m = problem.z, problem.weights, problem.above_target, problem.m
    inv_eps = 1 / problem.epsilon
    total = _backend.accurate_sum
    if m == 2:
        low, high = membership_columns(z, anchor, t, inv_eps, m)
        r = total(a * high, axis=-1, keepdims=True) - above_target
        if not with_covariance:
            return r, None
        k = total(a * high * low, axis=-1, keepdims=True)
        return r, k[:, :, None]
    if m == 3:
        low, middle, high = membership_columns(z, anchor, t, inv_eps, m)
        mass0 = total(a * (middle + high), axis=-1)
        mass1 = total(a * high, axis=-1)
        r = ops.stack([mass0, mass1], axis=-1) - above_target
        if not with_covariance:
            return r, None
        # Cov(1[>j], 1[>l]) = U_max (1 - U_min), with 1 - U formed from the lower columns.
        k00 = total(a * (middle + high) * low, axis=-1)
        k11 = total(a * high * (low + middle), axis=-1)
        k01 = total(a * high * low, axis=-1)
        k = ops.stack([ops.stack([k00, k01], -1), ops.stack([k01, k11], -1)], -2)
        return r, k
    pi = memberships(z, anchor, t, inv_eps, m)
    upper = above(pi)
    if keras.backend.standardize_dtype(upper.dtype) == "float64":
        mass = ops.einsum("rn,rnj->rj", a, upper)
    else:
        # Solved in float32 only where float64 is unavailable (JAX without jax_enable_x64):
        # a float32 einsum over 1000 entries misses the masses by ~5e-6, above the tolerance.
        mass = total(a[:, :, None] * upper, axis=1)
    r = mass - above_target
    if not with_covariance:
        return r, None
    # Cov(1[>j], 1[>l]) = U_l (1 - U_j) for j <= l, summed with weights a; 1 - U_j is formed
    # from the memberships below (U_l - U_j U_l would cancel to noise, even negative, where
    # U is near 0 or 1).
    lower = cumsum(pi, axis=-1)[..., :-1]
    products = ops.einsum("rn,rnj,rnl->rjl", a, lower, upper)
    index = ops.arange(m - 1, dtype="int32")
    k = ops.where(index[:, None] <= index[None, :], products, ops.transpose(products, (0, 2, 1)))
    return r, k


def solve_covariance(k: Tensor, v: Tensor, size: int) -> Tensor:
    """`(K + ridge I)^-1 v` for `K` `[rows, s, s]` and `v` `[rows, s]`, `s = size` (static:
    the number of boundaries, `m - 1`, which traced shapes may have relaxed to unknown).

    K is solved after a symmetric diagonal (Jacobi) scaling: its entries can underflow far
    below 1e-30 when no item sits near a boundary, and the scaled matrix has a unit diagonal
    and a determinant bounded away from zero by a tiny relative ridge.
    """
    small = ridge(v.dtype)
    if size == 1:
        return v / (k[:, :, 0] + small)
    relative = 1e-12 if keras.backend.standardize_dtype(v.dtype) == "float64" else 1e-6
    diagonal = ops.diagonal(k, axis1=-2, axis2=-1) + small
    scale = ops.rsqrt(diagonal)
    scaled_v = v * scale
    # (K + ridge I) scaled to a unit diagonal; off-diagonals stay below one in magnitude.
    if size == 2:
        a01 = k[:, 0, 1] * scale[:, 0] * scale[:, 1]
        det = (1 + relative) ** 2 - a01 * a01
        solved = (
            ops.stack(
                [
                    (1 + relative) * scaled_v[:, 0] - a01 * scaled_v[:, 1],
                    (1 + relative) * scaled_v[:, 1] - a01 * scaled_v[:, 0],
                ],
                axis=-1,
            )
            / det[:, None]
        )
    else:
        scaled_k = k * scale[:, :, None] * scale[:, None, :]
        index = ops.arange(size, dtype="int32")
        unit = ops.ones_like(scaled_k) * (1 + relative)
        scaled_k = ops.where(index[:, None] == index[None, :], unit, scaled_k)
        solved = ops.solve(scaled_k, scaled_v[:, :, None])[:, :, 0]
    return solved * scale


def trust_factor(step: Tensor, cap: Tensor) -> Tensor:
    """`[rows, 1]` factor in [0, 1] that keeps every boundary move within `cap`."""
    largest = reduce_max(ops.abs(step), axis=-1, keepdims=True)
    tiny = ridge(step.dtype)
    shrink = minimum(cap / maximum(largest, tiny), ops.ones_like(largest))
    return ops.where(ops.isfinite(shrink), shrink, ops.zeros_like(shrink))


def newton_direction(k: Tensor, r: Tensor, eps: Tensor, cap: Tensor, m: int) -> Tensor:
    """`epsilon K^-1 r`, scaled down so that no boundary moves by more than `cap`."""
    step = eps * solve_covariance(k, r, m - 1)
    return step * trust_factor(step, cap)
