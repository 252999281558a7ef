"""Float limits and exact power-of-two row scaling, shared by the squashing and the solver."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

__all__: list[str] = []


def finfo(dtype: str):
    """`finfo` of a float dtype (a string), bfloat16 included."""
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.finfo(ml_dtypes.bfloat16)
    return np.finfo(dtype)


def largest(dtype: str) -> float:
    """The largest finite value of a float dtype (a string), as a Python float."""
    return float(finfo(dtype).max)


# Rows whose largest magnitude exceeds the dtype's largest value / 2**HEADROOM_BITS are scaled
# down by 2**-HEADROOM_BITS; rows below 1 are scaled up.
HEADROOM_BITS = 8


def row_scale(rows, valid=None):
    """`[rows, 1]`: per row, a power of two that makes the row safe to compute with.

    A row whose largest valid magnitude is below 1 gets the power of two that brings that
    magnitude into [2, 4): the differences between its tiny scores are then not subnormal
    (the CPU kernels of TensorFlow and XLA flush subnormal numbers to zero, so `[0, 2.2e-308]`
    in float64 would look constant). A row within `2**HEADROOM_BITS` of the dtype's largest
    value gets `2**-HEADROOM_BITS`: midpoints, deviations and sums of a few of its entries
    then cannot overflow (XLA rewrites `x / 2 + y / 2` as `(x + y) / 2`, so halving is no
    protection). Every other row, and one whose magnitude is zero, subnormal or not finite,
    gets 1.

    Multiplying by it is exact, except that entries below 256 times the dtype's smallest
    normal number become zero in a row scaled down. Held constant for gradients. The powers
    of two come from a table of normal numbers rather than `2 ** p`, so that every backend
    and compiler gives them exactly; `floor(log2)` may be off by one, which only moves a
    lifted row's magnitude within [1, 8).
    """
    dtype = keras.backend.standardize_dtype(rows.dtype)
    info = finfo(dtype)
    magnitude = ops.abs(rows)
    if valid is not None:
        magnitude = ops.where(valid, magnitude, ops.zeros_like(magnitude))
    # `initial`: Keras refuses to reduce an empty tensor (an empty batch).
    magnitude = ops.max(magnitude, axis=-1, keepdims=True, initial=0.0)
    magnitude = ops.stop_gradient(magnitude)
    small = ops.logical_and(magnitude >= float(info.tiny), magnitude < 1.0)
    crowded = ops.logical_and(
        magnitude > float(info.max) * 2.0**-HEADROOM_BITS, magnitude <= float(info.max)
    )
    exponent = ops.floor(ops.log2(ops.where(small, magnitude, ops.ones_like(magnitude))))
    # 2**(1 - exponent), from the normal powers 2**0 ... 2**(1 - minexp).
    powers = np.ldexp(1.0, np.arange(0, 2 - int(info.minexp)))
    index = ops.clip(ops.cast(1 - exponent, "int32"), 0, len(powers) - 1)
    lift = ops.take(ops.convert_to_tensor(powers, dtype), index)
    shrink = ops.full_like(magnitude, 2.0**-HEADROOM_BITS)
    return ops.where(small, lift, ops.where(crowded, shrink, ops.ones_like(magnitude)))
