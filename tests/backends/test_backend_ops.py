"""`keras_softquantile.ops` under the active Keras backend: values, gradients, errors, jit.

The assertions of the TensorFlow suite (tests/ops), on small inputs, through the backend's own
autodiff and compiler (see `harness.py`). float64 tests are skipped on JAX without x64.

Nearly every test works on `[2, 12]` rows (`SHAPE`): JAX compiles each primitive once per
shape and dtype, so shared shapes keep the JAX runs fast.
"""

import itertools

import keras
import numpy as np
import pytest
from harness import (
    backend,
    float64_available,
    grad,
    is_backend_tensor,
    jit,
    jit_grad,
    needs_float64,
    needs_tracing_jit,
    second_order_gradient,
    tensor,
    to_numpy,
)

from keras_softquantile import ops

F64 = pytest.param("float64", marks=needs_float64, id="float64")
F32 = pytest.param("float32", id="float32")
DTYPES = [F64, F32]
# Bucket masses and totals: to 1e-9 in float64, 1e-4 relative in float32.
MASS_RTOL = {"float64": 1e-9, "float32": 1e-4}
# Agreement of two computations of the same values.
ATOL = {"float64": 1e-10, "float32": 1e-5}
N = 12
SHAPE = (2, N)
# The widest dtype this run can make (float32 on JAX without x64).
WIDEST = "float64" if float64_available() else "float32"


def normal(rng, shape=SHAPE):
    return rng.standard_normal(shape)


def separated(rng, shape=SHAPE):
    """Distinct entries at least 0.6 apart along the last axis (a permutation plus jitter)."""
    permutations = np.argsort(rng.random(shape), axis=-1).astype(np.float64)
    return permutations + rng.uniform(-0.2, 0.2, shape)


def hard_ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, axis=-1, kind="stable"), axis=-1, kind="stable")


def value(f, x) -> float:
    """`sum(f(x))` as a Python float (numpy in)."""
    return float(to_numpy(keras.ops.sum(f(tensor(x)))))


def check_gradient(loss, x: np.ndarray, rtol: float = 1e-4, directions: int = 3) -> np.ndarray:
    """The backend's gradient of `sum(loss)` at float64 `x` against central differences along
    random directions (`<grad, d>` against `(f(x + h d) - f(x - h d)) / 2h`)."""
    analytic = grad(loss, x)
    assert np.linalg.norm(analytic) > 1e-3, "a zero gradient: not a soft op"
    rng = np.random.default_rng(99)
    h = 1e-6
    for _ in range(directions):
        d = rng.standard_normal(x.shape)
        numeric = (value(loss, x + h * d) - value(loss, x - h * d)) / (2 * h)
        projected = float(np.sum(analytic * d))
        assert abs(projected - numeric) <= rtol * max(np.linalg.norm(analytic), 1e-3), (
            f"directional derivative {projected} vs finite differences {numeric}"
        )
    return analytic


# --------------------------------------------------------------------------------------------
# Tensors in, tensors out.
# --------------------------------------------------------------------------------------------

OUTPUT_CALLS = {
    "soft_topk_mask": lambda x: ops.soft_topk_mask(x, 2),
    "soft_quantile_masks": lambda x: ops.soft_quantile_masks(x),
    "soft_quantile_split": lambda x: ops.soft_quantile_split(x, x, output="mean"),
    "soft_sort": lambda x: ops.soft_sort(x),
    "soft_rank": lambda x: ops.soft_rank(x),
    "soft_quantile": lambda x: ops.soft_quantile(x, [0.25, 0.5]),
    "soft_sort_with": lambda x: ops.soft_sort_with(x, x),
    "perturbed_quantile_split": lambda x: ops.perturbed_quantile_split(x, x, num_samples=4, seed=1),
    "squash_scores": lambda x: ops.squash_scores(x),
}


@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "tensor"])
@pytest.mark.parametrize("op", sorted(OUTPUT_CALLS))
def test_ops_return_backend_tensors_of_the_input_dtype(op, as_tensor, rng):
    x = normal(rng).astype("float32")
    out = OUTPUT_CALLS[op](tensor(x) if as_tensor else x)
    for t in keras.tree.flatten(out):
        assert is_backend_tensor(t), f"{op} returned {type(t).__name__}, not a {backend()} tensor"
        assert keras.backend.standardize_dtype(t.dtype) == "float32"
        assert np.all(np.isfinite(to_numpy(t)))


@needs_float64
def test_float64_stays_float64(rng):
    x = tensor(normal(rng), "float64")
    for out in (
        ops.soft_quantile_masks(x),
        ops.soft_topk_mask(x, 3),
        ops.soft_sort(x),
        ops.soft_rank(x),
        ops.soft_quantile(x, 0.5),
        ops.soft_quantile_split(x, x)[0],
    ):
        assert keras.backend.standardize_dtype(out.dtype) == "float64"


@pytest.mark.parametrize(
    "dtype", ["float16", pytest.param("bfloat16", marks=pytest.mark.slow, id="bfloat16")]
)
def test_half_precision_returns_the_input_dtype(dtype, rng):
    x = normal(rng)
    masks = ops.soft_quantile_masks(tensor(x, dtype), epsilon=1e-2)
    assert keras.backend.standardize_dtype(masks.dtype) == dtype
    reference = to_numpy(ops.soft_quantile_masks(tensor(x, "float32"), epsilon=1e-2))
    half = to_numpy(keras.ops.cast(masks, "float32"))
    np.testing.assert_allclose(half, reference, atol=1e-2)


# --------------------------------------------------------------------------------------------
# Exact masses.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantile_masks_have_exact_fractional_bucket_masses(dtype, rng):
    x = tensor(normal(rng), dtype)
    masks, info = ops.soft_quantile_masks(x, (0.3, 0.75), epsilon=1e-3, return_diagnostics=True)
    masks = to_numpy(masks).astype(np.float64)
    expected = np.broadcast_to(np.array([0.3, 0.45, 0.25]) * N, (2, 3))  # 3.6, 5.4, 3
    np.testing.assert_allclose(masks.sum(1), expected, rtol=MASS_RTOL[dtype])
    np.testing.assert_allclose(masks.sum(-1), 1.0, atol=MASS_RTOL[dtype])
    assert np.all(to_numpy(info.converged))
    assert to_numpy(info.iterations).shape == (2,)
    assert to_numpy(info.boundaries).shape == (2, 2)
    assert np.all(to_numpy(info.marginal_error) <= (2e-11 if dtype == "float64" else 1e-5))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantile_masks_on_a_long_batch(dtype, rng):
    x = tensor(normal(rng, (16, 1000)), dtype)
    masks, info = ops.soft_quantile_masks(x, epsilon=1e-3, return_diagnostics=True)
    assert np.all(to_numpy(info.converged))
    np.testing.assert_allclose(
        to_numpy(masks).astype(np.float64).sum(1), np.tile([250, 500, 250], (16, 1)), rtol=1e-4
    )


@needs_float64
def test_general_quantile_levels_use_more_buckets(rng):
    x = tensor(normal(rng), "float64")
    masks = to_numpy(ops.soft_quantile_masks(x, (0.1, 0.3, 0.5, 0.9), epsilon=1e-3))
    assert masks.shape == (2, N, 5)
    np.testing.assert_allclose(masks.sum(1), np.tile([1.2, 2.4, 2.4, 4.8, 1.2], (2, 1)), 1e-9)


@pytest.mark.parametrize("k", [0, 1, 3, 7.5, N])
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_mask_sums_to_k_and_selects_the_largest(dtype, k, rng):
    x = separated(rng)
    mask = to_numpy(ops.soft_topk_mask(tensor(x, dtype), k, epsilon=1e-4)).astype(np.float64)
    np.testing.assert_allclose(mask.sum(-1), k, rtol=MASS_RTOL[dtype], atol=MASS_RTOL[dtype])
    assert np.all((mask >= 0) & (mask <= 1))
    if float(k).is_integer():
        np.testing.assert_allclose(mask, hard_ranks(x) >= N - int(k), atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_is_the_two_bucket_quantile_mask(dtype, rng):
    x = tensor(normal(rng), dtype)
    topk = to_numpy(ops.soft_topk_mask(x, 3, epsilon=1e-2))
    masks = to_numpy(ops.soft_quantile_masks(x, (0.75,), epsilon=1e-2))
    np.testing.assert_allclose(topk, masks[..., 1], atol=ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_weights_are_the_outer_buckets_with_exact_masses(dtype, rng):
    scores = tensor(normal(rng), dtype)
    low, high = ops.soft_quantile_split(scores, scores, 0.25, epsilon=1e-2)
    masks = to_numpy(ops.soft_quantile_masks(scores, (0.25, 0.75), epsilon=1e-2))
    np.testing.assert_allclose(to_numpy(low), masks[..., 0], atol=ATOL[dtype])
    np.testing.assert_allclose(to_numpy(high), masks[..., 2], atol=ATOL[dtype])
    np.testing.assert_allclose(to_numpy(high).astype(np.float64).sum(-1), 3.0, MASS_RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sort_preserves_the_sum_and_ranks_sum_to_n_choose_2(dtype, rng):
    x = normal(rng)
    ordered = to_numpy(ops.soft_sort(tensor(x, dtype), epsilon=1e-1)).astype(np.float64)
    np.testing.assert_allclose(ordered.sum(-1), x.sum(-1), rtol=MASS_RTOL[dtype], atol=1e-5)
    assert np.all(np.diff(ordered, axis=-1) >= -1e-6)
    ranks = to_numpy(ops.soft_rank(tensor(x, dtype), epsilon=1e-1)).astype(np.float64)
    np.testing.assert_allclose(ranks.sum(-1), N * (N - 1) / 2, rtol=MASS_RTOL[dtype])


def test_perturbed_split_masses_are_exact_integers(rng):
    x = tensor(normal(rng).astype("float32"))
    low, high = ops.perturbed_quantile_split(x, x, 0.3, sigma=0.1, num_samples=20, seed=1)
    np.testing.assert_allclose(to_numpy(low).sum(-1), 3, rtol=1e-6)  # floor(0.3 * 12)
    np.testing.assert_allclose(to_numpy(high).sum(-1), 3, rtol=1e-6)


def test_perturbed_same_seed_same_draws(rng):
    x = tensor(normal(rng).astype("float32"))
    first = ops.perturbed_quantile_split(x, x, sigma=0.2, num_samples=5, seed=(4, 5))
    second = ops.perturbed_quantile_split(x, x, sigma=0.2, num_samples=5, seed=(4, 5))
    other = ops.perturbed_quantile_split(x, x, sigma=0.2, num_samples=5, seed=(4, 6))
    np.testing.assert_array_equal(to_numpy(first[1]), to_numpy(second[1]))
    assert not np.array_equal(to_numpy(first[1]), to_numpy(other[1]))


# --------------------------------------------------------------------------------------------
# Agreement with the hard ops as epsilon shrinks.
# --------------------------------------------------------------------------------------------


@needs_float64
def test_quantile_masks_converge_to_the_hard_buckets(rng):
    x = normal(rng)
    ranks = hard_ranks(x)
    hard = np.stack([ranks < 3, (ranks >= 3) & (ranks < 9), ranks >= 9], -1)
    errors = [
        np.abs(to_numpy(ops.soft_quantile_masks(tensor(x), epsilon=e)) - hard).mean()
        for e in (1e-1, 1e-2, 1e-3, 1e-5)
    ]
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-6


def test_float32_masks_are_sharp_at_small_epsilon(rng):
    x = normal(rng, (2, 200))
    masks = to_numpy(ops.soft_quantile_masks(tensor(x, "float32"), epsilon=1e-3))
    mad = np.abs(masks[..., 2] - (hard_ranks(x) >= 150)).mean()
    assert 0 < mad <= 4e-3, mad  # 1e-3 on 8 x 1000 rows in the TensorFlow suite


SORTING_CASES = {
    "soft_sort": (lambda x, v, e: ops.soft_sort(x, epsilon=e), lambda x, v: np.sort(x, -1)),
    "soft_sort_descending": (
        lambda x, v, e: ops.soft_sort(x, epsilon=e, descending=True),
        lambda x, v: np.flip(np.sort(x, -1), -1),
    ),
    "soft_rank": (lambda x, v, e: ops.soft_rank(x, epsilon=e), lambda x, v: hard_ranks(x)),
    "soft_rank_descending": (
        lambda x, v, e: ops.soft_rank(x, epsilon=e, descending=True),
        lambda x, v: N - 1 - hard_ranks(x),
    ),
    "soft_quantile": (
        lambda x, v, e: ops.soft_quantile(x, [0.0, 0.13, 0.5, 1.0], epsilon=e),
        lambda x, v: np.moveaxis(np.quantile(x, [0.0, 0.13, 0.5, 1.0], axis=-1), 0, -1),
    ),
    "soft_quantile_scalar": (
        lambda x, v, e: ops.soft_quantile(x, 0.37, epsilon=e),
        lambda x, v: np.quantile(x, 0.37, axis=-1),
    ),
    "soft_sort_with": (
        lambda x, v, e: ops.soft_sort_with(v, x, epsilon=e),
        lambda x, v: np.take_along_axis(v, np.argsort(x, -1), -1),
    ),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(SORTING_CASES))
def test_sorting_ops_reach_the_hard_result_at_small_epsilon(case, dtype, rng):
    soft, hard = SORTING_CASES[case]
    x = separated(rng)
    v = normal(rng)
    got = to_numpy(soft(tensor(x, dtype), tensor(v, dtype), 1e-3)).astype(np.float64)
    expected = hard(x.astype(dtype).astype(np.float64), v.astype(dtype).astype(np.float64))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-9 if dtype == "float64" else 1e-4)


@pytest.mark.parametrize("solver", ["auto", "sinkhorn"])
def test_sorted_split_and_mean_converge_to_the_hard_selection(solver, rng):
    scores = np.stack([rng.permutation(np.linspace(-2, 2, N)) for _ in range(2)])
    values = normal(rng)
    ordered = np.take_along_axis(values, np.argsort(scores, -1), -1)
    values, scores = tensor(values, WIDEST), tensor(scores, WIDEST)
    low, high = ops.soft_quantile_split(
        values, scores, 0.25, epsilon=1e-5, output="sorted", solver=solver
    )
    assert tuple(low.shape) == tuple(high.shape) == (2, 3)
    np.testing.assert_allclose(to_numpy(low), ordered[:, :3], atol=1e-5)
    np.testing.assert_allclose(to_numpy(high), ordered[:, -3:], atol=1e-5)
    low, high = ops.soft_quantile_split(values, scores, 0.25, epsilon=1e-5, output="mean")
    np.testing.assert_allclose(to_numpy(low), ordered[:, :3].mean(-1), atol=1e-5)
    np.testing.assert_allclose(to_numpy(high), ordered[:, -3:].mean(-1), atol=1e-5)
    low, high = ops.soft_quantile_split(values, scores, 0.05, epsilon=1e-5, output="sorted")
    assert tuple(low.shape) == tuple(high.shape) == (2, 0)


def test_perturbed_split_converges_to_the_hard_split(rng):
    x = normal(rng).astype("float32")
    hard_high = (hard_ranks(x) >= 9).astype(np.float64)
    errors = []
    for sigma in (0.3, 0.03, 1e-4):
        _, high = ops.perturbed_quantile_split(tensor(x), tensor(x), 0.25, sigma=sigma, seed=2)
        errors.append(float(np.abs(to_numpy(high) - hard_high).mean()))
    assert errors[0] > errors[1] > errors[2] == 0.0, errors


def test_perturbed_mean_and_sorted_at_tiny_sigma(rng):
    values = normal(rng).astype("float32")
    scores = normal(rng).astype("float32")
    ordered = np.take_along_axis(values, np.argsort(scores, -1), -1)
    (low, high), (_, high_w) = ops.perturbed_quantile_split(
        values, scores, 0.25, sigma=1e-9, output="mean", seed=0, return_weights=True
    )
    np.testing.assert_allclose(to_numpy(low), ordered[:, :3].mean(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(high), ordered[:, -3:].mean(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(high_w).sum(-1), [3, 3])
    low, high = ops.perturbed_quantile_split(
        values, scores, 0.25, sigma=1e-9, output="sorted", seed=0
    )
    np.testing.assert_allclose(to_numpy(low), ordered[:, :3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(high), ordered[:, -3:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_and_shift_invariance(dtype, rng):
    x = normal(rng)
    base = to_numpy(ops.soft_quantile_masks(tensor(x, dtype), epsilon=1e-2))
    for scale, shift in [(1e-3, 0.0), (3.0, 5.0), (1e3, -2.0)]:
        moved = to_numpy(ops.soft_quantile_masks(tensor(x * scale + shift, dtype), epsilon=1e-2))
        np.testing.assert_allclose(moved, base, atol=1e-9 if dtype == "float64" else 2e-4)


def test_squash_scores_is_monotone_and_odd_about_one_half(rng):
    x = normal(rng).astype("float32")
    z = to_numpy(ops.squash_scores(tensor(x)))
    assert z.shape == x.shape
    order = np.argsort(x, -1)
    assert np.all(np.diff(np.take_along_axis(z, order, -1), axis=-1) >= 0)
    np.testing.assert_allclose(to_numpy(ops.squash_scores(tensor(-x))), 1 - z, atol=1e-6)
    np.testing.assert_allclose(to_numpy(ops.squash_scores(tensor(3.0 * x - 7.0))), z, atol=1e-5)
    valid = np.ones(SHAPE, bool)
    valid[0, 8:] = False
    masked = to_numpy(ops.squash_scores(tensor(np.where(valid, x, np.nan)), mask=tensor(valid)))
    np.testing.assert_allclose(masked[0, 8:], 0.5)
    assert np.all(np.isfinite(masked))


@pytest.mark.parametrize("dtype", DTYPES)
def test_newton_and_sinkhorn_solvers(dtype, rng):
    z = ops.squash_scores(tensor(normal(rng), dtype))
    a = keras.ops.ones_like(z) / N
    b = tensor([0.3, 0.4, 0.3], dtype)
    newton = ops.transport.solve_newton(z, a, b, 1e-2)
    sinkhorn = ops.transport.solve_sinkhorn(z, a, b, 1e-1)
    assert np.all(to_numpy(newton.converged)) and np.all(to_numpy(sinkhorn.converged))
    assert int(to_numpy(newton.iterations).max()) <= 10
    for result in (newton, sinkhorn):
        masses = to_numpy(keras.ops.sum(result.memberships, axis=1)).astype(np.float64) / N
        np.testing.assert_allclose(masses, [[0.3, 0.4, 0.3]] * 2, rtol=MASS_RTOL[dtype])
    far = tensor([[0.05, 0.1]] * 2, dtype)
    stopped = ops.transport.solve_newton(z, a, b, 1e-3, max_iterations=0, warm_start=far)
    assert not np.all(to_numpy(stopped.converged))
    x = tensor(normal(rng), dtype)
    for eps in (1e-1, 1e-2):
        newton = ops.soft_quantile_masks(x, epsilon=eps, solver="newton")
        sinkhorn = ops.soft_quantile_masks(x, epsilon=eps, solver="sinkhorn")
        np.testing.assert_allclose(to_numpy(newton), to_numpy(sinkhorn), atol=1e-5)


# --------------------------------------------------------------------------------------------
# Gradients (float64, through the backend's autodiff, against finite differences).
# --------------------------------------------------------------------------------------------


def _weighted_buckets(x, w):
    masks = ops.soft_quantile_masks(x, epsilon=0.05)
    return (masks[..., 0] - 2 * masks[..., 1] + 3 * masks[..., 2]) * w


# Losses `f(x, w)` of the scores `x` (differentiated) and constant weights `w` (a tensor).
GRADIENT_LOSSES = {
    "soft_quantile_masks": _weighted_buckets,
    "soft_topk_mask": lambda x, w: ops.soft_topk_mask(x, 3, epsilon=0.05) * w,
    "soft_quantile_split_sorted": lambda x, w: keras.ops.concatenate(
        ops.soft_quantile_split(w, x, 0.25, epsilon=0.05, output="sorted"), -1
    ),
    "soft_quantile_split_mean": lambda x, w: keras.ops.stack(
        ops.soft_quantile_split(w, x, 0.25, epsilon=0.05, output="mean"), -1
    ),
    "soft_sort": lambda x, w: ops.soft_sort(x, epsilon=0.1) * w,
    "soft_rank": lambda x, w: ops.soft_rank(x, epsilon=0.1) * w,
    "soft_quantile": lambda x, w: ops.soft_quantile(x, [0.3, 0.8], epsilon=0.1),
    "soft_sort_with": lambda x, w: ops.soft_sort_with(w, x, epsilon=0.1) * w,
    "squash_scores": lambda x, w: ops.squash_scores(x) * w,
}


def gradient_loss(op: str, w: np.ndarray):
    weights = tensor(w)
    return lambda x: GRADIENT_LOSSES[op](x, weights)


@needs_float64
@pytest.mark.parametrize("op", sorted(GRADIENT_LOSSES))
def test_gradient_matches_finite_differences(op, rng):
    check_gradient(gradient_loss(op, normal(rng)), normal(rng))


@needs_float64
def test_gradient_with_respect_to_epsilon(rng):
    x = tensor(normal(rng))
    w = tensor(normal(rng, (*SHAPE, 3)))

    def loss(eps):
        return keras.ops.sum(ops.soft_quantile_masks(x, epsilon=eps) * w)

    analytic = float(grad(loss, 0.05))
    numeric = (float(to_numpy(loss(0.05 + 1e-7))) - float(to_numpy(loss(0.05 - 1e-7)))) / 2e-7
    assert abs(analytic - numeric) < 1e-4 * max(1.0, abs(numeric)), (analytic, numeric)


@needs_float64
def test_gradient_through_the_newton_solver(rng):
    z0 = to_numpy(ops.squash_scores(tensor(normal(rng))))
    w = tensor(normal(rng, (*SHAPE, 3)))
    a = tensor(np.full(SHAPE, 1 / N))
    b = tensor([0.25, 0.5, 0.25])

    def loss(z):
        return ops.transport.solve_newton(z, a, b, 0.05).memberships * w

    check_gradient(loss, z0)


def test_float32_gradients_are_finite_and_nonzero(rng):
    x = normal(rng).astype("float32")
    w = normal(rng).astype("float32")
    for op in ("soft_topk_mask", "soft_sort_with"):
        g = grad(gradient_loss(op, w), x)
        assert g.dtype == np.float32
        assert np.all(np.isfinite(g)) and np.linalg.norm(g) > 1e-3, (op, g)


def test_hard_top_k_has_zero_gradient_soft_does_not(rng):
    scores = normal(rng).astype("float32")
    values = tensor(normal(rng).astype("float32"))

    def hard(s):
        return keras.ops.take_along_axis(values, keras.ops.top_k(s, 3)[1], axis=-1)

    def soft(s):
        return ops.soft_topk_mask(s, 3, epsilon=1e-2) * values

    assert np.all(grad(hard, scores) == 0)
    assert np.linalg.norm(grad(soft, scores)) > 1e-3


def test_perturbed_gradient_is_seeded_finite_and_nonzero(rng):
    values = tensor(normal(rng).astype("float32"))
    scores = normal(rng).astype("float32")

    def loss(s):
        low, high = ops.perturbed_quantile_split(
            values, s, 0.25, sigma=0.1, num_samples=200, output="mean", seed=(7, 7)
        )
        return low - high

    first, second = grad(loss, scores), grad(loss, scores)
    np.testing.assert_array_equal(first, second)
    assert np.all(np.isfinite(first)) and np.linalg.norm(first) > 1e-3


@pytest.mark.slow
@needs_float64
def test_perturbed_gradient_matches_the_smoothed_objective():
    """Monte-Carlo gradient against central differences with common random numbers."""
    values = tensor(np.random.default_rng(1).standard_normal((1, 8)))
    scores = np.random.default_rng(2).standard_normal((1, 8))
    direction = np.random.default_rng(3).standard_normal((1, 8))
    kwargs = {"sigma": 0.1, "num_samples": 200_000, "output": "mean", "seed": (7, 7)}

    def objective(x):
        low, high = ops.perturbed_quantile_split(values, x, 0.25, **kwargs)
        return low - high

    analytic = float(np.sum(grad(objective, scores) * direction))
    step = 2e-3
    numeric = (
        value(objective, scores + step * direction) - value(objective, scores - step * direction)
    ) / (2 * step)
    # Both sides are Monte-Carlo estimates (the TensorFlow suite saw 0.084-0.109 against
    # 0.093-0.098 over three seeds).
    np.testing.assert_allclose(analytic, numeric, rtol=0.2)


@pytest.mark.parametrize(
    "op",
    [
        lambda x: ops.soft_topk_mask(x, 2, epsilon=0.05),
        lambda x: ops.soft_rank(x, epsilon=0.1),
    ],
    ids=["soft_topk_mask", "soft_rank"],
)
def test_second_order_gradients_raise_not_implemented(op, rng):
    x = normal(rng).astype(WIDEST)
    w = tensor(normal(rng).astype(WIDEST))
    v = normal(rng).astype(WIDEST)
    with pytest.raises(NotImplementedError, match=r"(?i)second-order.*not supported"):
        second_order_gradient(lambda u: op(u) * w, x, v)


# --------------------------------------------------------------------------------------------
# Ties and extreme scores.
# --------------------------------------------------------------------------------------------

EXTREME_ROWS = {
    "ties_across_a_boundary": [1.0] * 5 + [2.0] * 4 + [0.0] * 3,
    "all_equal": [3.0] * N,
    "extreme_magnitudes": [1e30, -1e30, 0.0, 1.0, 2.0, -5.0, 1e30, 3.0, -1e30, 4.0, 5.0, 6.0],
    "many_ties": [0.0, 1.0] * (N // 2),
}


@pytest.mark.parametrize("eps", [1e-2, 1e-4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row", sorted(EXTREME_ROWS))
def test_ties_and_extreme_scores_are_finite_with_exact_masses(row, dtype, eps):
    x = np.array([EXTREME_ROWS[row], EXTREME_ROWS[row][::-1]])
    weights = tensor([[1.0, -2.0, 3.0]], dtype)

    def loss(v):
        return ops.soft_quantile_masks(v, epsilon=eps) * weights

    masks = to_numpy(ops.soft_quantile_masks(tensor(x, dtype), epsilon=eps)).astype(np.float64)
    g = grad(loss, x.astype(dtype))
    assert np.all(np.isfinite(masks)) and np.all(np.isfinite(g))
    np.testing.assert_allclose(masks.sum(1), [[3, 6, 3]] * 2, rtol=MASS_RTOL[dtype])
    topk = to_numpy(ops.soft_topk_mask(tensor(x, dtype), 3, epsilon=eps)).astype(np.float64)
    assert np.all(np.isfinite(topk))
    np.testing.assert_allclose(topk.sum(-1), 3.0, rtol=MASS_RTOL[dtype])
    for sorting in (ops.soft_sort, ops.soft_rank):
        out = to_numpy(sorting(tensor(x, dtype), epsilon=max(eps, 1e-3)))
        assert np.all(np.isfinite(out)), (sorting.__name__, out)


@needs_float64
def test_tiny_spread_is_finite_with_exact_masses():
    x = tensor(np.arange(24).reshape(SHAPE) * 1e-300)
    masks = to_numpy(ops.soft_quantile_masks(x, epsilon=1e-3))
    assert np.all(np.isfinite(masks))
    np.testing.assert_allclose(masks.sum(1), [[3, 6, 3]] * 2, rtol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_flushed_exp_is_exp_with_subnormal_results_zero(dtype):
    # PyTorch's CPU exp returns subnormals (and leaves its fast path for them); TensorFlow's
    # and XLA's kernels flush them. The memberships must not depend on the backend.
    from keras_softquantile.ops import _backend

    info = np.finfo(dtype)
    edge = float(np.log(info.tiny))
    x = np.array([0.0, -1.0, -50.0, edge + 0.01, edge - 0.01, -200.0, -1e4, -np.inf, np.nan])
    out = to_numpy(_backend.flushed_exp(tensor(x, dtype))).astype(np.float64)
    expected = np.exp(x.astype(dtype)).astype(np.float64)
    expected[(expected < info.tiny) & (expected > 0)] = 0.0
    np.testing.assert_allclose(out, expected, rtol=4 * float(info.eps), atol=0)
    assert out[3] >= info.tiny and out[4] == 0.0 and np.isnan(out[-1]), out


@pytest.mark.parametrize("dtype", DTYPES)
def test_memberships_at_tiny_epsilon_have_no_subnormal_entries(dtype, rng):
    masks = to_numpy(ops.soft_quantile_masks(tensor(normal(rng, (2, 200)), dtype), epsilon=1e-4))
    tiny = float(np.finfo(dtype).tiny)
    assert np.all((masks == 0) | (masks >= tiny)), masks[(masks > 0) & (masks < tiny)]
    assert np.any(masks == 0)  # far entries underflow: the case is exercised
    np.testing.assert_allclose(masks.sum(-2), [[50, 100, 50]] * 2, rtol=MASS_RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "jit"])
def test_rows_of_the_smallest_normal_scores_are_not_constant(dtype, compiled):
    # Their half-deviations from the median are subnormal, which TensorFlow and XLA flush to
    # zero: without lifting the row first, it looked constant (every membership 1/N).
    tiny = float(np.finfo(dtype).tiny)
    x = np.zeros(SHAPE)
    x[:, -5:] = tiny
    call = lambda v: ops.soft_topk_mask(v, 1.0, epsilon=0.1)  # noqa: E731
    masks = to_numpy((jit(call) if compiled else call)(tensor(x, dtype))).astype(np.float64)
    scaled = to_numpy(call(tensor(x * 2.0**20, dtype))).astype(np.float64)
    np.testing.assert_allclose(masks, scaled, atol=ATOL[dtype] * 10)
    assert np.all(masks[:, -5:] > 0.15) and np.all(masks[:, :-5] < 0.01), masks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "jit"])
def test_a_tiny_median_absolute_deviation_is_not_flushed_to_zero(dtype, compiled):
    # Eight 0s, the smallest normal number, eight 1s: the median is the tiny entry and so is
    # the MAD, whose half is subnormal. Flushed to zero, the squashing fell back to the mean
    # absolute deviation and the 0s took top-1 mass (0.0015 each); the same row times 4 gave
    # 1e-170. Found by the property suite (scaling by a power of two changes nothing).
    tiny = float(np.finfo(dtype).tiny)
    x = np.array([[0.0] * 8 + [1.0] * 8 + [tiny], [0.0] * 8 + [1.0] * 8 + [2.0**-20]])
    call = lambda v: ops.soft_topk_mask(v, 1.0, epsilon=0.1)  # noqa: E731
    run = jit(call) if compiled else call
    masks = to_numpy(run(tensor(x, dtype))).astype(np.float64)
    scaled = to_numpy(run(tensor(x * 4.0, dtype))).astype(np.float64)
    np.testing.assert_allclose(masks, scaled, atol=ATOL[dtype] * 10)
    # The MAD is tiny next to the 1s, which share the top-1 mass nearly alone.
    np.testing.assert_allclose(masks[:, 8:16], 0.125, atol=1e-6)
    assert np.all(masks[:, :8] < 1e-6), masks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "jit"])
def test_sorting_ops_of_rows_at_the_largest_value_stay_finite(dtype, compiled):
    # Ten entries at float32's largest value: the barycentres summed them to inf. Under XLA,
    # which rewrites x / 2 + y / 2 as (x + y) / 2, halving did not prevent it.
    largest = float(np.finfo(dtype).max)
    x = np.array([[largest] * N, [largest] * (N - 1) + [-largest]])

    def quantiles(v):
        return ops.soft_quantile(v, (0.1, 0.5, 0.9), epsilon=0.1)

    out = to_numpy((jit(quantiles) if compiled else quantiles)(tensor(x, dtype)))
    out = out.astype(np.float64)
    assert np.all(np.isfinite(out)) and np.all(np.abs(out) <= largest), out
    np.testing.assert_allclose(out[0], [largest] * 3, rtol=MASS_RTOL[dtype])
    for sorting in (ops.soft_sort, ops.soft_rank):
        got = to_numpy(sorting(tensor(x, dtype), epsilon=0.1)).astype(np.float64)
        assert np.all(np.isfinite(got)), (sorting.__name__, got)
    ordered = to_numpy(ops.soft_sort(tensor(x[:1], dtype))).astype(np.float64)
    np.testing.assert_allclose(ordered, x[:1], rtol=MASS_RTOL[dtype])
    g = grad(lambda v: quantiles(v) * tensor([[1.0, -2.0, 3.0]], dtype), x[:1].astype(dtype))
    assert np.all(np.isfinite(g)), g


OUTLIER_ROW = [-1e6, 0.0236, 0.1463, 0.0278, -0.0248, -0.1425, -0.0191, -0.0020, 0.3, 0.5]
OUTLIER_ROWS = [[*OUTLIER_ROW, 0.7, -0.4], [*OUTLIER_ROW[::-1], 0.9, -0.8]]


@pytest.mark.parametrize("op", ["soft_sort", "soft_rank"])
def test_outlier_row_gives_the_hard_sort_at_small_epsilon(op):
    x = np.array(OUTLIER_ROWS)
    hard = np.sort(x, -1) if op == "soft_sort" else hard_ranks(x)
    got = to_numpy(getattr(ops, op)(tensor(x, WIDEST), epsilon=1e-4))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, hard, atol=1e-3, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("op", ["soft_sort", "soft_rank"])
def test_outlier_row_is_finite_in_float32_under_jit(op):
    x = np.array(OUTLIER_ROWS)
    hard = np.sort(x, -1) if op == "soft_sort" else hard_ranks(x)
    jitted = to_numpy(jit(lambda v: getattr(ops, op)(v, epsilon=1e-4))(tensor(x, "float32")))
    assert np.all(np.isfinite(jitted)), jitted
    np.testing.assert_allclose(jitted, hard, atol=1e-3, rtol=1e-6)


@pytest.mark.parametrize("all_equal", [False, True])
def test_all_equal_scores_share_memberships_in_float32(all_equal):
    x = tensor([[2.0] * N] * 2 if all_equal else [[2.0] * (N - 1) + [3.0]] * 2, "float32")
    masks = to_numpy(ops.soft_quantile_masks(x, epsilon=1e-3))
    assert np.all(np.isfinite(masks))
    np.testing.assert_allclose(masks.sum(1), [[3, 6, 3]] * 2, rtol=1e-4)
    if all_equal:
        np.testing.assert_allclose(masks[0], np.tile([0.25, 0.5, 0.25], (N, 1)), atol=2e-5)


# --------------------------------------------------------------------------------------------
# Masks, padding, batching and axes.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_padding_mask_excludes_garbage(dtype, rng):
    x = normal(rng)
    valid = np.ones(SHAPE, bool)
    valid[0, 8:] = False
    garbage = np.where(valid, x, np.nan)  # padding may hold anything, NaN included
    masks = to_numpy(ops.soft_quantile_masks(tensor(garbage, dtype), epsilon=1e-2, mask=valid))
    assert np.all(masks[0, 8:] == 0)
    np.testing.assert_allclose(masks[0].astype(np.float64).sum(0), [2, 4, 2], MASS_RTOL[dtype])
    alone = to_numpy(ops.soft_quantile_masks(tensor(x[:, :8], dtype), epsilon=1e-2))
    np.testing.assert_allclose(masks[0, :8], alone[0], atol=ATOL[dtype])
    w = tensor(rng.random(SHAPE), dtype)
    g = grad(
        lambda v: ops.soft_quantile_masks(v, epsilon=1e-2, mask=tensor(valid))[..., 2] * w,
        garbage.astype(dtype),
    )
    assert np.all(np.isfinite(g)) and np.all(g[0, 8:] == 0)


def test_fully_masked_row_is_zero_and_topk_uses_each_rows_length(rng):
    x = tensor(normal(rng).astype("float32"))
    valid = np.array([[True] * N, [True] * 3 + [False] * (N - 3)])
    mask = to_numpy(ops.soft_topk_mask(x, 3, epsilon=1e-2, mask=valid))
    np.testing.assert_allclose(mask.sum(-1), [3, 3], rtol=1e-5)
    np.testing.assert_allclose(mask[1, :3], 1.0)
    assert np.all(mask[1, 3:] == 0)
    empty = to_numpy(
        ops.soft_quantile_masks(x, epsilon=1e-2, mask=np.array([[True] * N, [False] * N]))
    )
    assert np.all(empty[1] == 0) and np.isclose(empty[0].sum(), N, rtol=1e-5)


def test_perturbed_padding_is_excluded(rng):
    x = normal(rng).astype("float32")
    valid = np.array([[True] * 8 + [False] * 4] * 2)
    padded = tensor(np.where(valid, x, np.nan))
    _, high = ops.perturbed_quantile_split(padded, padded, 0.25, mask=tensor(valid), seed=0)
    high = to_numpy(high)
    np.testing.assert_array_equal(high[:, 8:], 0.0)
    np.testing.assert_allclose(high.sum(-1), [2, 2])


def test_batching_and_a_non_last_axis(rng):
    x = normal(rng, (1, N, 2))  # two rows of N along axis 1
    masks = to_numpy(ops.soft_quantile_masks(tensor(x, WIDEST), epsilon=1e-2, axis=1))
    assert masks.shape == (1, N, 2, 3)
    rows = tensor(np.moveaxis(x[0], 0, -1), WIDEST)  # [2, N]: the same rows, axis last
    single = to_numpy(ops.soft_quantile_masks(rows, epsilon=1e-2))
    np.testing.assert_allclose(np.moveaxis(masks[0], 0, 1), single, atol=ATOL[WIDEST])
    ranks = to_numpy(ops.soft_rank(tensor(np.moveaxis(x[0], 0, -1), WIDEST), epsilon=1e-2))
    by_axis = to_numpy(ops.soft_rank(tensor(x[0], WIDEST), epsilon=1e-2, axis=0))
    np.testing.assert_allclose(by_axis, ranks.T, atol=ATOL[WIDEST])


# --------------------------------------------------------------------------------------------
# Bad input: the same errors, naming the argument.
# --------------------------------------------------------------------------------------------

X = np.random.default_rng(50).standard_normal(SHAPE).astype("float32")
BAD_CALLS = [
    (lambda x: ops.soft_quantile_masks(np.arange(N), epsilon=0.1), TypeError, "scores"),
    (lambda x: ops.soft_quantile_masks(x, epsilon=0.0), ValueError, "epsilon=0.0"),
    (lambda x: ops.soft_quantile_masks(x, epsilon=-1), ValueError, "epsilon=-1"),
    (lambda x: ops.soft_quantile_masks(x, epsilon="small"), TypeError, "epsilon"),
    (lambda x: ops.soft_quantile_masks(x, epsilon=1e-9), ValueError, "epsilon"),
    (lambda x: ops.soft_quantile_masks(x, (0.5, 0.25)), ValueError, "increasing"),
    (lambda x: ops.soft_quantile_masks(x, (0.0, 0.5)), ValueError, "quantiles"),
    (lambda x: ops.soft_quantile_masks(x, axis=2), ValueError, "axis=2"),
    (lambda x: ops.soft_quantile_masks(x, axis=1.5), TypeError, "axis"),
    (lambda x: ops.soft_quantile_masks(x, solver="lbfgs"), ValueError, "solver"),
    (lambda x: ops.soft_quantile_masks(x, mask=np.ones(SHAPE)), TypeError, "mask"),
    (lambda x: ops.soft_quantile_masks(x, mask=np.ones((2, N - 1), bool)), ValueError, "mask"),
    (lambda x: ops.soft_quantile_masks(np.float32(1.0)), ValueError, "scores"),
    (lambda x: ops.soft_quantile_masks(np.zeros((2, 0), "float32")), ValueError, "scores"),
    (lambda x: ops.soft_quantile_masks([[1.0, 2.0], [3.0]]), ValueError, "scores"),
    (lambda x: ops.soft_topk_mask(x, -1), ValueError, "k=-1"),
    (lambda x: ops.soft_topk_mask(x, N + 1), ValueError, f"k={N + 1}"),
    (lambda x: ops.soft_topk_mask(x, "3"), TypeError, "k="),
    (lambda x: ops.soft_quantile_split(x, x, 0.6), ValueError, "quantile=0.6"),
    (lambda x: ops.soft_quantile_split(x, x, 0.0), ValueError, "quantile=0.0"),
    (lambda x: ops.soft_quantile_split(x[:, :-1], x), ValueError, "values"),
    (lambda x: ops.soft_quantile_split(np.ones(SHAPE, int), x), TypeError, "values"),
    (lambda x: ops.soft_quantile_split(x, x, output="median"), ValueError, "output"),
    (lambda x: ops.soft_quantile_split(x, x, output="sorted", mask=x > 0), ValueError, "mask"),
    (lambda x: ops.soft_sort(x, solver="exact"), ValueError, "solver"),
    (lambda x: ops.soft_rank(np.ones(SHAPE, "int32")), TypeError, "x"),
    (lambda x: ops.soft_quantile(x, 1.5), ValueError, "q"),
    (lambda x: ops.soft_quantile(x, [[0.5]]), ValueError, "q"),
    (lambda x: ops.soft_sort_with(x[:, :-1], x), ValueError, "values"),
    (lambda x: ops.perturbed_quantile_split(x, x, sigma=0.0), ValueError, "sigma"),
    (lambda x: ops.perturbed_quantile_split(x, x, num_samples=1), ValueError, "num_samples"),
    (lambda x: ops.perturbed_quantile_split(x, x, num_samples=2.5), TypeError, "num_samples"),
    (lambda x: ops.perturbed_quantile_split(x, x, seed=(1, 2, 3)), ValueError, "seed"),
    (lambda x: ops.transport.solve_newton(x[0], x, [0.5, 0.5], 0.1), ValueError, "z"),
]


@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "tensor"])
@pytest.mark.parametrize(
    ("call", "error", "text"), BAD_CALLS, ids=[f"{i}-{c[2]}" for i, c in enumerate(BAD_CALLS)]
)
def test_bad_arguments_raise_naming_the_argument(call, error, text, as_tensor):
    with pytest.raises(error, match=text):
        call(tensor(X) if as_tensor else X)


def test_tensor_epsilon_is_checked():
    with pytest.raises(ValueError, match="epsilon"):
        ops.soft_topk_mask(X, 2, epsilon=tensor(-0.5, "float32"))
    with pytest.raises(ValueError, match="epsilon"):
        ops.soft_topk_mask(X, 2, epsilon=tensor([0.1, 0.2], "float32"))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda x: ops.soft_topk_mask(x, 2), "scores"),
        (lambda x: ops.soft_quantile_masks(x), "scores"),
        (lambda x: ops.soft_quantile_split(keras.ops.zeros_like(x), x), "scores"),
        (lambda x: ops.perturbed_quantile_split(keras.ops.zeros_like(x), x, seed=1), "scores"),
        (lambda x: ops.soft_sort(x), "x"),
        (lambda x: ops.soft_rank(x), "x"),
        (lambda x: ops.soft_quantile(x, 0.5), "x"),
    ],
    ids=[
        "soft_topk_mask",
        "soft_quantile_masks",
        "soft_quantile_split",
        "perturbed_quantile_split",
        "soft_sort",
        "soft_rank",
        "soft_quantile",
    ],
)
def test_eager_non_finite_scores_raise_naming_the_argument(call, name, bad):
    x = X.copy()
    x[1, 3] = bad
    with pytest.raises(ValueError, match=f"`{name}`"):
        call(tensor(x))


# --------------------------------------------------------------------------------------------
# Compiled (jit) against eager.
# --------------------------------------------------------------------------------------------

JIT_CALLS = {
    "soft_quantile_masks": lambda x: ops.soft_quantile_masks(x, epsilon=1e-3),
    "soft_topk_mask": lambda x: ops.soft_topk_mask(x, 5, epsilon=1e-2),
    "soft_quantile_split": lambda x: ops.soft_quantile_split(x, x, epsilon=1e-2, output="mean"),
    "soft_quantile_split_sorted": lambda x: ops.soft_quantile_split(
        x, x, epsilon=1e-2, output="sorted"
    ),
    "soft_sort": lambda x: ops.soft_sort(x, epsilon=1e-2),
    "soft_rank": lambda x: ops.soft_rank(x, epsilon=1e-2),
    "soft_quantile": lambda x: ops.soft_quantile(x, [0.1, 0.5], epsilon=1e-2),
}
# Each (op, dtype) is one compilation (seconds on TensorFlow's XLA): the float64 ones and the
# split variants are left to the full runs.
FAST_JIT = {("soft_quantile_masks", "float32"), ("soft_topk_mask", "float32")}


def _jit_cases():
    for op in sorted(JIT_CALLS):
        for dtype in ("float64", "float32"):
            marks = [needs_float64] if dtype == "float64" else []
            if (op, dtype) not in FAST_JIT:
                marks.append(pytest.mark.slow)
            yield pytest.param(op, dtype, marks=marks, id=f"{op}-{dtype}")


@pytest.mark.parametrize(("op", "dtype"), list(_jit_cases()))
def test_jit_agrees_with_eager(op, dtype, rng):
    x = tensor(normal(rng), dtype)
    eager = to_numpy(JIT_CALLS[op](x))
    compiled = to_numpy(jit(JIT_CALLS[op])(x))
    # A compiled erfc may differ by an ulp of z near 0.5 (6e-8 in float32), which moves a
    # boundary entry's membership by up to 0.25 * 6e-8 / epsilon.
    atol = 1e-10 if dtype == "float64" else 5e-5
    for c, e in zip(keras.tree.flatten(compiled), keras.tree.flatten(eager), strict=True):
        np.testing.assert_allclose(c, e, atol=atol, rtol=1e-5 if dtype == "float32" else 1e-9)


@pytest.mark.slow
def test_perturbed_split_under_jit_keeps_exact_masses(rng):
    # The compiled random draws may differ from the eager ones: only the masses must agree.
    x = tensor(normal(rng).astype("float32"))
    split = jit(lambda v: ops.perturbed_quantile_split(v, v, num_samples=8, seed=(1, 2)))
    low, high = to_numpy(split(x))
    np.testing.assert_allclose(low.sum(-1), 3.0, rtol=1e-6)
    np.testing.assert_allclose(high.sum(-1), 3.0, rtol=1e-6)


@pytest.mark.parametrize(
    "dtype", [F32, pytest.param("float64", marks=[needs_float64, pytest.mark.slow])]
)
def test_jit_gradient_agrees_with_eager(dtype, rng):
    x = normal(rng).astype(dtype)
    w = tensor(normal(rng), dtype)

    def loss(v):
        return ops.soft_quantile_masks(v, epsilon=1e-2)[..., 2] * w

    eager = grad(loss, x)
    atol = 1e-10 if dtype == "float64" else 1e-4
    # The gradient compiled as a train step is (jit of grad), and a compiled function
    # differentiated (grad of jit).
    np.testing.assert_allclose(jit_grad(loss, x), eager, atol=atol)
    np.testing.assert_allclose(grad(jit(loss), x), eager, atol=atol)


@needs_tracing_jit
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    "op",
    [
        lambda x: ops.soft_topk_mask(x, 2, epsilon=1e-2),
        lambda x: ops.soft_quantile_masks(x, epsilon=1e-2),
        pytest.param(lambda x: ops.soft_rank(x, epsilon=1e-2), marks=pytest.mark.slow),
    ],
    ids=["soft_topk_mask", "soft_quantile_masks", "soft_rank"],
)
def test_non_finite_row_is_nan_alone_under_jit(op, bad, rng):
    x = normal(rng, (3, N)).astype("float32")
    x[1, 2] = bad
    got = to_numpy(jit(op)(tensor(x)))
    assert np.all(np.isnan(got[1])), f"the row holding {bad} gave {got[1].tolist()}, not NaN"
    clean = to_numpy(op(tensor(x[[0, 2]])))
    assert np.all(np.isfinite(got[[0, 2]])), got
    np.testing.assert_allclose(got[[0, 2]], clean, atol=5e-5)


@needs_tracing_jit
def test_negative_tensor_epsilon_under_jit_gives_nan(rng):
    x = tensor(normal(rng).astype("float32"))
    topk = jit(lambda v, e: ops.soft_topk_mask(v, 2, epsilon=e))
    got = to_numpy(topk(x, tensor(-1e-2, "float32")))
    assert np.all(np.isnan(got)), got


def test_ops_inside_a_keras_model_predict(rng):
    """A functional model over the op: Keras's symbolic call and its compiled predict."""

    class TopK(keras.layers.Layer):
        def call(self, x):
            return ops.soft_topk_mask(x, 3, epsilon=1e-2)

    inputs = keras.Input((N,))
    model = keras.Model(inputs, TopK()(keras.layers.Dense(N)(inputs)))
    x = normal(rng, (4, N)).astype("float32")
    out = model.predict(x, verbose=0)
    assert out.shape == (4, N)
    np.testing.assert_allclose(out.sum(-1), 3.0, rtol=1e-4)
    np.testing.assert_allclose(out, to_numpy(model(x)), atol=1e-5)
