"""`SoftQuantiles`: soft quantiles as a Keras layer."""

from __future__ import annotations

import keras

from keras_softquantile import ops
from keras_softquantile.layers import _base
from keras_softquantile.ops import _validation

__all__ = ["SoftQuantiles"]


@keras.saving.register_keras_serializable(package="keras_softquantile")
class SoftQuantiles(_base.SoftLayer):
    """Soft quantiles of the inputs along an axis.

    The differentiable counterpart of `numpy.quantile(x, quantiles, axis)` with linear
    interpolation (see `keras_softquantile.ops.soft_quantile`), converging to it as
    `epsilon -> 0`. A single level removes `axis`; a list of levels replaces it by one entry
    per level. The length of `axis` must be static. The op has no notion of padding: a Keras
    mask is accepted only if it is all True (checked at run time: a `ValueError` eagerly;
    inside a traced function, an `InvalidArgumentError` under `tf.function` and NaN in the
    rows with padding under XLA or `jax.jit`), and the output (a reduction) carries no mask.

    >>> layer = keras_softquantile.layers.SoftQuantiles([0.5, 1.0], epsilon=1e-3)
    >>> layer(np.array([[4.0, 1.0, 3.0, 2.0]], "float32"))
    <tf.Tensor: shape=(1, 2), dtype=float32, numpy=array([[2.5, 4. ]], dtype=float32)>

    Args:
        quantiles: a level, or a list of levels, in [0, 1].
        epsilon: positive float, the initial smoothing; smaller is sharper. Held in a weight
            (`epsilon_variable`) that `set_epsilon` can anneal during training.
        trainable_epsilon: learn epsilon: `epsilon_variable` then holds a trainable
            log(epsilon), so epsilon stays positive.
        axis: the axis to take quantiles along (static length).
        solver: "auto", "newton" or "sinkhorn".
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: float tensor of rank >= 2.
        mask: optional boolean Keras mask; must be all True (see above).

    Returns:
        For a single level, `inputs` reduced along `axis`; for a list, `inputs` with `axis`
        replaced by one entry per level. In the compute dtype.
    """

    def __init__(
        self,
        quantiles: float | list[float] = 0.5,
        epsilon: float = 1e-2,
        trainable_epsilon: bool = False,
        axis: int = -1,
        solver: str = "auto",
        **kwargs,
    ):
        levels, scalar = _validation.check_probabilities(quantiles, name="quantiles")
        super().__init__(
            epsilon=epsilon,
            trainable_epsilon=trainable_epsilon,
            axis=axis,
            solver=solver,
            **kwargs,
        )
        self.quantiles = levels[0] if scalar else list(levels)

    def build(self, input_shape: tuple | list) -> None:
        _base.static_axis_length(self.axis, input_shape, "SoftQuantiles")
        self._build_epsilon()

    def call(self, inputs, mask=None):
        _base.check_float_input(inputs, "SoftQuantiles")
        # XLA and jax.jit cannot raise: rows holding padding then come out NaN.
        rows_ok = _base.check_no_padding(mask, inputs, self.axis, "SoftQuantiles")
        output = ops.soft_quantile(
            inputs,
            self.quantiles,
            epsilon=self.get_epsilon(),
            axis=self.axis,
            solver=self.solver,
        )
        return _base.nan_where_padded(
            output, rows_ok, self.axis, reduced=not isinstance(self.quantiles, list)
        )

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape: tuple | list) -> tuple:
        axis = _base.normalize_axis(self.axis, input_shape, "SoftQuantiles")
        shape = list(input_shape)
        if isinstance(self.quantiles, list):
            shape[axis] = len(self.quantiles)
        else:
            del shape[axis]
        return tuple(shape)

    def compute_output_spec(self, inputs, mask=None):
        _base.check_float_input(inputs, "SoftQuantiles")
        return super().compute_output_spec(inputs, mask=mask)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"quantiles": self.quantiles, **self._epsilon_config()})
        return config
