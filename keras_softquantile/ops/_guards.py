"""Broken promises made loud: an error eagerly and in graphs, NaN in the row under XLA.

The ops promise exact bucket masses from finite scores. Where a row cannot keep that promise
(non-finite scores, an unusable epsilon, a solver that did not converge), the op raises
eagerly, fails a graph assertion inside `tf.function`, and, under XLA (which drops
assertions), returns NaN in that row only: never a plausible number.
"""

from __future__ import annotations

import tensorflow as tf

from keras_softquantile.ops import transport

__all__ = ["ConvergenceError"]


class ConvergenceError(RuntimeError):
    """The transport solver did not reach its tolerance on some rows.

    Raised eagerly by the soft ops instead of returning memberships whose bucket masses are
    not the promised ones; inside `tf.function` the same message comes as an
    `InvalidArgumentError`, and under XLA the rows concerned are NaN.
    """


def poison_rows(x: tf.Tensor, ok: tf.Tensor) -> tf.Tensor:
    """`x` `[rows, ...]` with NaN in the rows where `ok` `[rows]` is False."""
    ok = tf.reshape(ok, tf.concat([tf.shape(ok), tf.ones([x.shape.rank - 1], tf.int32)], 0))
    return tf.where(ok, x, tf.constant(float("nan"), x.dtype))


def check_converged(result: transport.TransportResult, epsilon: tf.Tensor, op: str) -> tf.Tensor:
    """Raises (eagerly) or asserts (in graphs) that every row converged; returns the `[rows]`
    flags for `poison_rows` under XLA."""
    converged = result.converged
    advice = (
        "The memberships would miss their bucket masses, so none are returned. A larger "
        "epsilon or float64 scores usually converge; please report the input otherwise."
    )
    if tf.executing_eagerly():
        failed = tf.logical_not(converged)
        if bool(tf.reduce_any(failed)):
            errors = tf.boolean_mask(result.marginal_error, failed)
            raise ConvergenceError(
                f"`{op}`: the transport solver did not converge on {int(tf.size(errors))} of "
                f"{int(tf.size(converged))} rows (largest marginal error "
                f"{float(tf.reduce_max(errors)):.3g} of the total mass, "
                f"epsilon={float(epsilon):.3g}). {advice}"
            )
    else:
        tf.debugging.Assert(
            tf.reduce_all(converged),
            [
                f"`{op}`: the transport solver did not converge. {advice} Largest marginal "
                "error (fraction of the total mass) and epsilon:",
                tf.reduce_max(result.marginal_error),
                epsilon,
            ],
        )
    return converged
