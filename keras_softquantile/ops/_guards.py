"""Broken promises made loud: an error eagerly and in graphs, NaN in the row under XLA/jax.jit.

The ops promise exact bucket masses from finite scores. Where a row cannot keep that promise
(non-finite scores, an unusable epsilon, a solver that did not converge), the op raises when
the values can be read (eager execution), fails a graph assertion inside `tf.function`, and,
under XLA and `jax.jit` (which cannot raise), returns NaN in that row only: never a plausible
number.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from keras import ops

from keras_softquantile.ops import _backend

if TYPE_CHECKING:  # the type only: importing the solvers here would be an import cycle
    from keras_softquantile.ops.transport import TransportResult

__all__ = ["ConvergenceError"]


class ConvergenceError(RuntimeError):
    """The transport solver did not reach its tolerance on some rows.

    Raised by the soft ops when the values can be read (eager execution) instead of returning
    memberships whose bucket masses are not the promised ones; inside `tf.function` the same
    message comes as an `InvalidArgumentError`, and under XLA and `jax.jit` the rows concerned
    are NaN.
    """


def poison_rows(x, ok):
    """`x` `[rows, ...]` with NaN in the rows where `ok` `[rows]` is False."""
    ok = ops.reshape(ok, (-1,) + (1,) * (len(x.shape) - 1))
    return ops.where(ok, x, ops.cast(float("nan"), x.dtype))


def check_converged(result: TransportResult, epsilon, op: str):
    """Raises `ConvergenceError` (values readable) or asserts (TensorFlow graphs) that every row
    converged; returns the `[rows]` flags for `poison_rows` (XLA, `jax.jit`)."""
    converged = result.converged
    advice = (
        "The memberships would miss their bucket masses, so none are returned. A larger "
        "epsilon or float64 scores usually converge; please report the input otherwise."
    )
    if _backend.values_available(converged, result.marginal_error, epsilon):
        flags = ops.convert_to_numpy(converged).astype(bool)
        if not flags.all():
            errors = ops.convert_to_numpy(result.marginal_error)[~flags]
            raise ConvergenceError(
                f"`{op}`: the transport solver did not converge on {int(errors.size)} of "
                f"{int(flags.size)} rows (largest marginal error "
                f"{float(errors.max()):.3g} of the total mass, "
                f"epsilon={float(ops.convert_to_numpy(epsilon)):.3g}). {advice}"
            )
        return converged
    assertions = _backend.assert_that(
        ops.all(converged),
        [
            f"`{op}`: the transport solver did not converge. {advice} Largest marginal "
            "error (fraction of the total mass) and epsilon:",
            ops.max(result.marginal_error, initial=0.0),
            epsilon,
        ],
    )
    return _backend.with_dependencies(converged, assertions)
