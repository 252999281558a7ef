"""`SoftTopK`: the soft top-k mask as a Keras layer."""

from __future__ import annotations

import math
import numbers

import keras

from keras_softquantile import ops
from keras_softquantile.layers import _base

__all__ = ["SoftTopK"]


def _check_k(k) -> int | float:
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise TypeError(
            f"`k` must be a count (int >= 1) or a fraction (float in (0, 1)). Received: k={k!r}"
        )
    if isinstance(k, numbers.Integral):
        if k < 1:
            raise ValueError(f"`k` must be a count >= 1 or a fraction in (0, 1). Received: k={k!r}")
        return int(k)
    if not math.isfinite(float(k)) or float(k) <= 0:
        raise ValueError(f"`k` must be a count >= 1 or a fraction in (0, 1). Received: k={k!r}")
    return float(k)


@keras.saving.register_keras_serializable(package="keras_softquantile")
class SoftTopK(_base.SoftLayer):
    """Soft mask of the `k` largest scores along an axis.

    A differentiable stand-in for the 0/1 indicator of `top_k(scores, k)`: values in [0, 1]
    that sum to exactly `k` along `axis`, largest for the largest scores, converging to the
    hard mask as `epsilon -> 0` (see `keras_softquantile.ops.soft_topk_mask`). `k` is a count
    (an int >= 1, or a float >= 1 for a fractional count), or a fraction of the entries (a
    float in (0, 1)), resolved at call time against the number of unmasked entries of each
    row. Padding marked by a Keras mask gets zero and does not count; the output keeps the mask.

    >>> layer = keras_softquantile.layers.SoftTopK(k=2, epsilon=1e-3)
    >>> keras.ops.round(layer(np.array([[0.3, -1.2, 2.0, 0.1, 1.1]], "float32")))
    <tf.Tensor: shape=(1, 5), dtype=float32, numpy=array([[0., 0., 1., 0., 1.]], dtype=float32)>

    Args:
        k: entries to select per row: an int >= 1 (or float >= 1) count, or a float in
            (0, 1) giving the fraction of (unmasked) entries.
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
        A soft mask with the shape of `inputs`, in the layer's compute dtype.
    """

    def __init__(
        self,
        k: int | float,
        epsilon: float = 1e-2,
        trainable_epsilon: bool = False,
        axis: int = -1,
        solver: str = "auto",
        **kwargs,
    ):
        k = _check_k(k)
        super().__init__(
            epsilon=epsilon,
            trainable_epsilon=trainable_epsilon,
            axis=axis,
            solver=solver,
            **kwargs,
        )
        self.k = k

    @property
    def is_fraction(self) -> bool:
        """Whether `k` is a fraction of the entries rather than a count."""
        return isinstance(self.k, float) and self.k < 1

    def build(self, input_shape: tuple | list) -> None:
        axis = _base.normalize_axis(self.axis, input_shape, "SoftTopK")
        n = input_shape[axis]
        if not self.is_fraction and n is not None and self.k > n:
            raise ValueError(
                f"`k` must not exceed the length of the selection axis ({n}). Received: k={self.k}"
            )
        self._build_epsilon()

    def call(self, inputs, mask=None):
        _base.check_float_input(inputs, "SoftTopK")
        op_mask = _base.scores_mask(mask, inputs, "SoftTopK")
        epsilon = self.get_epsilon()
        if self.is_fraction:
            # Two buckets at level 1 - k: the top one holds a fraction k of each row's valid
            # entries (the op soft_topk_mask is this very transport with a count instead).
            buckets = ops.soft_quantile_masks(
                inputs,
                (1.0 - self.k,),
                epsilon=epsilon,
                axis=self.axis,
                mask=op_mask,
                solver=self.solver,
            )
            return buckets[..., 1]
        return ops.soft_topk_mask(
            inputs, self.k, epsilon=epsilon, axis=self.axis, mask=op_mask, solver=self.solver
        )

    def compute_mask(self, inputs, mask=None):
        return mask

    def compute_output_shape(self, input_shape: tuple | list) -> tuple:
        return tuple(input_shape)

    def compute_output_spec(self, inputs, mask=None):
        _base.check_float_input(inputs, "SoftTopK")
        return super().compute_output_spec(inputs, mask=mask)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"k": self.k, **self._epsilon_config()})
        return config
