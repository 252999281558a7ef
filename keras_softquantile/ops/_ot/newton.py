"""Safeguarded Newton on the bucket boundaries: the loop, and `solve_newton`."""

from __future__ import annotations

import keras
from keras import ops

from keras_softquantile.ops import _backend
from keras_softquantile.ops._ot import kernels
from keras_softquantile.ops._ot.implicit import anchored, finish
from keras_softquantile.ops._ot.problem import (
    Tensor,
    TransportProblem,
    TransportResult,
    make_problem,
    problem_shape,
    reduce_max,
    reduce_min,
)
from keras_softquantile.ops._ot.warm_start import (
    bisection_boundaries,
    bisection_rounds,
    quantile_boundaries,
)


def newton_loop(
    problem: TransportProblem, anchor: Tensor, t: Tensor, max_iterations: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Safeguarded Newton iterations from boundaries `anchor + t`; returns (t, r, K,
    iterations), no gradient. `problem` is constant (see `TransportProblem.constant`)."""
    eps, tolerance = problem.epsilon, problem.tolerance
    cap = 0.25 + 4 * eps
    r, k = kernels.residual_and_covariance(problem, anchor, t)

    def error(res):
        return reduce_max(ops.abs(res), axis=-1)

    def finished(res, step_size):
        e = error(res)
        return (e <= tolerance) | ~ops.isfinite(e) | (step_size < 2.0**-10)

    step_size = ops.ones_like(problem.z[:, 0])
    iterations = ops.zeros_like(problem.z[:, 0], dtype="int32")
    done = finished(r, step_size)

    def condition(i, t, r, k, step_size, iterations, done):
        return (i < max_iterations) & ops.any(~done)

    def body(i, t, r, k, step_size, iterations, done):
        trial = t + step_size[:, None] * kernels.newton_direction(k, r, eps, cap, problem.m)
        r_trial, k_trial = kernels.residual_and_covariance(problem, anchor, trial)
        norm = ops.sum(ops.square(r), axis=-1)
        norm_trial = ops.sum(ops.square(r_trial), axis=-1)
        accept = ~done & ((norm_trial < norm) | (error(r_trial) <= tolerance))
        t = ops.where(accept[:, None], trial, t)
        r = ops.where(accept[:, None], r_trial, r)
        k = ops.where(accept[:, None, None], k_trial, k)
        step_size = ops.where(
            accept, ops.ones_like(step_size), ops.where(done, step_size, step_size / 2)
        )
        iterations += ops.cast(~done, "int32")
        done = done | finished(r, step_size)
        return i + 1, t, r, k, step_size, iterations, done

    start = (ops.convert_to_tensor(0, dtype="int32"), t, r, k, step_size, iterations, done)
    _, t, r, k, _, iterations, _ = ops.while_loop(
        condition, body, start, maximum_iterations=max_iterations
    )
    return t, r, k, iterations


# Inside traced TensorFlow graphs these stages run as XLA clusters (see `_backend`).
_run_bisection = _backend.compiled_stage(bisection_boundaries)
_run_newton_loop = _backend.compiled_stage(newton_loop, transport_shape=problem_shape)


def solve_newton(
    z: Tensor,
    weights: Tensor,
    target_masses: Tensor,
    epsilon: float | Tensor,
    *,
    max_iterations: int = 50,
    tolerance: float | None = None,
    warm_start: Tensor | None = None,
    sample_size: int | None = None,
) -> TransportResult:
    """Solves the transport by safeguarded Newton on the bucket boundaries.

    Fast for few targets (each step costs O(n m^2) and one `(m - 1) x (m - 1)` solve, in
    closed form for m <= 3). Typically converges in 1 to 5 steps from its warm start, the
    limit solution for well separated entries (`bisection_boundaries` for m <= 3 on rows
    longer than 256, `quantile_boundaries` on the sorted rows otherwise); each row stops on
    its own.

    Args:
        z: `[rows, n]` squashed scores in [0, 1] (see `squash_scores`).
        weights: `[rows, n]` non-negative source weights summing to one, zero for padding.
        target_masses: `[m]` or `[rows, m]` positive target masses summing to one.
        epsilon: positive scalar, the transition width in squashed units.
        max_iterations: cap on Newton steps (each step is one pass over the data).
        tolerance: stop when every cumulative marginal is within this fraction of the total
            mass; defaults to `default_tolerance(dtype)`: 2.5e-13 in float64, 1e-6 otherwise.
        warm_start: optional `[rows, m - 1]` initial boundaries.
        sample_size: entries per row sorted for the warm start (a strided subsample, which
            starts Newton from interpolated quantiles instead of the limit solution); None
            (the default) sorts whole rows.

    Returns:
        A `TransportResult`.
    """
    problem = make_problem(z, weights, target_masses, epsilon, tolerance)
    fixed = problem.constant()
    with keras.name_scope("solve_newton"):
        zs, as_, cs, es, m = fixed.z, fixed.weights, fixed.above_target, fixed.epsilon, fixed.m
        n = zs.shape[-1]
        if warm_start is not None:
            t0 = ops.cast(warm_start, problem.dtype)
        elif m <= 3 and (n is None or n > 256):
            # Few boundaries on long rows: exact-count bisection beats sorting (256 x 1e3 rows:
            # 1.5x of a hard sort against 4x with the sorted warm start, measured
            # interleaved). Short rows sort cheaply.
            width = reduce_max(zs, -1) - reduce_min(zs, -1)
            t0 = _run_bisection(zs, as_, cs, bisection_rounds(es, width), es)
        else:
            t0 = quantile_boundaries(zs, as_, cs, sample_size, epsilon=es)
        anchor, t = anchored(ops.stop_gradient(t0))
        t, r, k, iterations = _run_newton_loop(fixed, anchor, t, max_iterations)
        return finish(problem, anchor, t, r, k, iterations)
