"""The quartile-split task and one adapter per method, each importing its framework lazily.

Every adapter turns float32 scores `x` [B, n] and values `A` [B, n] into soft lower- and
upper-quartile masks `(low, high)` with k = n / 4, and exposes:

  * `forward(x, param, upper_only)`: masks as numpy arrays (calibration, finite differences);
  * `steps(param)`: dict variant -> callable returning numpy `(loss, grad, low, high)`, where
    `loss = sum(high * A) - sum(low * A)` and `grad` is d loss / d x (forward + backward);
  * `estimate_bytes(B, n)`: rough peak memory of one forward + backward, for the OOM guard.

`param` is the method's own sharpness knob; `softer_when_larger` tells the calibration which way
it goes. Adapters are built with the inputs they will be timed on (as framework tensors made
before any measurement), so that conversions never land inside a timed call.
"""

from __future__ import annotations

import math

import numpy as np

MB = 2**20


def hard_masks(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Hard lower / upper masks: the k smallest and the k largest entries of each row."""
    n = x.shape[-1]
    ranks = np.argsort(np.argsort(x, axis=-1, kind="stable"), axis=-1, kind="stable")
    return (ranks < k).astype(np.float64), (ranks >= n - k).astype(np.float64)


class Method:
    name = ""
    label = ""
    framework = ""  # "tf", "jax" or "torch"
    param_name = ""
    default_param: float | None = None
    softer_when_larger = True
    # True when the sharpness knob acts on quantile levels (squashed scores), so that a knob
    # calibrated on a leading block of a row carries over to the whole row.
    scale_free = False
    variants: tuple[str, ...] = ("eager",)
    # True for peers that sort each row or build an n x n matrix per row (issue target: >= 3x).
    sorts_or_matrix = False

    def __init__(self, x: np.ndarray, A: np.ndarray):
        self.x_np, self.A_np = x, A
        self.B, self.n = x.shape
        self.k = self.n // 4

    def guess(self, target: float) -> float:
        raise NotImplementedError

    @classmethod
    def estimate_bytes(cls, batch: int, n: int) -> float:
        return 40.0 * batch * n * 4  # a few dozen [B, n] float32 temporaries

    def forward(self, x: np.ndarray, param: float, upper_only: bool = False):
        raise NotImplementedError

    def steps(self, param: float) -> dict:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# TensorFlow methods


class _TFMethod(Method):
    framework = "tf"
    variants = ("graph", "xla")

    def __init__(self, x, A):
        super().__init__(x, A)
        import tensorflow as tf

        self.tf = tf
        self.x_tf = tf.constant(x)
        self.A_tf = tf.constant(A)
        self._forward = tf.function(self.masks, reduce_retracing=True)

    def masks(self, x, param, values=None):
        raise NotImplementedError

    def forward(self, x, param, upper_only=False):
        tf = self.tf
        low, high = self._forward(tf.constant(x, tf.float32), tf.constant(param, tf.float32))
        return (None if upper_only else low.numpy()), high.numpy()

    def steps(self, param):
        tf = self.tf
        p = tf.constant(param, tf.float32)
        out = {}
        for variant in self.variants:
            fn = tf.function(self._step_fn(), jit_compile=variant == "xla")
            out[variant] = lambda fn=fn, x=self.x_tf, A=self.A_tf: tuple(
                t.numpy() for t in fn(x, A, p)
            )
        return out

    def step_on(self, x: np.ndarray, A: np.ndarray, param: float, variant: str):
        """One fwd+bwd on other inputs (the finite-difference block)."""
        tf = self.tf
        fn = tf.function(self._step_fn(), jit_compile=variant == "xla")
        res = fn(tf.constant(x), tf.constant(A), tf.constant(param, tf.float32))
        return tuple(t.numpy() for t in res)

    def _step_fn(self):
        tf = self.tf

        def step(x, A, p):
            with tf.GradientTape() as tape:
                tape.watch(x)
                low, high = self.masks(x, p, A)
                loss = tf.reduce_sum(high * A) - tf.reduce_sum(low * A)
            return loss, tape.gradient(loss, x), low, high

        return step


class KerasSoftQuantile(_TFMethod):
    name = "keras_softquantile"
    label = "keras_softquantile soft_quantile_split"
    param_name = "epsilon"
    default_param = 1e-2
    scale_free = True

    def __init__(self, x, A):
        from keras_softquantile import ops

        self.ops = ops
        super().__init__(x, A)

    def guess(self, target):
        return target / 1.4

    def masks(self, x, param, values=None):
        values = x if values is None else values  # output="weights" returns the masks only
        return self.ops.soft_quantile_split(values, x, 0.25, epsilon=param, output="weights")


class NeuralSort(_TFMethod):
    name = "neuralsort"
    label = "TFP NeuralSort (soft_sorting_matrix)"
    param_name = "temperature"
    sorts_or_matrix = True

    def __init__(self, x, A):
        import tensorflow_probability as tfp

        self.tfp = tfp
        super().__init__(x, A)

    def guess(self, target):
        return 10.0 * target / self.n

    @classmethod
    def estimate_bytes(cls, batch, n):
        # soft_sorting_matrix holds a few [B, n, n] float32 tensors forward and backward
        # (measured: 4.4 of them at 32 x 1000, graph mode; 3.5 with XLA).
        return 5.0 * batch * n * n * 4

    def masks(self, x, param, values=None):
        tf = self.tf
        # Row i of P is a soft one-hot of the i-th LARGEST entry (descending sort).
        P = self.tfp.math.soft_sorting_matrix(x, param)
        n = x.shape[-1]
        k = n // 4
        high = tf.reduce_sum(P[:, :k, :], axis=1)
        low = tf.reduce_sum(P[:, n - k :, :], axis=1)
        return low, high


# --------------------------------------------------------------------------------------------
# JAX: OTT-JAX


class _OTT(Method):
    framework = "jax"
    param_name = "epsilon"
    default_param = 1e-2  # ott.tools.soft_sort.transport_for_sort's default
    scale_free = True  # scores are squashed by a sigmoid of whitened values before transport
    variants = ("jit",)

    def __init__(self, x, A):
        super().__init__(x, A)
        import jax
        import jax.numpy as jnp
        from ott.tools import soft_sort

        self.jax, self.jnp, self.soft_sort = jax, jnp, soft_sort
        self.x_j = jnp.asarray(x)
        self.A_j = jnp.asarray(A)
        self._fwd = jax.jit(self.masks)
        self._fwd_upper = jax.jit(self.upper)

        def loss(x, A, eps):
            low, high = self.masks(x, eps)
            return jnp.sum(high * A) - jnp.sum(low * A), (low, high)

        self._step = jax.jit(jax.value_and_grad(loss, has_aux=True))

    def guess(self, target):
        return target

    def upper(self, x, eps):
        return self.masks(x, eps)[1]

    def forward(self, x, param, upper_only=False):
        jnp = self.jnp
        eps = jnp.float32(param)
        if upper_only:
            return None, np.asarray(self._fwd_upper(jnp.asarray(x), eps))
        low, high = self._fwd(jnp.asarray(x), eps)
        return np.asarray(low), np.asarray(high)

    def _run(self, x, A, eps):
        (loss, (low, high)), grad = self._step(x, A, eps)
        return np.asarray(loss), np.asarray(grad), np.asarray(low), np.asarray(high)

    def steps(self, param):
        eps = self.jnp.float32(param)
        return {"jit": lambda: self._run(self.x_j, self.A_j, eps)}

    def step_on(self, x, A, param, variant):
        jnp = self.jnp
        return self._run(jnp.asarray(x), jnp.asarray(A), jnp.float32(param))


class OTTTopK(_OTT):
    name = "ott_topk"
    label = "OTT-JAX topk_mask(x) + topk_mask(-x)"

    def masks(self, x, eps):
        k = x.shape[-1] // 4
        high = self.soft_sort.topk_mask(x, axis=-1, k=k, epsilon=eps)
        low = self.soft_sort.topk_mask(-x, axis=-1, k=k, epsilon=eps)
        return low, high

    def upper(self, x, eps):
        return self.soft_sort.topk_mask(x, axis=-1, k=x.shape[-1] // 4, epsilon=eps)


class OTT3Targets(_OTT):
    """One Sinkhorn transport onto three targets (quartile masses), masks = plan columns.

    Differentiated by unrolling the Sinkhorn iterations (`implicit_diff=None`): with OTT's
    default implicit differentiation the backward pass of this problem raises "A linear solver
    returned non-finite (NaN or inf) output" (ott-jax 0.6.0, lineax), and passing another
    implicit solver fails inside ott (`ImplicitDiff.solve` leaves `solver` unbound).
    """

    name = "ott_3targets"
    label = "OTT-JAX one 3-target transport_for_sort (unrolled grad)"

    def masks(self, x, eps):
        jax, jnp = self.jax, self.jnp
        n = x.shape[-1]
        a = jnp.ones((n,), x.dtype) / n
        b = jnp.array([0.25, 0.5, 0.25], x.dtype)

        def row(r):
            # Targets are 0, 0.5, 1 (increasing): column 0 = lowest quarter, 2 = highest.
            plan = self.soft_sort.transport_for_sort(r, a, b, epsilon=eps, implicit_diff=None)
            plan = plan.matrix
            return plan[:, 0] * n, plan[:, 2] * n

        return jax.vmap(row)(x)


# --------------------------------------------------------------------------------------------
# PyTorch: torchsort, diffsort


class _TorchMethod(Method):
    framework = "torch"

    def __init__(self, x, A):
        super().__init__(x, A)
        import torch

        # TensorFlow's CPU thread pools flush denormals to zero; do the same for PyTorch, or
        # products of soft permutations full of tiny values run many times slower (diffsort at
        # n = 512, steepness 10: 8.9 s per call without, measured).
        torch.set_flush_denormal(True)
        self.torch = torch
        self.x_t = torch.from_numpy(x.copy())
        self.A_t = torch.from_numpy(A.copy())

    def forward(self, x, param, upper_only=False):
        with self.torch.no_grad():
            low, high = self.masks(self.torch.from_numpy(np.ascontiguousarray(x)), param)
        return (None if upper_only else low.numpy()), high.numpy()

    def _run(self, x, A, param):
        torch = self.torch
        xg = x.detach().requires_grad_(True)
        low, high = self.masks(xg, param)
        loss = (high * A).sum() - (low * A).sum()
        (grad,) = torch.autograd.grad(loss, xg)
        return (
            loss.detach().numpy(),
            grad.numpy(),
            low.detach().numpy(),
            high.detach().numpy(),
        )

    def steps(self, param):
        return {"eager": lambda: self._run(self.x_t, self.A_t, param)}

    def step_on(self, x, A, param, variant):
        torch = self.torch
        return self._run(torch.from_numpy(x.copy()), torch.from_numpy(A.copy()), param)


class TorchSort(_TorchMethod):
    name = "torchsort"
    label = "torchsort soft_rank + clamp"
    param_name = "regularization_strength"
    default_param = 1.0
    sorts_or_matrix = True  # soft_rank sorts each row, then solves an isotonic regression

    def __init__(self, x, A):
        super().__init__(x, A)
        import torchsort

        self.torchsort = torchsort

    def guess(self, target):
        # Soft ranks move when r is about the gap between neighbouring scores, ~ 1 / n here;
        # the MAD changes steeply with r.
        return 3.0 / self.n

    def masks(self, x, param):
        # Soft ranks in [1, n] (1 = smallest). Hard ranks give exactly the hard masks:
        #   upper = clamp(rank - (n - k), 0, 1): 1 for ranks n-k+1..n, 0 for ranks <= n-k;
        #   lower = clamp(k + 1 - rank, 0, 1):   1 for ranks 1..k,     0 for ranks >= k+1.
        rank = self.torchsort.soft_rank(x, regularization_strength=param)
        n = x.shape[-1]
        k = n // 4
        high = (rank - (n - k)).clamp(0.0, 1.0)
        low = (k + 1 - rank).clamp(0.0, 1.0)
        return low, high


class DiffSort(_TorchMethod):
    name = "diffsort"
    label = "diffsort bitonic DiffSortNet"
    param_name = "steepness"
    default_param = 10.0
    softer_when_larger = False
    sorts_or_matrix = True

    def __init__(self, x, A):
        super().__init__(x, A)
        import diffsort

        self.diffsort = diffsort
        self._nets = {}

    def guess(self, target):
        return 10.0 / target

    @staticmethod
    def layers(n):
        blocks = math.ceil(math.log2(n))
        return blocks * (blocks + 1) // 2

    @classmethod
    def estimate_bytes(cls, batch, n):
        # Every layer of the network keeps ~6 [B, n, n] float32 tensors for the backward pass.
        return 6.0 * cls.layers(n) * batch * n * n * 4

    def masks(self, x, param):
        n = x.shape[-1]
        if n not in self._nets:
            self._nets[n] = self.diffsort.DiffSortNet("bitonic", n, steepness=float(param))
        net = self._nets[n]
        net.steepness = float(param)
        # P[b, i, j]: weight of input i at ascending sorted position j (x_sorted = x @ P).
        _, P = net(x)
        k = n // 4
        return P[:, :, :k].sum(-1), P[:, :, n - k :].sum(-1)


METHODS = {
    cls.name: cls
    for cls in (KerasSoftQuantile, OTTTopK, OTT3Targets, TorchSort, DiffSort, NeuralSort)
}
DEFAULT_METHODS = ("keras_softquantile", "ott_topk", "ott_3targets", "torchsort", "diffsort")
DEFAULT_METHODS = (*DEFAULT_METHODS, "neuralsort")
