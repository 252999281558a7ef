"""Log-domain Sinkhorn on the column potentials, polished by Newton steps: `solve_sinkhorn`."""

from __future__ import annotations

import keras
from keras import ops

from keras_softquantile.ops._ot.implicit import anchored, finish
from keras_softquantile.ops._ot.newton import newton_loop
from keras_softquantile.ops._ot.problem import (
    Tensor,
    TransportResult,
    cumsum,
    make_problem,
    maximum,
    reduce_max,
)
from keras_softquantile.ops._ot.warm_start import quantile_boundaries


def solve_sinkhorn(
    z: Tensor,
    weights: Tensor,
    target_masses: Tensor,
    epsilon: float | Tensor,
    *,
    max_iterations: int = 1000,
    tolerance: float | None = None,
    newton_steps: int = 20,
) -> TransportResult:
    """Solves the transport by log-domain Sinkhorn, then polishes with Newton steps.

    Each iteration costs O(n m) (one log-sum-exp over targets, one over items). Sinkhorn is
    warm-started at the limit boundaries (one sort per row), iterated until the
    column marginals are within `max(tolerance, 1e-2 * sqrt(tolerance))`, and finished with up
    to `newton_steps` safeguarded Newton steps, which reach `tolerance` quadratically.

    Args:
        z: `[rows, n]` squashed scores in [0, 1] (see `squash_scores`).
        weights: `[rows, n]` non-negative source weights summing to one, zero for padding.
        target_masses: `[m]` or `[rows, m]` positive target masses summing to one.
        epsilon: positive scalar, the transition width in squashed units.
        max_iterations: cap on Sinkhorn iterations.
        tolerance: final marginal tolerance, as in `solve_newton`.
        newton_steps: Newton polishing steps after Sinkhorn (0 disables them).

    Returns:
        A `TransportResult`; `iterations` counts Sinkhorn iterations plus Newton steps.
    """
    problem = make_problem(z, weights, target_masses, epsilon, tolerance)
    fixed = problem.constant()
    m, dtype = problem.m, problem.dtype
    loose = max(problem.tolerance, 1e-2 * problem.tolerance**0.5)
    with keras.name_scope("solve_sinkhorn"):
        zs, as_, bs, es = fixed.z, fixed.weights, fixed.target_masses, fixed.epsilon
        cs = fixed.above_target
        t0 = quantile_boundaries(zs, as_, cs, epsilon=es)
        # Column potentials h_j = -T_j.
        h0 = -ops.concatenate([ops.zeros_like(t0[:, :1]), cumsum(t0, axis=-1)], axis=-1)
        slots = ops.arange(m, dtype=dtype)
        wide = dtype == "float64"
        very_negative = -1e30 if wide else -1e20
        smallest = 1e-300 if wide else 1e-30
        log_a = ops.where(as_ > 0, ops.log(maximum(as_, smallest)), very_negative)
        log_b = ops.where(bs > 0, ops.log(maximum(bs, smallest)), very_negative)

        def column_log_mass(h):
            logits = (zs[:, :, None] * slots + h[:, None, :]) / es
            log_pi = logits - ops.logsumexp(logits, axis=-1, keepdims=True)
            return ops.logsumexp(log_a[:, :, None] + log_pi, axis=1)

        def condition(i, h, iterations, done):
            return (i < max_iterations) & ops.any(~done)

        def body(i, h, iterations, done):
            log_mass = column_log_mass(h)
            err = reduce_max(ops.abs(ops.exp(log_mass) - bs), axis=-1)
            done = done | (err <= loose) | ~ops.isfinite(err)
            update = ops.where(bs > 0, es * (log_b - log_mass), ops.zeros_like(h))
            h = ops.where(done[:, None], h, h + update)
            h = h - h[:, :1]
            iterations += ops.cast(~done, "int32")
            return i + 1, h, iterations, done

        start = (
            ops.convert_to_tensor(0, dtype="int32"),
            h0,
            ops.zeros_like(zs[:, 0], dtype="int32"),
            ops.zeros_like(zs[:, 0], dtype="bool"),
        )
        _, h, iterations, _ = ops.while_loop(
            condition, body, start, maximum_iterations=max_iterations
        )
        t = h[:, :-1] - h[:, 1:]
        anchor, t = anchored(t)
        t, r, k, newton_iterations = newton_loop(fixed, anchor, t, newton_steps)
        return finish(problem, anchor, t, r, k, iterations + newton_iterations)
