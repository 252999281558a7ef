"""Tests of soft_quantile_masks, soft_topk_mask and soft_quantile_split."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

import keras_softquantile as ksq
from keras_softquantile import ops


def hard_ranks(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.argsort(np.argsort(x, axis=axis, kind="stable"), axis=axis, kind="stable")


def finite_difference_gradient(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = h
        grad[index] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


def tape_gradient(f, x: np.ndarray) -> np.ndarray:
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = f(xt)
    return tape.gradient(y, xt).numpy()


MODES = ["eager", "function", "xla"]


def run(mode: str, f, *args):
    if mode == "eager":
        return f(*args)
    return tf.function(f, jit_compile=(mode == "xla"))(*args)


class TestQuantileMasks:
    @pytest.mark.parametrize("dtype", [tf.float64, tf.float32])
    @pytest.mark.parametrize("n", [10, 37, 1000])
    def test_bucket_masses_exact(self, dtype, n):
        x = tf.constant(np.random.default_rng(n).standard_normal((4, n)), dtype)
        masks, info = ops.soft_quantile_masks(x, epsilon=1e-3, return_diagnostics=True)
        expected = np.array([0.25, 0.5, 0.25]) * n  # fractional for n = 10, 37
        sums = tf.reduce_sum(tf.cast(masks, tf.float64), axis=1).numpy()
        tolerance = 1e-9 if dtype == tf.float64 else 1e-4
        np.testing.assert_allclose(sums, np.broadcast_to(expected, sums.shape), rtol=tolerance)
        np.testing.assert_allclose(tf.reduce_sum(masks, -1).numpy(), 1.0, atol=tolerance)
        assert bool(tf.reduce_all(info.converged))

    def test_sharpness_at_epsilon_1e3(self):
        x = np.random.default_rng(0).standard_normal((8, 1000))
        masks = ops.soft_quantile_masks(tf.constant(x, tf.float32), epsilon=1e-3).numpy()
        hard_upper = hard_ranks(x) >= 750
        mad = np.abs(masks[..., 2] - hard_upper).mean()
        assert mad <= 2e-3, mad
        assert mad > 0  # soft, not a disguised hard op

    def test_converges_to_hard_buckets(self):
        x = np.random.default_rng(1).standard_normal((3, 200))
        ranks = hard_ranks(x)
        hard = np.stack([ranks < 50, (ranks >= 50) & (ranks < 150), ranks >= 150], -1)
        errors = [
            np.abs(ops.soft_quantile_masks(tf.constant(x), epsilon=e).numpy() - hard).mean()
            for e in (1e-1, 1e-2, 1e-3, 1e-5)
        ]
        assert all(b < a for a, b in itertools.pairwise(errors)), errors
        assert errors[-1] < 1e-6

    def test_general_quantiles_use_more_buckets(self):
        x = np.random.default_rng(2).standard_normal((2, 500))
        levels = (0.1, 0.3, 0.5, 0.9)
        masks = ops.soft_quantile_masks(tf.constant(x), levels, epsilon=1e-3)
        assert masks.shape == (2, 500, 5)
        np.testing.assert_allclose(
            tf.reduce_sum(masks, 1).numpy(), np.tile([50, 100, 100, 200, 50], (2, 1)), rtol=1e-9
        )

    def test_scale_and_shift_invariance(self):
        x = np.random.default_rng(3).standard_normal((2, 50))
        base = ops.soft_quantile_masks(tf.constant(x), epsilon=1e-2).numpy()
        for scale, shift in [(1e-6, 0.0), (3.0, 5.0), (1e6, -2.0)]:
            scaled = ops.soft_quantile_masks(tf.constant(x * scale + shift), epsilon=1e-2).numpy()
            np.testing.assert_allclose(scaled, base, atol=1e-9)

    def test_newton_and_sinkhorn_agree(self):
        x = tf.constant(np.random.default_rng(4).standard_normal((3, 60)))
        for eps in (1e-1, 1e-2):
            newton = ops.soft_quantile_masks(x, epsilon=eps, solver="newton")
            sinkhorn = ops.soft_quantile_masks(x, epsilon=eps, solver="sinkhorn")
            np.testing.assert_allclose(newton.numpy(), sinkhorn.numpy(), atol=1e-6)

    def test_batching_and_non_last_axis(self):
        x = np.random.default_rng(5).standard_normal((2, 3, 40, 4))
        masks = ops.soft_quantile_masks(tf.constant(x), epsilon=1e-2, axis=2)
        assert masks.shape == (2, 3, 40, 4, 3)
        moved = ops.soft_quantile_masks(tf.constant(np.moveaxis(x, 2, -1)), epsilon=1e-2)
        np.testing.assert_allclose(np.moveaxis(masks.numpy(), 2, -2), moved.numpy(), atol=1e-12)
        single = ops.soft_quantile_masks(tf.constant(x[1, 2, :, 3]), epsilon=1e-2)
        np.testing.assert_allclose(masks.numpy()[1, 2, :, 3], single.numpy(), atol=1e-12)

    def test_padding_mask(self):
        rng = np.random.default_rng(6)
        x = rng.standard_normal((2, 12))
        valid = np.ones((2, 12), bool)
        valid[0, 8:] = False
        garbage = np.where(valid, x, np.nan)  # padding may hold anything, NaN included
        masks = ops.soft_quantile_masks(tf.constant(garbage), epsilon=1e-2, mask=valid)
        assert np.all(masks.numpy()[0, 8:] == 0)
        np.testing.assert_allclose(masks.numpy()[0].sum(0), [2, 4, 2], rtol=1e-9)
        alone = ops.soft_quantile_masks(tf.constant(x[0, :8]), epsilon=1e-2)
        np.testing.assert_allclose(masks.numpy()[0, :8], alone.numpy(), atol=1e-12)
        with tf.GradientTape() as tape:
            xt = tf.constant(garbage)
            tape.watch(xt)
            loss = tf.reduce_sum(
                ops.soft_quantile_masks(xt, epsilon=1e-2, mask=valid)[..., 2] * rng.random((2, 12))
            )
        grad = tape.gradient(loss, xt).numpy()
        assert np.all(np.isfinite(grad)) and np.all(grad[0, 8:] == 0)

    def test_fully_masked_row_is_zero(self):
        x = tf.constant(np.random.default_rng(7).standard_normal((2, 6)))
        valid = np.array([[True] * 6, [False] * 6])
        masks = ops.soft_quantile_masks(x, epsilon=1e-2, mask=valid).numpy()
        assert np.all(masks[1] == 0) and np.isclose(masks[0].sum(), 6)

    @pytest.mark.parametrize("eps", [1e-1, 1e-2])
    def test_gradient_matches_finite_differences(self, eps):
        rng = np.random.default_rng(8)
        x = rng.standard_normal((2, 8))
        weights = rng.standard_normal((2, 8, 3))

        def loss(v):
            return tf.reduce_sum(ops.soft_quantile_masks(tf.constant(v), epsilon=eps) * weights)

        analytic = tape_gradient(lambda v: loss(v), x)
        numeric = finite_difference_gradient(lambda v: float(loss(v)), x)
        error = np.linalg.norm(analytic - numeric) / np.linalg.norm(numeric)
        assert error < 1e-4, error
        assert np.linalg.norm(numeric) > 1e-3  # a nonzero gradient, unlike the hard op

    def test_gradient_with_respect_to_epsilon(self):
        x = tf.constant(np.random.default_rng(9).standard_normal((1, 10)))
        w = tf.constant(np.random.default_rng(10).standard_normal((1, 10, 3)))

        def loss(eps):
            return tf.reduce_sum(ops.soft_quantile_masks(x, epsilon=eps) * w)

        eps = tf.Variable(0.05, dtype=tf.float64)
        with tf.GradientTape() as tape:
            value = loss(eps)
        analytic = float(tape.gradient(value, eps))
        numeric = (float(loss(0.05 + 1e-7)) - float(loss(0.05 - 1e-7))) / 2e-7
        assert abs(analytic - numeric) < 1e-4 * max(1.0, abs(numeric))

    @pytest.mark.parametrize(
        "x",
        [
            [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 0.0, 0.0],  # ties across a boundary
            [3.0] * 8,  # all equal
            [1e30, -1e30, 0.0, 1.0, 2.0, -5.0, 1e30, 3.0],  # extreme magnitudes
            [0.0, 1e-300, 2e-300, 3e-300, 4e-300, 5e-300, 6e-300, 7e-300],  # tiny spread
        ],
    )
    @pytest.mark.parametrize("eps", [1e-2, 1e-4])
    def test_extreme_inputs_are_finite_with_exact_masses(self, x, eps):
        xt = tf.constant([x], tf.float64)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            masks = ops.soft_quantile_masks(xt, epsilon=eps)
            loss = tf.reduce_sum(masks * tf.constant([[1.0, -2.0, 3.0]], tf.float64))
        grad = tape.gradient(loss, xt).numpy()
        assert np.all(np.isfinite(masks.numpy())) and np.all(np.isfinite(grad))
        np.testing.assert_allclose(masks.numpy().sum(1), [[2, 4, 2]], rtol=1e-9)

    @pytest.mark.parametrize(("dtype", "atol"), [("float32", 2e-5), ("float64", 1e-10)])
    def test_all_equal_scores_share_memberships(self, dtype, atol):
        # To the solver's default tolerance of the total mass (1e-5 and 1e-11).
        x = tf.constant([[2.0] * 8], dtype)
        masks = ops.soft_quantile_masks(x, epsilon=1e-3).numpy()
        np.testing.assert_allclose(masks[0], np.tile([0.25, 0.5, 0.25], (8, 1)), atol=atol)

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
    @pytest.mark.slow
    def test_eager_function_and_xla_agree(self, mode, dtype):
        x = tf.constant(np.random.default_rng(11).standard_normal((3, 100)), dtype)
        expected = ops.soft_quantile_masks(x, epsilon=1e-3)
        got = run(mode, lambda v: ops.soft_quantile_masks(v, epsilon=1e-3), x)
        # XLA's erfc may differ from TensorFlow's by an ulp of z near 0.5 (6e-8 in float32),
        # which moves a boundary entry's membership by up to 0.25 * 6e-8 / epsilon = 1.5e-5.
        atol = 1e-12 if dtype == tf.float64 else 5e-5
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=atol)

    @pytest.mark.slow
    def test_xla_gradient_matches_eager(self):
        x = tf.constant(np.random.default_rng(12).standard_normal((2, 50)))

        def grad(v):
            with tf.GradientTape() as tape:
                tape.watch(v)
                loss = tf.reduce_sum(ops.soft_quantile_masks(v, epsilon=1e-2)[..., 2] * v)
            return tape.gradient(loss, v)

        np.testing.assert_allclose(
            tf.function(grad, jit_compile=True)(x).numpy(), grad(x).numpy(), atol=1e-10
        )

    @pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
    def test_half_precision_returns_input_dtype(self, dtype):
        x = tf.cast(tf.constant(np.random.default_rng(13).standard_normal((2, 64))), dtype)
        masks = ops.soft_quantile_masks(x, epsilon=1e-2)
        assert masks.dtype == dtype
        reference = ops.soft_quantile_masks(tf.cast(x, tf.float32), epsilon=1e-2)
        np.testing.assert_allclose(tf.cast(masks, tf.float32).numpy(), reference.numpy(), atol=1e-2)

    def test_robust_on_a_large_batch_at_small_epsilon(self):
        rng = np.random.default_rng(14)
        x = np.concatenate(
            [
                rng.standard_normal((64, 1000)),
                rng.standard_cauchy((64, 1000)),  # heavy tails
                np.round(rng.standard_normal((64, 1000)) * 3),  # many ties
                rng.exponential(size=(64, 1000)) ** 4,  # skewed
            ]
        )
        _, info = ops.soft_quantile_masks(
            tf.constant(x, tf.float32), epsilon=5e-4, return_diagnostics=True
        )
        assert bool(tf.reduce_all(info.converged)), info.marginal_error.numpy().max()
        assert int(tf.reduce_max(info.iterations)) <= 20


class TestTopKMask:
    @pytest.mark.parametrize("k", [0, 1, 3, 7.5, 10])
    def test_mass_and_selection(self, k):
        x = np.random.default_rng(20).standard_normal((3, 10))
        mask = ops.soft_topk_mask(tf.constant(x), k, epsilon=1e-4).numpy()
        np.testing.assert_allclose(mask.sum(-1), k, atol=1e-9)
        assert np.all((mask >= 0) & (mask <= 1))
        top = hard_ranks(x) >= 10 - int(k)
        if float(k).is_integer():
            np.testing.assert_allclose(mask, top, atol=1e-6)

    def test_largest_scores_are_selected(self):
        x = np.random.default_rng(21).standard_normal(1000)
        mask = ops.soft_topk_mask(tf.constant(x, tf.float32), 100, epsilon=1e-3).numpy()
        chosen = np.argsort(-mask)[:100]
        assert set(chosen) == set(np.argsort(-x)[:100])

    def test_is_two_bucket_quantile_mask(self):
        x = tf.constant(np.random.default_rng(22).standard_normal((2, 40)))
        topk = ops.soft_topk_mask(x, 10, epsilon=1e-2)
        masks = ops.soft_quantile_masks(x, (0.75,), epsilon=1e-2)
        np.testing.assert_allclose(topk.numpy(), masks.numpy()[..., 1], atol=1e-12)

    def test_masked_rows_use_their_own_length(self):
        x = tf.constant(np.random.default_rng(23).standard_normal((2, 10)))
        valid = np.ones((2, 10), bool)
        valid[1, 3:] = False
        mask = ops.soft_topk_mask(x, 3, epsilon=1e-2, mask=valid).numpy()
        np.testing.assert_allclose(mask.sum(-1), [3, 3], atol=1e-9)
        np.testing.assert_allclose(mask[1, :3], 1.0)  # k equals the valid length
        assert np.all(mask[1, 3:] == 0)

    def test_gradient_matches_finite_differences(self):
        rng = np.random.default_rng(24)
        x = rng.standard_normal((6,))
        w = rng.standard_normal((6,))

        def loss(v):
            return tf.reduce_sum(ops.soft_topk_mask(tf.constant(v), 2, epsilon=0.05) * w)

        analytic = tape_gradient(lambda v: loss(v), x)
        numeric = finite_difference_gradient(lambda v: float(loss(v)), x)
        assert np.linalg.norm(analytic - numeric) / np.linalg.norm(numeric) < 1e-4

    def test_hard_top_k_has_zero_gradient_soft_does_not(self):
        rng = np.random.default_rng(25)
        scores = tf.constant(rng.standard_normal(10))
        values = tf.constant(rng.standard_normal(10))
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(scores)
            hard = tf.reduce_sum(tf.gather(values, tf.math.top_k(scores, 3).indices))
            soft = tf.reduce_sum(ops.soft_topk_mask(scores, 3, epsilon=1e-2) * values)
        zero = tf.UnconnectedGradients.ZERO
        hard_grad = tape.gradient(hard, scores, unconnected_gradients=zero).numpy()
        assert np.all(hard_grad == 0)
        assert np.linalg.norm(tape.gradient(soft, scores).numpy()) > 1e-3


class TestQuantileSplit:
    def setup_method(self):
        rng = np.random.default_rng(30)
        # Distinct scores at least 0.1 apart, so epsilon = 1e-5 is effectively hard.
        self.scores = np.stack([rng.permutation(np.linspace(-2, 2, 40)) for _ in range(3)])
        self.values = rng.standard_normal((3, 40))
        order = np.argsort(self.scores, axis=-1)
        self.sorted_values = np.take_along_axis(self.values, order, -1)

    def test_weights_are_outer_buckets(self):
        low, high = ops.soft_quantile_split(self.values, self.scores, 0.25, epsilon=1e-2)
        masks = ops.soft_quantile_masks(tf.constant(self.scores), (0.25, 0.75), epsilon=1e-2)
        np.testing.assert_allclose(low.numpy(), masks.numpy()[..., 0], atol=1e-12)
        np.testing.assert_allclose(high.numpy(), masks.numpy()[..., 2], atol=1e-12)

    def test_mean_converges_to_hard_means(self):
        low, high = ops.soft_quantile_split(
            self.values, self.scores, 0.25, epsilon=1e-5, output="mean"
        )
        np.testing.assert_allclose(low.numpy(), self.sorted_values[:, :10].mean(-1), atol=1e-6)
        np.testing.assert_allclose(high.numpy(), self.sorted_values[:, -10:].mean(-1), atol=1e-6)

    @pytest.mark.parametrize("solver", ["auto", "sinkhorn"])
    def test_sorted_converges_to_hard_gather(self, solver):
        low, high = ops.soft_quantile_split(
            self.values, self.scores, 0.25, epsilon=1e-5, output="sorted", solver=solver
        )
        assert low.shape == high.shape == (3, 10)
        np.testing.assert_allclose(low.numpy(), self.sorted_values[:, :10], atol=1e-6)
        np.testing.assert_allclose(high.numpy(), self.sorted_values[:, -10:], atol=1e-6)

    def test_sorted_at_median_and_tiny_quantile(self):
        low, high = ops.soft_quantile_split(
            self.values, self.scores, 0.5, epsilon=1e-5, output="sorted"
        )
        np.testing.assert_allclose(low.numpy(), self.sorted_values[:, :20], atol=1e-6)
        low, high = ops.soft_quantile_split(
            self.values, self.scores, 0.01, epsilon=1e-5, output="sorted"
        )
        assert low.shape == (3, 0) and high.shape == (3, 0)

    def test_sorted_gradient_matches_finite_differences(self):
        rng = np.random.default_rng(31)
        scores = rng.standard_normal(8)
        values = rng.standard_normal(8)
        w = rng.standard_normal(4)

        def loss(s):
            low, high = ops.soft_quantile_split(
                values, tf.constant(s), 0.25, epsilon=0.05, output="sorted"
            )
            return tf.reduce_sum(tf.concat([low, high], -1) * w)

        analytic = tape_gradient(lambda s: loss(s), scores)
        numeric = finite_difference_gradient(lambda s: float(loss(s)), scores)
        assert np.linalg.norm(analytic - numeric) / np.linalg.norm(numeric) < 1e-4

    def test_spread_objective_has_gradient_in_theta(self):
        rng = np.random.default_rng(32)
        A = tf.constant(rng.standard_normal(10))
        B = tf.constant(rng.standard_normal((10, 20)))
        theta = tf.Variable(rng.standard_normal(20))
        with tf.GradientTape() as tape:
            low, high = ops.soft_quantile_split(A, tf.linalg.matvec(B, theta), output="mean")
            objective = low - high
        grad = tape.gradient(objective, theta).numpy()
        assert np.all(np.isfinite(grad)) and np.linalg.norm(grad) > 1e-3


class TestTransportInternals:
    def test_gradient_does_not_record_the_solver_loop(self):
        """Backprop memory is independent of the iteration count: no loop accumulators."""
        x = tf.constant(np.random.default_rng(40).standard_normal((2, 50)))

        @tf.function
        def grad(v):
            with tf.GradientTape() as tape:
                tape.watch(v)
                loss = tf.reduce_sum(ops.soft_quantile_masks(v, epsilon=1e-3)[..., 2] * v)
            return tape.gradient(loss, v)

        graph_def = grad.get_concrete_function(x).graph.as_graph_def()
        op_types = {node.op for node in graph_def.node}
        for function in graph_def.library.function:  # the solver loop runs in a sub-function
            op_types.update(node.op for node in function.node_def)
        assert "StatelessWhile" in op_types or "While" in op_types
        assert not any("TensorList" in t for t in op_types), sorted(op_types)

    def test_diagnostics_shapes(self):
        x = tf.constant(np.random.default_rng(41).standard_normal((2, 3, 30)))
        _masks, info = ops.soft_quantile_masks(x, return_diagnostics=True)
        assert info.iterations.shape == (2, 3) and info.converged.shape == (2, 3)
        assert info.boundaries.shape == (2, 3, 2)
        assert bool(tf.reduce_all(info.marginal_error < 2e-11))

    def test_nan_row_stays_confined_under_xla(self):
        x = np.random.default_rng(42).standard_normal((3, 20))
        x[1, 4] = np.nan
        f = tf.function(lambda v: ops.soft_quantile_masks(v, epsilon=1e-2), jit_compile=True)
        masks = f(tf.constant(x)).numpy()
        clean = ops.soft_quantile_masks(tf.constant(x[[0, 2]]), epsilon=1e-2).numpy()
        np.testing.assert_allclose(masks[[0, 2]], clean, atol=1e-12)

    def test_solvers_report_convergence(self):
        z = ops.squash_scores(tf.constant(np.random.default_rng(43).standard_normal((2, 100))))
        a = tf.ones_like(z) / 100
        b = tf.constant([0.3, 0.4, 0.3], tf.float64)
        newton = ops.transport.solve_newton(z, a, b, 1e-3)
        sinkhorn = ops.transport.solve_sinkhorn(z, a, b, 1e-1)
        assert bool(tf.reduce_all(newton.converged)) and bool(tf.reduce_all(sinkhorn.converged))
        assert int(tf.reduce_max(newton.iterations)) <= 10
        far = tf.constant([[0.05, 0.1]] * 2, tf.float64)
        stopped = ops.transport.solve_newton(z, a, b, 1e-3, max_iterations=0, warm_start=far)
        assert not bool(tf.reduce_all(stopped.converged))


class TestValidation:
    x = np.random.default_rng(50).standard_normal((2, 8))

    @pytest.mark.parametrize(
        "call, error, text",
        [
            (lambda x: ops.soft_quantile_masks(np.arange(8), epsilon=0.1), TypeError, "scores"),
            (lambda x: ops.soft_quantile_masks(x, epsilon=0.0), ValueError, "epsilon=0.0"),
            (lambda x: ops.soft_quantile_masks(x, epsilon=-1), ValueError, "epsilon=-1"),
            (lambda x: ops.soft_quantile_masks(x, (0.5, 0.25)), ValueError, "increasing"),
            (lambda x: ops.soft_quantile_masks(x, (0.0, 0.5)), ValueError, "quantiles"),
            (lambda x: ops.soft_quantile_masks(x, (0.5, 1.0)), ValueError, "quantiles"),
            (lambda x: ops.soft_quantile_masks(x, axis=2), ValueError, "axis=2"),
            (lambda x: ops.soft_quantile_masks(x, solver="lbfgs"), ValueError, "solver"),
            (lambda x: ops.soft_quantile_masks(x, mask=np.ones((2, 8))), TypeError, "mask"),
            (lambda x: ops.soft_quantile_masks(x, mask=np.ones((2, 7), bool)), ValueError, "mask"),
            (lambda x: ops.soft_quantile_masks(np.float64(1.0)), ValueError, "scores"),
            (lambda x: ops.soft_topk_mask(x, -1), ValueError, "k=-1"),
            (lambda x: ops.soft_topk_mask(x, 9), ValueError, "k=9"),
            (lambda x: ops.soft_topk_mask(x, "3"), TypeError, "k="),
            (lambda x: ops.soft_quantile_split(x, x, 0.6), ValueError, "quantile=0.6"),
            (lambda x: ops.soft_quantile_split(x, x, 0.0), ValueError, "quantile=0.0"),
            (lambda x: ops.soft_quantile_split(x[:, :7], x), ValueError, "values"),
            (lambda x: ops.soft_quantile_split(np.ones((2, 8), int), x), TypeError, "values"),
            (lambda x: ops.soft_quantile_split(x, x, output="median"), ValueError, "output"),
            (
                lambda x: ops.soft_quantile_split(x, x, output="sorted", mask=x > 0),
                ValueError,
                "mask",
            ),
        ],
    )
    def test_bad_arguments(self, call, error, text):
        with pytest.raises(error, match=text):
            call(self.x)

    def test_nan_scores_raise_eagerly_and_in_function(self):
        x = self.x.copy()
        x[0, 3] = np.nan
        with pytest.raises(ValueError, match="scores"):
            ops.soft_quantile_masks(x)
        with pytest.raises(tf.errors.InvalidArgumentError, match="scores"):
            tf.function(lambda v: ops.soft_quantile_masks(v))(tf.constant(x))

    def test_tensor_epsilon_is_checked(self):
        with pytest.raises(ValueError, match="epsilon"):
            ops.soft_topk_mask(self.x, 2, epsilon=tf.constant(-0.5))
        with pytest.raises(tf.errors.InvalidArgumentError, match="epsilon"):
            tf.function(lambda e: ops.soft_topk_mask(self.x, 2, epsilon=e))(tf.constant(0.0))

    def test_top_level_exports(self):
        assert ksq.soft_topk_mask is ops.soft_topk_mask
        assert ksq.__version__


class TestReportedConvergenceIsTrue:
    """Regressions: the returned memberships are the ones the diagnostics describe."""

    @pytest.mark.parametrize("dtype", ["float32", "float64"])
    def test_sorted_split_far_below_the_gaps(self, dtype):
        # Ten evenly spaced values at epsilon 1e-4: no entry lies near a boundary, so the
        # covariance underflows. The lower selection once came back as [0, 0].
        v = tf.constant([[1.0, 2, 3, 4, 5, 6, 7, 8, 9, 10]], dtype)
        (low, high), diagnostics = ops.soft_quantile_split(
            v, v, 0.25, epsilon=1e-4, output="sorted", return_diagnostics=True
        )
        np.testing.assert_allclose(low, [[1.0, 2.0]], atol=1e-4)
        np.testing.assert_allclose(high, [[9.0, 10.0]], atol=1e-4)
        assert bool(tf.reduce_all(diagnostics.converged))
        masses = tf.reduce_sum(diagnostics.memberships, axis=-2).numpy()
        np.testing.assert_allclose(masses, [[1, 1, 6, 1, 1]], atol=1e-3)

    @pytest.mark.parametrize("epsilon", [1e-5, 1.78e-5, 3.2e-5])
    def test_epsilon_far_below_one_over_n(self, epsilon):
        x = tf.constant(np.random.default_rng(7).standard_normal((32, 1000)))
        masks, diagnostics = ops.soft_quantile_masks(x, epsilon=epsilon, return_diagnostics=True)
        assert bool(tf.reduce_all(diagnostics.converged)), diagnostics.marginal_error
        np.testing.assert_allclose(
            tf.reduce_sum(masks, axis=1), np.tile([[250.0, 500.0, 250.0]], (32, 1)), atol=1e-6
        )
