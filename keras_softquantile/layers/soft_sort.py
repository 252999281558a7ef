"""`SoftSort`: the soft sort as a Keras layer."""

from __future__ import annotations

import keras

from keras_softquantile import ops
from keras_softquantile.layers import _base

__all__ = ["SoftSort"]


@keras.saving.register_keras_serializable(package="keras_softquantile")
class SoftSort(_base.SoftLayer):
    """Soft sort of the inputs along an axis.

    The differentiable counterpart of `sort(x)` (ascending, or descending with
    `descending=True`); see `keras_softquantile.ops.soft_sort`. Each output entry is a convex
    combination of the inputs, the row sum is preserved exactly, and the output converges to
    the hard sort as `epsilon -> 0`. The length of `axis` must be static. The op has no notion
    of padding: a Keras mask is accepted only if it is all True (checked at run time: a
    `ValueError` eagerly; inside a traced function, an `InvalidArgumentError` under
    `tf.function` and NaN in the rows with padding under XLA or `jax.jit`), and the output
    (sorted positions, not entries) carries no mask.

    >>> layer = keras_softquantile.layers.SoftSort(epsilon=1e-3)
    >>> layer(np.array([[3.0, 1.0, 2.0]], "float32"))
    <tf.Tensor: shape=(1, 3), dtype=float32, numpy=array([[1., 2., 3.]], dtype=float32)>

    Args:
        epsilon: positive float, the initial smoothing; smaller is sharper. Held in a weight
            (`epsilon_variable`) that `set_epsilon` can anneal during training.
        trainable_epsilon: learn epsilon: `epsilon_variable` then holds a trainable
            log(epsilon), so epsilon stays positive.
        axis: the axis to sort along (static length).
        descending: sort from largest to smallest.
        solver: "auto", "newton" or "sinkhorn".
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: float tensor of rank >= 2.
        mask: optional boolean Keras mask; must be all True (see above).

    Returns:
        The sorted values, with the shape of `inputs`, in the compute dtype.
    """

    def __init__(
        self,
        epsilon: float = 1e-2,
        trainable_epsilon: bool = False,
        axis: int = -1,
        descending: bool = False,
        solver: str = "auto",
        **kwargs,
    ):
        super().__init__(
            epsilon=epsilon,
            trainable_epsilon=trainable_epsilon,
            axis=axis,
            solver=solver,
            **kwargs,
        )
        self.descending = _base.check_bool(descending, "descending")

    def build(self, input_shape: tuple | list) -> None:
        _base.static_axis_length(self.axis, input_shape, "SoftSort")
        self._build_epsilon()

    def call(self, inputs, mask=None):
        _base.check_float_input(inputs, "SoftSort")
        # XLA and jax.jit cannot raise: rows holding padding then come out NaN.
        rows_ok = _base.check_no_padding(mask, inputs, self.axis, "SoftSort")
        output = ops.soft_sort(
            inputs,
            epsilon=self.get_epsilon(),
            axis=self.axis,
            descending=self.descending,
            solver=self.solver,
        )
        return _base.nan_where_padded(output, rows_ok, self.axis)

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape: tuple | list) -> tuple:
        return tuple(input_shape)

    def compute_output_spec(self, inputs, mask=None):
        _base.check_float_input(inputs, "SoftSort")
        return super().compute_output_spec(inputs, mask=mask)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({**self._epsilon_config(), "descending": self.descending})
        return config
