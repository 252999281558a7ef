"""The quartile-split task and one adapter per method, each importing its framework lazily.

Every adapter turns float32 scores `x` [B, n] and values `A` [B, n] into soft lower- and
upper-quartile masks `(low, high)` with k = n / 4, and exposes:

  * `forward(x, param, upper_only)`: masks as numpy arrays (calibration, finite differences);
  * `steps(param)`: dict variant -> callable returning numpy `(loss, grad, low, high)`, where
    `loss = sum(high * A) - sum(low * A)` and `grad` is d loss / d x (forward + backward);
  * `estimate_bytes(B, n)`: rough peak memory of one forward + backward, for the OOM guard.

`param` is the method's own sharpness knob; `softer_when_larger` tells the calibration which way
it goes. `keras_backend` and `worker_env` say how the worker process of a method must start
(keras_softquantile runs once per Keras backend: TensorFlow, JAX, PyTorch). Adapters are built
with the inputs they will be timed on (as framework tensors made before any measurement), so
that conversions never land inside a timed call.
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
    # The Keras backend the worker process must start with (KERAS_BACKEND is read once, when
    # keras is first imported). Only keras_softquantile's adapters use Keras; the peers run in
    # a TensorFlow-backend process like the TensorFlow methods.
    keras_backend = "tensorflow"
    # Further environment variables for the worker process (read by the frameworks at import).
    worker_env: tuple[tuple[str, str], ...] = ()
    # keras_softquantile itself (any backend), as opposed to a peer.
    ours = False
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


class _Ours:
    """What keras_softquantile's adapters share, whichever Keras backend they run on."""

    ours = True
    param_name = "epsilon"
    default_param = 1e-2
    scale_free = True

    def __init__(self, x, A):
        from keras_softquantile import ops

        self.ops = ops
        super().__init__(x, A)

    def guess(self, target: float) -> float:
        return target / 1.4


class KerasSoftQuantile(_Ours, _TFMethod):
    name = "keras_softquantile"
    label = "keras_softquantile soft_quantile_split"

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
# JAX: keras_softquantile on the JAX backend, OTT-JAX, SoftJAX


class _JaxMethod(Method):
    """A method written in JAX: masks under `jax.jit`, timed as `jax.value_and_grad` of the loss.

    Subclasses define `masks(x, param) -> (low, high)` on jax arrays; the knob is passed as a
    traced float32 scalar, so calibration does not recompile for every knob value.
    """

    framework = "jax"
    variants = ("jit",)

    def __init__(self, x, A):
        super().__init__(x, A)
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp
        self.x_j = jnp.asarray(x)
        self.A_j = jnp.asarray(A)
        self._fwd = jax.jit(self.masks)
        self._fwd_upper = jax.jit(self.upper)

        def loss(x, A, param):
            low, high = self.masks(x, param)
            return jnp.sum(high * A) - jnp.sum(low * A), (low, high)

        self._step = jax.jit(jax.value_and_grad(loss, has_aux=True))

    def masks(self, x, param):
        raise NotImplementedError

    def upper(self, x, param):
        """The upper mask alone (calibration needs no more)."""
        return self.masks(x, param)[1]

    def forward(self, x, param, upper_only=False):
        jnp = self.jnp
        p = jnp.float32(param)
        if upper_only:
            return None, np.asarray(self._fwd_upper(jnp.asarray(x), p))
        low, high = self._fwd(jnp.asarray(x), p)
        return np.asarray(low), np.asarray(high)

    def _run(self, x, A, param):
        (loss, (low, high)), grad = self._step(x, A, param)
        # np.asarray waits for the result (block_until_ready) before the timer stops.
        return np.asarray(loss), np.asarray(grad), np.asarray(low), np.asarray(high)

    def steps(self, param):
        p = self.jnp.float32(param)
        return {"jit": lambda: self._run(self.x_j, self.A_j, p)}

    def step_on(self, x, A, param, variant):
        jnp = self.jnp
        return self._run(jnp.asarray(x), jnp.asarray(A), jnp.float32(param))


class KerasSoftQuantileJax(_Ours, _JaxMethod):
    """keras_softquantile's `soft_quantile_split`, the op of the TensorFlow row, on Keras' JAX
    backend: called on jax arrays inside `jax.jit(jax.value_and_grad(...))`."""

    name = "keras_softquantile[jax]"
    label = "keras_softquantile soft_quantile_split (Keras JAX backend)"
    keras_backend = "jax"

    def masks(self, x, param):
        return self.ops.soft_quantile_split(x, x, 0.25, epsilon=param, output="weights")


class _OTT(_JaxMethod):
    param_name = "epsilon"
    default_param = 1e-2  # ott.tools.soft_sort.transport_for_sort's default
    scale_free = True  # scores are squashed by a sigmoid of whitened values before transport

    def __init__(self, x, A):
        from ott.tools import soft_sort

        self.soft_sort = soft_sort
        super().__init__(x, A)

    def guess(self, target):
        return target


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


class _SoftJax(_JaxMethod):
    """SoftJAX's `top_k`: a soft index of shape [B, k, n] (row j: soft one-hot of the j-th
    largest entry); `high` = its sum over the k rows, `low` the same for `-x`.

    The knob is `softness` (library default 0.1 for every method), applied after SoftJAX's
    default standardize-and-squash of the scores. Everything else is left at the library's
    defaults (`mode="smooth"`, `gated_grad=True`).
    """

    param_name = "softness"
    default_param = 0.1
    # The transport/softmax acts on score gaps that shrink like 1 / n: no block calibration.
    scale_free = False
    sorts_or_matrix = True  # builds k x n per row (k = n / 4)
    method = ""

    def __init__(self, x, A):
        import softjax

        self.softjax = softjax
        super().__init__(x, A)

    def _top(self, x, param):
        k = x.shape[-1] // 4
        _, index = self.softjax.top_k(x, k, axis=-1, softness=param, method=self.method)
        return index.sum(axis=-2)

    def masks(self, x, param):
        return self._top(-x, param), self._top(x, param)

    def upper(self, x, param):
        return self._top(x, param)


class SoftJaxOT(_SoftJax):
    """`method="ot"`: a Sinkhorn transport (through OTT, implicit differentiation) of the n
    scores onto k + 1 anchors, the last one taking the n - k others: an [n, k + 1] plan.

    Runs with `JAX_ENABLE_X64=1`, as SoftJAX's documentation of its transport projection asks:
    the solver then upcasts the transport to float64 (inputs and masks stay float32). Without
    it, every backward pass measured (1 x 1000, softness 0.1 and 3e-4) stopped with lineax's
    "A linear solver returned non-finite (NaN or inf) output" (softjax 0.1.1, ott-jax 0.6.0).
    """

    name = "softjax_ot"
    label = "SoftJAX top_k(method='ot') of x and -x (JAX_ENABLE_X64=1)"
    method = "ot"
    worker_env = (("JAX_ENABLE_X64", "1"),)

    def guess(self, target):
        # Neighbouring anchors are 1 / k apart on squashed scores in [0, 1], so the cost gap
        # that decides the k-th entry's bucket shrinks like 1 / n. Much sharper than this, the
        # Sinkhorn loop stops converging (n = 1000: MAD 5e-3 at softness 1e-4, 0.29 at 1e-5).
        return 20.0 * target / self.n

    @classmethod
    def estimate_bytes(cls, batch, n):
        # Two transports, each a few [B, n, k + 1] float64 cost / plan / kernel tensors kept
        # for the implicit backward pass.
        return 2 * 4.0 * batch * n * (n // 4 + 1) * 8


class SoftJaxDefault(_SoftJax):
    """SoftJAX's default `top_k` method (`"neuralsort"`): row j of the soft index is a softmax
    over the n entries of NeuralSort's j-th score vector; [B, k, n] per call."""

    name = "softjax_default"
    label = "SoftJAX top_k (default method='neuralsort') of x and -x"
    method = "neuralsort"

    def guess(self, target):
        return target

    @classmethod
    def estimate_bytes(cls, batch, n):
        # A few [B, k, n] float32 tensors (scores, softmax, its backward) per call, two calls.
        return 2 * 5.0 * batch * (n // 4) * n * 4


# --------------------------------------------------------------------------------------------
# PyTorch: keras_softquantile on the torch backend, torchsort, diffsort


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


class KerasSoftQuantileTorch(_Ours, _TorchMethod):
    """keras_softquantile's `soft_quantile_split`, the op of the TensorFlow row, on Keras'
    PyTorch backend: eager torch tensors, gradient by autograd."""

    name = "keras_softquantile[torch]"
    label = "keras_softquantile soft_quantile_split (Keras PyTorch backend)"
    keras_backend = "torch"

    def masks(self, x, param):
        return self.ops.soft_quantile_split(x, x, 0.25, epsilon=float(param), output="weights")


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
    for cls in (
        KerasSoftQuantile,
        KerasSoftQuantileJax,
        OTTTopK,
        OTT3Targets,
        SoftJaxOT,
        SoftJaxDefault,
        KerasSoftQuantileTorch,
        TorchSort,
        DiffSort,
        NeuralSort,
    )
}
DEFAULT_METHODS = tuple(METHODS)
