"""`SoftQuantileSplit`: the soft lower/upper quantile selection as a Keras layer."""

from __future__ import annotations

import math

import keras

from keras_softquantile import ops
from keras_softquantile.layers import _base
from keras_softquantile.ops import _validation

__all__ = ["SoftQuantileSplit"]


@keras.saving.register_keras_serializable(package="keras_softquantile")
class SoftQuantileSplit(_base.SoftLayer):
    """Soft selection of the values whose scores fall in the lower and upper quantile.

    Called on `[values, scores]`, it returns `(low, high)` exactly as
    `keras_softquantile.ops.soft_quantile_split`: with `output="weights"` the two soft
    membership masks (like `scores`), with `output="mean"` the membership-weighted means of
    `values` over each bucket (`scores` without `axis`), with `output="sorted"` the selected
    values ordered by ascending score (`axis` of length `floor(quantile * n)`; needs a static
    `n` and no mask). A Keras mask on either input marks padding; the "weights" outputs keep
    it, the reductions drop it.

    >>> layer = keras_softquantile.layers.SoftQuantileSplit(0.25, epsilon=1e-3, output="mean")
    >>> values = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]], "float32")
    >>> low, high = layer([values, -values])  # scores: the values reversed
    >>> high  # the mean of the values with the two highest scores, 1 and 2
    <tf.Tensor: shape=(1,), dtype=float32, numpy=array([1.5], dtype=float32)>

    Args:
        quantile: the level q in (0, 0.5]; 0.25 selects the lower and upper quartiles.
        epsilon: positive float, the initial smoothing; smaller is sharper. Held in a weight
            (`epsilon_variable`) that `set_epsilon` can anneal during training.
        output: "weights", "mean" or "sorted" (stored as `output_mode`: `layer.output` is
            Keras's symbolic output tensor).
        trainable_epsilon: learn epsilon: `epsilon_variable` then holds a trainable
            log(epsilon), so epsilon stays positive.
        axis: the axis along which scores compete.
        solver: "auto", "newton" or "sinkhorn".
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: a list `[values, scores]` of float tensors of the same shape, rank >= 2.
        mask: optional list of two boolean Keras masks (or None), prefixes of the inputs'
            shape; their conjunction marks the valid entries.

    Returns:
        The pair `(low, high)`, in the compute dtype.
    """

    def __init__(
        self,
        quantile: float = 0.25,
        epsilon: float = 1e-2,
        output: str = "weights",
        trainable_epsilon: bool = False,
        axis: int = -1,
        solver: str = "auto",
        **kwargs,
    ):
        quantile = _validation.check_split_quantile(quantile)
        _validation.check_split_output(output)
        super().__init__(
            epsilon=epsilon,
            trainable_epsilon=trainable_epsilon,
            axis=axis,
            solver=solver,
            **kwargs,
        )
        self.quantile = quantile
        # `Layer.output` is Keras's symbolic output (used by functional models), so the output
        # mode is kept as `output_mode`; `get_config` still lists it as `output`.
        self.output_mode = output

    @staticmethod
    def _split_shapes(input_shape) -> tuple[tuple, tuple]:
        if not isinstance(input_shape, list | tuple) or len(input_shape) != 2:
            raise ValueError(
                "`SoftQuantileSplit` must be called on a list `[values, scores]` of two "
                f"tensors. Received: input_shape={input_shape}"
            )
        values_shape, scores_shape = input_shape
        if not isinstance(values_shape, list | tuple) or not isinstance(scores_shape, list | tuple):
            raise ValueError(
                "`SoftQuantileSplit` must be called on a list `[values, scores]` of two "
                f"tensors. Received: input_shape={input_shape}"
            )
        return tuple(values_shape), tuple(scores_shape)

    def build(self, input_shape: tuple | list) -> None:
        values_shape, scores_shape = self._split_shapes(input_shape)
        _base.normalize_axis(self.axis, scores_shape, "SoftQuantileSplit", "scores")
        compatible = len(values_shape) == len(scores_shape) and all(
            a is None or b is None or a == b
            for a, b in zip(values_shape, scores_shape, strict=True)
        )
        if not compatible:
            raise ValueError(
                "`SoftQuantileSplit` needs `values` and `scores` of the same shape. "
                f"Received: values.shape={values_shape}, scores.shape={scores_shape}"
            )
        if self.output_mode == "sorted":
            _base.static_axis_length(self.axis, scores_shape, "SoftQuantileSplit", "scores")
        self._build_epsilon()

    def call(self, inputs, mask=None):
        values, scores = inputs
        _base.check_float_input(values, "SoftQuantileSplit", "values")
        _base.check_float_input(scores, "SoftQuantileSplit", "scores")
        op_mask = None
        if mask is not None:
            values_mask, scores_mask = mask
            op_mask = _base.merge_masks(
                _base.scores_mask(values_mask, scores, "SoftQuantileSplit"),
                _base.scores_mask(scores_mask, scores, "SoftQuantileSplit"),
            )
        if op_mask is not None and self.output_mode == "sorted":
            raise ValueError(
                "`SoftQuantileSplit(output='sorted')` cannot exclude padded entries: its output "
                "length floor(quantile * n) must be the same for every row. Received: a mask"
            )
        return ops.soft_quantile_split(
            values,
            scores,
            self.quantile,
            epsilon=self.get_epsilon(),
            axis=self.axis,
            mask=op_mask,
            output=self.output_mode,
            solver=self.solver,
        )

    def compute_mask(self, inputs, mask=None):
        if mask is None or self.output_mode != "weights":
            return None
        values_mask, scores_mask = mask
        merged = _base.merge_masks(values_mask, scores_mask)
        return (merged, merged)

    def compute_output_shape(self, input_shape: tuple | list) -> tuple[tuple, tuple]:
        _, scores_shape = self._split_shapes(input_shape)
        axis = _base.normalize_axis(self.axis, scores_shape, "SoftQuantileSplit", "scores")
        shape = list(scores_shape)
        if self.output_mode == "mean":
            del shape[axis]
        elif self.output_mode == "sorted":
            n = shape[axis]
            shape[axis] = None if n is None else math.floor(self.quantile * n + 1e-9)
        return tuple(shape), tuple(shape)

    def compute_output_spec(self, inputs, mask=None):
        values, scores = inputs
        _base.check_float_input(values, "SoftQuantileSplit", "values")
        _base.check_float_input(scores, "SoftQuantileSplit", "scores")
        return super().compute_output_spec(inputs, mask=mask)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {"quantile": self.quantile, "output": self.output_mode, **self._epsilon_config()}
        )
        return config
