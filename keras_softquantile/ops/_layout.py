"""Moving the selection axis last and flattening leading dimensions into rows, and back."""

from __future__ import annotations

import tensorflow as tf

from keras_softquantile.ops import _guards, _validation, transport
from keras_softquantile.ops.squashing import squash_scores

__all__: list[str] = []


class Rows:
    """A tensor seen as `[rows, n]` along `axis`, with the inverse reshape.

    Args:
        x: the tensor (already a validated float tensor).
        axis: the normalised axis to work along.
    """

    def __init__(self, x: tf.Tensor, axis: int):
        self.rank = x.shape.rank
        self.axis = axis
        self.perm = [d for d in range(self.rank) if d != axis] + [axis]
        moved = tf.transpose(x, self.perm) if axis != self.rank - 1 else x
        self.moved_shape = tf.shape(moved)
        self.static_moved_shape = moved.shape
        self.n = moved.shape[-1]
        self.rows = tf.reshape(moved, [-1, tf.shape(moved)[-1]])

    def flatten(self, y: tf.Tensor) -> tf.Tensor:
        """Another tensor of the same shape, as `[rows, n]`."""
        moved = tf.transpose(y, self.perm) if self.axis != self.rank - 1 else y
        return tf.reshape(moved, [-1, tf.shape(moved)[-1]])

    def leading(self) -> tf.Tensor:
        return self.moved_shape[:-1]

    def restore(self, y: tf.Tensor) -> tf.Tensor:
        """`[rows, n]` -> the original layout."""
        y = tf.reshape(y, self.moved_shape)
        y = tf.ensure_shape(y, self.static_moved_shape)
        return self._move_back(y, trailing=0)

    def restore_with_trailing(self, y: tf.Tensor, trailing: int) -> tf.Tensor:
        """`[rows, n, m]` -> `scores.shape + (m,)`."""
        shape = tf.concat([self.moved_shape, [trailing]], axis=0)
        y = tf.reshape(y, shape)
        y = tf.ensure_shape(y, self.static_moved_shape.concatenate([trailing]))
        return self._move_back(y, trailing=1)

    def restore_reduced(self, y: tf.Tensor, width: int | None = None) -> tf.Tensor:
        """`[rows]` -> leading shape, or `[rows, k]` -> leading shape with `axis` of length k."""
        if width is None:
            y = tf.reshape(y, self.leading())
            return tf.ensure_shape(y, self.static_moved_shape[:-1])
        shape = tf.concat([self.leading(), [width]], axis=0)
        y = tf.reshape(y, shape)
        y = tf.ensure_shape(y, self.static_moved_shape[:-1].concatenate([width]))
        return self._move_back(y, trailing=0)

    def _move_back(self, y: tf.Tensor, trailing: int) -> tf.Tensor:
        if self.axis == self.rank - 1:
            return y
        inverse = [0] * self.rank
        for position, dim in enumerate(self.perm):
            inverse[dim] = position
        return tf.transpose(y, inverse + list(range(self.rank, self.rank + trailing)))


# Squashing, as one XLA cluster inside traced graphs (like the solver's stages).
_squash = transport.compiled_in_graphs(lambda x, valid: squash_scores(x, mask=valid))


class Prepared:
    """Validated scores as rows: squashed `z`, source weights `a`, dtypes, layout, and the
    checks that decide whether a row's result may be returned (see `solve`)."""

    def __init__(self, scores, axis: int, mask, name: str = "scores"):
        scores = _validation.float_tensor(scores, name)
        self.input_dtype = scores.dtype
        self.dtype = _validation.compute_dtype(scores.dtype)
        self.axis = _validation.normalize_axis(axis, scores.shape.rank)
        scores = _validation.check_axis_length(scores, self.axis, name)
        self.scores = scores
        mask = _validation.check_mask(mask, scores)
        x = tf.cast(scores, self.dtype)
        self.layout = Rows(x, self.axis)
        self.n = self.layout.n
        valid = None if mask is None else self.layout.flatten(mask)
        x_rows = _validation.assert_finite_scores(self.layout.rows, valid, name)
        self.valid = tf.ones_like(x_rows, tf.bool) if valid is None else valid
        self.masked = mask is not None
        valid_float = tf.cast(self.valid, self.dtype)
        self.count = tf.reduce_sum(valid_float, axis=-1, keepdims=True)
        self.weights = valid_float / tf.maximum(self.count, 1)
        self.z = _squash(x_rows, self.valid)
        # Rows whose result may be returned: finite valid scores, and (below) matching shapes,
        # a usable epsilon and a converged solver. Others raise, or are NaN under XLA.
        self.ok = tf.reduce_all(tf.math.is_finite(x_rows) | ~self.valid, axis=-1)

    def values(self, values, name: str = "values", own_precision: bool = False) -> tf.Tensor:
        """Validates a float tensor of the scores' shape and returns it as rows.

        The rows are in the scores' compute dtype, or with `own_precision` in the values' own
        compute dtype (float64 values ordered by float32 scores stay float64).
        """
        values = _validation.float_tensor(values, name)
        values, shapes_ok = _validation.check_same_shape(values, self.scores, name)
        self.ok = self.ok & shapes_ok
        dtype = _validation.compute_dtype(values.dtype) if own_precision else self.dtype
        return self.layout.flatten(tf.cast(values, dtype))

    def solve(self, masses, epsilon, solver: str, op: str) -> transport.TransportResult:
        """The transport of the rows onto targets with `masses` (`[m]` or `[rows, m]`).

        Raises eagerly (a graph assertion inside `tf.function`) unless every row converged;
        under XLA, where nothing can raise, the memberships of a row are NaN unless its scores
        were finite, its shapes matched, epsilon was usable and its solver converged.
        """
        eps = _validation.check_epsilon(epsilon, self.dtype)
        solver = _validation.check_solver(solver)
        masses = tf.convert_to_tensor(masses)
        if masses.shape[-1] == 1:  # a single target (sorting one entry): nothing to solve
            rows = tf.shape(self.z)[0]
            result = transport.TransportResult(
                tf.ones_like(self.z)[:, :, None],
                tf.zeros([rows, 0], self.dtype),
                tf.zeros([rows], tf.int32),
                tf.zeros([rows], self.dtype),
                tf.ones([rows], tf.bool),
            )
        else:
            result = transport.solve_transport(self.z, self.weights, masses, eps, solver=solver)
        converged = _guards.check_converged(result, eps, op)
        self.ok = self.ok & converged & _validation.epsilon_ok(eps, self.dtype)
        return result._replace(memberships=self.poison(result.memberships))

    def poison(self, rows: tf.Tensor) -> tf.Tensor:
        """`[rows, ...]` with NaN in the rows whose result may not be returned."""
        return _guards.poison_rows(rows, self.ok)

    def output(self, y: tf.Tensor) -> tf.Tensor:
        return tf.cast(y, self.input_dtype)
