"""The perturbed (Monte-Carlo) quantile split and how it compares with the OT estimator."""

import numpy as np
import pytest
import tensorflow as tf

from keras_softquantile import ops


def _rows(shape, seed=0, dtype="float64"):
    return tf.constant(np.random.default_rng(seed).standard_normal(shape), dtype)


class TestValues:
    def test_masses_are_exact_integers(self):
        x = _rows((3, 50), dtype="float32")
        low, high = ops.perturbed_quantile_split(x, x, 0.25, sigma=0.1, num_samples=20, seed=1)
        np.testing.assert_allclose(tf.reduce_sum(low, -1), [12, 12, 12], rtol=1e-6)
        np.testing.assert_allclose(tf.reduce_sum(high, -1), [12, 12, 12], rtol=1e-6)

    def test_converges_to_the_hard_split_as_sigma_shrinks(self):
        x = _rows((4, 40))
        hard_high = tf.cast(x >= tf.sort(x, axis=-1)[:, 30:31], tf.float64)
        errors = []
        for sigma in (0.1, 0.01, 1e-4):
            _, high = ops.perturbed_quantile_split(x, x, 0.25, sigma=sigma, seed=2)
            errors.append(float(tf.reduce_mean(tf.abs(high - hard_high))))
        assert errors[0] > errors[1] > errors[2]
        assert errors[2] == 0.0

    def test_same_seed_same_draws(self):
        x = _rows((2, 30))
        first = ops.perturbed_quantile_split(x, x, sigma=0.2, num_samples=5, seed=(4, 5))
        second = ops.perturbed_quantile_split(x, x, sigma=0.2, num_samples=5, seed=(4, 5))
        other = ops.perturbed_quantile_split(x, x, sigma=0.2, num_samples=5, seed=(4, 6))
        np.testing.assert_array_equal(first[1], second[1])
        assert not np.array_equal(first[1], other[1])

    def test_outputs_mean_and_sorted(self):
        values = _rows((2, 20), seed=1)
        scores = _rows((2, 20), seed=2)
        (low, high), (_, high_w) = ops.perturbed_quantile_split(
            values, scores, 0.25, sigma=1e-9, output="mean", seed=0, return_weights=True
        )
        order = np.argsort(scores.numpy(), -1)
        ordered = np.take_along_axis(values.numpy(), order, -1)
        np.testing.assert_allclose(low, ordered[:, :5].mean(-1))
        np.testing.assert_allclose(high, ordered[:, -5:].mean(-1))
        np.testing.assert_allclose(tf.reduce_sum(high_w, -1), [5, 5])
        low, high = ops.perturbed_quantile_split(
            values, scores, 0.25, sigma=1e-9, output="sorted", seed=0
        )
        np.testing.assert_allclose(low, ordered[:, :5])
        np.testing.assert_allclose(high, ordered[:, -5:])

    def test_padding_is_excluded(self):
        x = _rows((2, 12))
        mask = tf.constant([[True] * 8 + [False] * 4] * 2)
        padded = tf.where(mask, x, np.nan)
        _, high = ops.perturbed_quantile_split(padded, padded, 0.25, mask=mask, seed=0)
        np.testing.assert_array_equal(high.numpy()[:, 8:], 0.0)
        np.testing.assert_allclose(tf.reduce_sum(high, -1), [2, 2])


class TestGradient:
    def test_unbiased_for_the_smoothed_selection(self):
        """The Monte-Carlo gradient matches finite differences of the smoothed function.

        The smoothed selection F(x) = E[hard(squash(x) + sigma * noise)] is estimated with
        common random numbers (the same seed), so its finite differences have a small variance
        even though each hard selection is piecewise constant.
        """
        values = _rows((1, 8), seed=1)
        scores = _rows((1, 8), seed=2)
        direction = _rows((1, 8), seed=3)
        kwargs = {"sigma": 0.1, "num_samples": 400_000, "output": "mean", "seed": (7, 7)}

        def objective(x):
            low, high = ops.perturbed_quantile_split(values, x, 0.25, **kwargs)
            return tf.reduce_sum(low - high)

        with tf.GradientTape() as tape:
            tape.watch(scores)
            value = objective(scores)
        analytic = float(tf.reduce_sum(tape.gradient(value, scores) * direction))
        step = 2e-3
        numeric = (objective(scores + step * direction) - objective(scores - step * direction)) / (
            2 * step
        )
        # Both sides are Monte-Carlo estimates: over the seeds (7, 7), (1, 2) and (3, 4) the
        # analytic value ranged 0.093-0.098 and the central difference 0.084-0.109.
        np.testing.assert_allclose(analytic, float(numeric), rtol=0.15)

    @pytest.mark.slow
    def test_variance_against_the_ot_estimator(self):
        """OT gradients are deterministic; perturbed ones have variance ~ 1 / num_samples."""
        values = _rows((4, 100), seed=1)
        scores = _rows((4, 100), seed=2)

        def gradient(estimator, seed=None, num_samples=None):
            with tf.GradientTape() as tape:
                tape.watch(scores)
                if estimator == "ot":
                    low, high = ops.soft_quantile_split(values, scores, epsilon=0.05, output="mean")
                else:
                    low, high = ops.perturbed_quantile_split(
                        values,
                        scores,
                        sigma=0.05,
                        num_samples=num_samples,
                        output="mean",
                        seed=seed,
                    )
                loss = tf.reduce_sum(low - high)
            return tape.gradient(loss, scores).numpy().ravel()

        ot = np.stack([gradient("ot") for _ in range(3)])
        np.testing.assert_array_equal(ot[0], ot[1])
        np.testing.assert_array_equal(ot[0], ot[2])
        variances = {}
        means = {}
        for samples in (25, 400):
            draws = np.stack([gradient("perturbed", (s, 1), samples) for s in range(40)])
            variances[samples] = draws.var(0).sum()
            means[samples] = draws.mean(0)
        ratio = variances[25] / variances[400]
        assert 8 < ratio < 32, ratio  # 16 expected
        assert np.isfinite(means[400]).all()
        cosine = means[400] @ ot[0] / np.linalg.norm(means[400]) / np.linalg.norm(ot[0])
        assert cosine > 0.8, cosine  # two smoothings of the same selection point the same way

    def test_finite_for_ties_and_values_gradient(self):
        x = tf.constant([[1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 0.0, 0.0]], tf.float64)
        values = _rows((1, 8))
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([x, values])
            low, high = ops.perturbed_quantile_split(values, x, 0.25, output="sorted", seed=0)
            loss = tf.reduce_sum(low) - 2 * tf.reduce_sum(high)
        for gradient in tape.gradient(loss, [x, values]):
            assert np.isfinite(gradient.numpy()).all()
        assert np.abs(tape.gradient(loss, values).numpy()).sum() > 0

    @pytest.mark.slow
    def test_under_tf_function_and_xla(self):
        x = _rows((2, 30), dtype="float32")

        def loss(x):
            low, high = ops.perturbed_quantile_split(x, x, output="mean", seed=(1, 1))
            return tf.reduce_sum(low - high)

        def gradient(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                value = loss(x)
            return tape.gradient(value, x)

        eager = gradient(x)
        np.testing.assert_allclose(tf.function(gradient)(x), eager, rtol=1e-4, atol=1e-6)
        # XLA draws its own stateless stream from the same seed: same law, other numbers.
        compiled = tf.function(gradient, jit_compile=True)(x)
        assert np.isfinite(compiled.numpy()).all()
        np.testing.assert_allclose(tf.norm(compiled), tf.norm(eager), rtol=0.5)


class TestBadArguments:
    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"quantile": 0.6}, ValueError, "Received: quantile=0.6"),
            ({"sigma": 0.0}, ValueError, "Received: sigma=0.0"),
            ({"sigma": "x"}, TypeError, "Received: sigma='x'"),
            ({"num_samples": 1}, ValueError, "Received: num_samples=1"),
            ({"num_samples": 2.5}, TypeError, "Received: num_samples=2.5"),
            ({"output": "ranks"}, ValueError, "Received: output='ranks'"),
            ({"seed": (1, 2, 3)}, ValueError, "seed"),
        ],
    )
    def test_arguments(self, kwargs, error, match):
        x = _rows((2, 8))
        with pytest.raises(error, match=match):
            ops.perturbed_quantile_split(x, x, **kwargs)

    def test_nan_scores_and_sorted_with_mask(self):
        x = _rows((2, 8)).numpy()
        x[0, 0] = np.nan
        with pytest.raises(ValueError, match="scores"):
            ops.perturbed_quantile_split(x, x)
        y = _rows((2, 8))
        with pytest.raises(ValueError, match="mask"):
            ops.perturbed_quantile_split(y, y, output="sorted", mask=tf.ones([2, 8], tf.bool))
