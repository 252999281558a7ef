"""Moving the selection axis last and flattening leading dimensions into rows, and back."""

from __future__ import annotations

import tensorflow as tf

from keras_softquantile.ops import _validation, transport
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
    """Validated scores as rows: squashed `z`, source weights `a`, dtypes and layout."""

    def __init__(self, scores, axis: int, mask, name: str = "scores"):
        scores = _validation.float_tensor(scores, name)
        self.scores = scores
        self.input_dtype = scores.dtype
        self.dtype = _validation.compute_dtype(scores.dtype)
        self.axis = _validation.normalize_axis(axis, scores.shape.rank)
        mask = _validation.check_mask(mask, scores)
        x = tf.cast(scores, self.dtype)
        self.layout = Rows(x, self.axis)
        self.n = self.layout.n
        x_rows = self.layout.rows
        valid = None if mask is None else self.layout.flatten(mask)
        _validation.assert_finite_scores(x_rows, valid, name)
        self.valid = tf.ones_like(x_rows, tf.bool) if valid is None else valid
        self.masked = mask is not None
        valid_float = tf.cast(self.valid, self.dtype)
        self.count = tf.reduce_sum(valid_float, axis=-1, keepdims=True)
        self.weights = valid_float / tf.maximum(self.count, 1)
        self.z = _squash(x_rows, self.valid)

    def values(self, values, name: str = "values", own_precision: bool = False) -> tf.Tensor:
        """Validates a float tensor of the scores' shape and returns it as rows.

        The rows are in the scores' compute dtype, or with `own_precision` in the values' own
        compute dtype (float64 values ordered by float32 scores stay float64).
        """
        values = _validation.float_tensor(values, name)
        _validation.check_same_shape(values, self.scores, name)
        dtype = _validation.compute_dtype(values.dtype) if own_precision else self.dtype
        return self.layout.flatten(tf.cast(values, dtype))

    def output(self, y: tf.Tensor) -> tf.Tensor:
        return tf.cast(y, self.input_dtype)
