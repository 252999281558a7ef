"""The PyTorch backend: eager, `torch.autograd.Function` for the implicit gradient."""

from __future__ import annotations

import torch

from keras_softquantile.ops._backend._common import SECOND_ORDER_MESSAGE


def values_available(*tensors) -> bool:
    """Whether values can be read now: always, except while `torch.compile` traces."""
    return not torch.compiler.is_compiling()


def assert_that(condition, data: list) -> list:
    return []


def with_dependencies(x, assertions: list):
    return x


def compiled_op(function):
    """`function` itself (PyTorch runs the ops eagerly)."""
    return function


def compiled_stage(function, transport_shape=None):
    """`function` itself, run eagerly (see the benchmarks for `torch.compile`);
    `transport_shape` is not needed here (see the TensorFlow backend)."""
    return function


class _FirstOrderOnly(torch.autograd.Function):
    """Identity whose derivative raises (recorded only under `create_graph=True`)."""

    @staticmethod
    def forward(ctx, value):
        return value.view_as(value)

    @staticmethod
    def backward(ctx, upstream):
        raise NotImplementedError(SECOND_ORDER_MESSAGE)


class _Custom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function, *inputs):
        outputs, backward = function(*inputs)
        ctx.backward_function = backward
        ctx.input_is_tensor = [isinstance(i, torch.Tensor) for i in inputs]
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *upstream):
        grads = ctx.backward_function(*upstream)
        out = []
        for grad, is_tensor in zip(grads, ctx.input_is_tensor, strict=True):
            if grad is None or not is_tensor:
                out.append(None)
            elif torch.is_grad_enabled():
                out.append(_FirstOrderOnly.apply(grad))
            else:
                out.append(grad)
        return (None, *out)


def custom_gradient(function):
    """`function(*inputs) -> (outputs, backward)`, differentiated by `backward(*upstream)`.

    `outputs` is a tuple; `backward` gets one upstream gradient per output and returns one
    gradient per input. Differentiating the gradient again raises `NotImplementedError`.
    """

    def wrapped(*inputs):
        return _Custom.apply(function, *inputs)

    return wrapped


def searchsorted(sorted_rows, values, side: str = "left"):
    """`[rows, k]` int32 insertion indices of `values` `[rows, k]` in `sorted_rows` `[rows, n]`."""
    found = torch.searchsorted(sorted_rows.contiguous(), values.contiguous(), right=side == "right")
    return found.to(torch.int32)


def accurate_sum(x, axis: int, keepdims: bool = False):
    """Sum along `axis`; float32 (and narrower) accumulated in float64."""
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.sum(x, dim=axis, keepdim=keepdims, dtype=torch.float64).to(x.dtype)
    return torch.sum(x, dim=axis, keepdim=keepdims)


# The smallest arguments whose exponential is a normal number (just above log(tiny)). Below
# them PyTorch's vectorised CPU exp leaves its fast path: on 256 x 1000 float32 entries
# (2 cores, torch 2.13), 0.1 ms for arguments in [-80, 0], 0.9 ms in [-1e4, -150] and 2.3 ms
# where the result is subnormal; float64 from -708.4 on, 4-7 ms.
_NORMAL_EXP_FROM = {torch.float32: -87.336, torch.float64: -708.39}


def flushed_exp(x):
    """`exp(x)` with results below the dtype's smallest normal number flushed to zero, as the
    CPU kernels of TensorFlow and XLA do (and, so that every argument kept takes the fast path,
    those within 0.05% above it); NaN stays NaN."""
    floor = _NORMAL_EXP_FROM.get(x.dtype)
    if floor is None:
        return torch.exp(x)
    return torch.where(x < floor, 0.0, torch.exp(torch.clamp(x, min=floor)))


def float64_available() -> bool:
    return True


def bitcast(x, dtype: str):
    """The bits of `x` read as `dtype`, a type of the same width."""
    return x.view(getattr(torch, dtype))


def counts_faster(n: int | None) -> bool:
    """Whether an exact split of rows of `n` entries should count instead of sorting: never
    (PyTorch sorts with its own kernels, and its counting passes would run op by op)."""
    return False
