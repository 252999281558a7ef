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
# down by 2**-HEADROOM_BITS; rows below 1 are scaled up, and so are rows whose smallest nonzero
# magnitude lies within 2**(mantissa bits + HEADROOM_BITS) of the smallest normal number.
HEADROOM_BITS = 8


def _floor_log2(magnitude):
    """`floor(log2(magnitude))` of positive magnitudes (may be off by one: rounding of log2)."""
    return ops.floor(ops.log2(magnitude))


def row_scale(rows, valid=None):
    """`[rows, 1]`: per row, a power of two that makes the row safe to compute with.

    Lifting. A row is multiplied by the smallest power of two that brings its largest valid
    magnitude to at least 2, and its smallest nonzero valid magnitude to at least
    `2**(minexp + mantissa bits + HEADROOM_BITS)` (float64: about 1e-289, float32: about
    5e-29), as far as its largest magnitude can go without coming within
    `2**(HEADROOM_BITS + 2)` of the dtype's largest value. Then a nonzero difference of two of
    its entries, and half of one, is never subnormal: the CPU kernels of TensorFlow and XLA
    flush subnormal numbers to zero, so `[0, 2.2e-308]` in float64 would look constant, and
    `[0, ..., 0, 2.2e-308, 1, ..., 1]` would lose its (tiny) median absolute deviation.

    Shrinking. A row within `2**HEADROOM_BITS` of the dtype's largest value gets
    `2**-HEADROOM_BITS`: midpoints, deviations and sums of a few of its entries then cannot
    overflow (XLA rewrites `x / 2 + y / 2` as `(x + y) / 2`, so halving is no protection).

    Every other row, and one whose magnitudes are all zero, subnormal or not finite, gets 1.
    Multiplying by the scale is exact, except that entries below 256 times the dtype's
    smallest normal number become zero in a row scaled down. Held constant for gradients. The
    powers of two come from a table of normal numbers rather than `2 ** p`, so that every
    backend and compiler gives them exactly.
    """
    dtype = keras.backend.standardize_dtype(rows.dtype)
    info = finfo(dtype)
    magnitude = ops.stop_gradient(ops.abs(rows))
    usable = ops.logical_and(magnitude >= float(info.tiny), magnitude <= float(info.max))
    if valid is not None:
        usable = ops.logical_and(usable, valid)
    # `initial`: Keras refuses to reduce an empty tensor (an empty batch).
    zeros, infinities = ops.zeros_like(magnitude), ops.full_like(magnitude, float("inf"))
    largest_ = ops.max(ops.where(usable, magnitude, zeros), axis=-1, keepdims=True, initial=0.0)
    smallest = ops.min(
        ops.where(usable, magnitude, infinities), axis=-1, keepdims=True, initial=float("inf")
    )
    normal = largest_ > 0  # at least one usable entry (then `smallest` is finite too)
    ones = ops.ones_like(largest_)
    top = _floor_log2(ops.where(normal, largest_, ones))
    bottom = _floor_log2(ops.where(normal, smallest, ones))
    mantissa_bits = int(info.nmant) + 1
    floor_exponent = int(info.minexp) + mantissa_bits + HEADROOM_BITS
    ceiling_exponent = int(info.maxexp) - HEADROOM_BITS - 2
    wanted = ops.maximum(1.0 - top, floor_exponent - bottom)
    shift = ops.minimum(wanted, ceiling_exponent - top)
    powers = np.ldexp(1.0, np.arange(0, 2 - int(info.minexp)))  # 2**0 ... 2**(1 - minexp)
    index = ops.clip(ops.cast(shift, "int32"), 0, len(powers) - 1)
    lift = ops.take(ops.convert_to_tensor(powers, dtype), index)
    crowded = largest_ > float(info.max) * 2.0**-HEADROOM_BITS
    shrink = ops.full_like(largest_, 2.0**-HEADROOM_BITS)
    lifted = ops.logical_and(normal, shift > 0)
    return ops.where(crowded, shrink, ops.where(lifted, lift, ones))
