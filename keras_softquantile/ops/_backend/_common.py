"""Pieces shared by the backend modules (no backend imports here)."""

from __future__ import annotations

from keras import ops

SECOND_ORDER_MESSAGE = (
    "Second-order gradients (gradients of gradients, Hessian-vector products) through the "
    "soft selection and sorting ops of keras_softquantile are not supported: their implicit "
    "backward pass is exact for first derivatives only."
)


def blockwise_sum(x, axis: int, keepdims: bool = False, block: int = 1024):
    """Sum along `axis` in two levels (blocks of `block`, then the block sums).

    XLA's CPU reductions add sequentially: 1e6 float32 terms lose about 3e-5 of their total
    that way. Two levels bound the error by about `(block + n / block)` roundings instead of
    `n`. Used where float64 accumulation is unavailable (JAX without `jax_enable_x64`).
    """
    axis = axis % len(x.shape)
    n = x.shape[axis]
    if n is None or n <= block:
        return ops.sum(x, axis=axis, keepdims=keepdims)
    blocks = -(-n // block)
    moved = ops.moveaxis(x, axis, -1)
    padding = [(0, 0)] * (len(moved.shape) - 1) + [(0, blocks * block - n)]
    moved = ops.pad(moved, padding)
    parts = ops.reshape(moved, (*tuple(moved.shape[:-1]), blocks, block))
    total = ops.sum(ops.sum(parts, axis=-1), axis=-1)
    if keepdims:
        total = ops.expand_dims(total, axis)
    return total
