"""Moving the selection axis last and flattening leading dimensions into rows, and back."""

from __future__ import annotations

import numbers

import keras
from keras import ops

from keras_softquantile.ops import _backend, _guards, _validation, transport
from keras_softquantile.ops.squashing import larger, squash_scores

__all__: list[str] = []


def _dims(x) -> tuple:
    """The shape of `x` as a tuple: static ints, or, where a dimension is only known at run
    time, what `ops.shape` gives (scalar tensors inside TensorFlow graphs, symbolic dimensions
    while Keras infers a JAX layer's output shape)."""
    static = tuple(x.shape)
    if all(isinstance(d, numbers.Integral) for d in static):
        return tuple(int(d) for d in static)
    return tuple(ops.shape(x))


class Rows:
    """A tensor seen as `[rows, n]` along `axis`, with the inverse reshape.

    Args:
        x: the tensor (already a validated float tensor).
        axis: the normalised axis to work along.
    """

    def __init__(self, x, axis: int):
        self.rank = len(x.shape)
        self.axis = axis
        self.perm = [d for d in range(self.rank) if d != axis] + [axis]
        moved = ops.transpose(x, self.perm) if axis != self.rank - 1 else x
        self.moved_shape = _dims(moved)
        self.n = moved.shape[-1]
        self.rows = ops.reshape(moved, (-1, self.moved_shape[-1]))

    def flatten(self, y):
        """Another tensor of the same shape, as `[rows, n]`."""
        moved = ops.transpose(y, self.perm) if self.axis != self.rank - 1 else y
        return ops.reshape(moved, (-1, _dims(moved)[-1]))

    def leading(self) -> tuple:
        return self.moved_shape[:-1]

    def restore(self, y):
        """`[rows, n]` -> the original layout."""
        y = ops.reshape(y, self.moved_shape)
        return self._move_back(y, trailing=0)

    def restore_with_trailing(self, y, trailing: int):
        """`[rows, n, m]` -> `scores.shape + (m,)`."""
        y = ops.reshape(y, (*self.moved_shape, trailing))
        return self._move_back(y, trailing=1)

    def restore_reduced(self, y, width: int | None = None):
        """`[rows]` -> leading shape, or `[rows, k]` -> leading shape with `axis` of length k."""
        if width is None:
            return ops.reshape(y, self.leading())
        y = ops.reshape(y, (*self.leading(), width))
        return self._move_back(y, trailing=0)

    def _move_back(self, y, trailing: int):
        if self.axis == self.rank - 1:
            return y
        inverse = [0] * self.rank
        for position, dim in enumerate(self.perm):
            inverse[dim] = position
        return ops.transpose(y, inverse + list(range(self.rank, self.rank + trailing)))


# Squashing, as one XLA cluster inside TensorFlow graphs (like the solver's stages).
_squash = _backend.compiled_stage(lambda x, valid: squash_scores(x, mask=valid))


class Prepared:
    """Validated scores as rows: squashed `z`, source weights `a`, dtypes, layout, and the
    checks that decide whether a row's result may be returned (see `solve`)."""

    def __init__(self, scores, axis: int, mask, name: str = "scores"):
        scores = _validation.float_tensor(scores, name)
        self.input_dtype = keras.backend.standardize_dtype(scores.dtype)
        self.dtype = _validation.compute_dtype(self.input_dtype)
        self.axis = _validation.normalize_axis(axis, len(scores.shape))
        scores = _validation.check_axis_length(scores, self.axis, name)
        self.scores = scores
        mask = _validation.check_mask(mask, scores)
        x = ops.cast(scores, self.dtype)
        self.layout = Rows(x, self.axis)
        self.n = self.layout.n
        valid = None if mask is None else self.layout.flatten(mask)
        x_rows = _validation.assert_finite_scores(self.layout.rows, valid, name)
        self.valid = ops.ones_like(x_rows, dtype="bool") if valid is None else valid
        self.masked = mask is not None
        valid_float = ops.cast(self.valid, self.dtype)
        self.count = ops.sum(valid_float, axis=-1, keepdims=True)
        self.weights = valid_float / larger(self.count, ops.ones_like(self.count))
        self.z = _squash(x_rows, self.valid)
        # Rows whose result may be returned: finite valid scores, and (below) matching shapes,
        # a usable epsilon and a converged solver. Others raise, or are NaN where nothing can
        # raise (XLA, `jax.jit`).
        self.ok = ops.all(
            ops.logical_or(ops.isfinite(x_rows), ops.logical_not(self.valid)), axis=-1
        )

    def values(self, values, name: str = "values", own_precision: bool = False):
        """Validates a float tensor of the scores' shape and returns it as rows.

        The rows are in the scores' compute dtype, or with `own_precision` in the values' own
        compute dtype (float64 values ordered by float32 scores stay float64).
        """
        values = _validation.float_tensor(values, name)
        values, shapes_ok = _validation.check_same_shape(values, self.scores, name)
        self.ok = ops.logical_and(self.ok, shapes_ok)
        dtype = _validation.compute_dtype(values.dtype) if own_precision else self.dtype
        return self.layout.flatten(ops.cast(values, dtype))

    def solve(self, masses, epsilon, solver: str, op: str) -> transport.TransportResult:
        """The transport of the rows onto targets with `masses` (`[m]` or `[rows, m]`).

        Raises eagerly (a graph assertion inside `tf.function`) unless every row converged;
        under XLA and `jax.jit`, where nothing can raise, the memberships of a row are NaN
        unless its scores were finite, its shapes matched, epsilon was usable and its solver
        converged.
        """
        eps = _validation.check_epsilon(epsilon, self.dtype)
        solver = _validation.check_solver(solver)
        if masses.shape[-1] == 1:  # a single target (sorting one entry): nothing to solve
            rows = _dims(self.z)[0]
            result = transport.TransportResult(
                ops.expand_dims(ops.ones_like(self.z), -1),
                ops.zeros((rows, 0), self.dtype),
                ops.zeros((rows,), "int32"),
                ops.zeros((rows,), self.dtype),
                ops.ones((rows,), "bool"),
            )
        else:
            result = transport.solve_transport(self.z, self.weights, masses, eps, solver=solver)
        converged = _guards.check_converged(result, eps, op)
        self.ok = ops.logical_and(
            ops.logical_and(self.ok, converged), _validation.epsilon_ok(eps, self.dtype)
        )
        return result._replace(memberships=self.poison(result.memberships))

    def poison(self, rows):
        """`[rows, ...]` with NaN in the rows whose result may not be returned."""
        return _guards.poison_rows(rows, self.ok)

    def output(self, y):
        return ops.cast(y, self.input_dtype)


def constant_masses(masses):
    """Target masses known in Python, as a `[m]` tensor: float64 where the backend has it
    (JAX needs `jax_enable_x64`), float32 otherwise."""
    dtype = "float64" if _backend.float64_available() else "float32"
    return ops.convert_to_tensor([float(m) for m in masses], dtype=dtype)
