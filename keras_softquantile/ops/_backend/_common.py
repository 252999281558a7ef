"""Pieces shared by the backend modules (no backend imports here)."""

from __future__ import annotations

import collections
import threading

from keras import ops

SECOND_ORDER_MESSAGE = (
    "Second-order gradients (gradients of gradients, Hessian-vector products) through the "
    "soft selection and sorting ops of keras_softquantile are not supported: their implicit "
    "backward pass is exact for first derivatives only."
)


# How many compiled functions each op keeps (least recently used first out). Each distinct
# input shape or static argument compiles one; without a bound, a process that meets many
# shapes (ragged batches, a sweep over n) keeps every compilation alive.
COMPILED_CACHE_SIZE = 32


class CompiledCache:
    """A thread-safe least-recently-used map from a signature to its compiled function.

    `get(key, build)` returns the entry for `key`, calling `build()` to make it when missing,
    and drops the least recently used entry beyond `capacity` (a graph that already called
    a dropped function keeps its own reference to it).
    """

    def __init__(self, capacity: int = COMPILED_CACHE_SIZE):
        if capacity < 1:
            raise ValueError(f"`capacity` must be at least 1, got {capacity!r}.")
        self.capacity = capacity
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key, build):
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        value = build()
        with self._lock:
            value = self._entries.setdefault(key, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return value


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
