"""`SoftQuantileMasks`: soft quantile-bucket memberships as a Keras layer."""

from __future__ import annotations

import keras

from keras_softquantile import ops
from keras_softquantile.layers import _base

__all__ = ["SoftQuantileMasks"]


@keras.saving.register_keras_serializable(package="keras_softquantile")
class SoftQuantileMasks(_base.SoftLayer):
    """Soft membership of every score in the buckets cut at given quantile levels.

    The differentiable counterpart of bucketing each row of scores at its own empirical
    quantiles (see `keras_softquantile.ops.soft_quantile_masks`): bucket `j` (lowest first)
    holds exactly `n * (q_j - q_{j-1})` entries' worth of membership along `axis`, and each
    entry's memberships sum to one. Padding marked by a Keras mask gets zero membership and
    does not count in `n`; the output keeps the input mask.

    >>> layer = keras_softquantile.layers.SoftQuantileMasks((0.25, 0.75), epsilon=1e-3)
    >>> x = np.array([[0.3, -1.2, 2.0, 0.1, -0.4, 1.1, 0.8, -2.0]], "float32")
    >>> keras.ops.round(layer(x)[0, :, 2])  # upper quartile: the two largest scores
    <tf.Tensor: shape=(8,), dtype=float32, numpy=array([0., 0., 1., 0., 0., 1., 0., 0.], ...)>

    Args:
        quantiles: strictly increasing levels in (0, 1) cutting the buckets.
        epsilon: positive float, the initial smoothing; smaller is sharper. Held in a weight
            (`epsilon_variable`) that `set_epsilon` can anneal during training.
        trainable_epsilon: learn epsilon: `epsilon_variable` then holds a trainable
            log(epsilon), so epsilon stays positive.
        axis: the axis along which scores compete.
        solver: "auto", "newton" or "sinkhorn".
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: float scores of rank >= 2.
        mask: optional boolean Keras mask, a prefix of the shape of `inputs` (broadcast over
            the trailing axes); False entries are padding.

    Returns:
        Memberships of shape `inputs.shape + (len(quantiles) + 1,)`, in the compute dtype.
    """

    def __init__(
        self,
        quantiles: tuple[float, ...] | list[float] = (0.25, 0.75),
        epsilon: float = 1e-2,
        trainable_epsilon: bool = False,
        axis: int = -1,
        solver: str = "auto",
        **kwargs,
    ):
        quantiles = _base.check_quantiles(quantiles)
        super().__init__(
            epsilon=epsilon,
            trainable_epsilon=trainable_epsilon,
            axis=axis,
            solver=solver,
            **kwargs,
        )
        self.quantiles = quantiles

    def build(self, input_shape: tuple | list) -> None:
        _base.normalize_axis(self.axis, input_shape, "SoftQuantileMasks")
        self._build_epsilon()

    def call(self, inputs, mask=None):
        _base.check_float_input(inputs, "SoftQuantileMasks")
        return ops.soft_quantile_masks(
            inputs,
            tuple(self.quantiles),
            epsilon=self.get_epsilon(),
            axis=self.axis,
            mask=_base.scores_mask(mask, inputs, "SoftQuantileMasks"),
            solver=self.solver,
        )

    def compute_mask(self, inputs, mask=None):
        return mask

    def compute_output_shape(self, input_shape: tuple | list) -> tuple:
        return (*input_shape, len(self.quantiles) + 1)

    def compute_output_spec(self, inputs, mask=None):
        _base.check_float_input(inputs, "SoftQuantileMasks")
        return super().compute_output_spec(inputs, mask=mask)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"quantiles": list(self.quantiles), **self._epsilon_config()})
        return config
