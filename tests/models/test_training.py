"""QuantileObjectiveModel learns theta: real training on generated instances."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from problems import hard_spread, planted_problem

import keras_softquantile as ksq


def _fit(model, A, B, epochs=10, batch_size=8, **kwargs):
    model.compile(optimizer=keras.optimizers.Adam(0.05), **kwargs)
    return model.fit(x=(A, B), batch_size=batch_size, epochs=epochs, verbose=0, shuffle=False)


class TestLearnsThePlantedObjective:
    @pytest.mark.slow
    def test_reaches_planted_theta_within_two_percent_while_hard_gradient_is_zero(self, problem):
        A, B, theta_star = problem
        model = ksq.QuantileObjectiveModel("spread", num_features=B.shape[-1], epsilon=1e-2)
        model.build((None, *B.shape[1:]))
        theta = tf.Variable(keras.ops.convert_to_numpy(model.theta))
        with tf.GradientTape() as tape:
            scores = tf.linalg.matvec(tf.constant(B), theta)
            order = tf.argsort(scores, axis=-1)
            ordered = tf.gather(tf.constant(A), order, batch_dims=1)
            hard = tf.reduce_mean(ordered[:, :25]) - tf.reduce_mean(ordered[:, -25:])
        gradient = tape.gradient(hard, theta, unconnected_gradients="zero")
        assert float(tf.norm(gradient)) == 0.0

        start = hard_spread(A, B, keras.ops.convert_to_numpy(model.theta))
        history = _fit(model, A, B)
        learned = hard_spread(A, B, keras.ops.convert_to_numpy(model.theta))
        planted = hard_spread(A, B, theta_star)
        assert start > planted + 1.0  # the random start is far from the optimum
        assert learned <= planted + 0.02 * abs(planted), (learned, planted)
        # The logged hard objective is the same quantity, measured during the last epoch.
        np.testing.assert_allclose(history.history["hard_objective"][-1], learned, atol=0.05)

    def test_generalises_to_new_instances(self, problem):
        A, B, theta_star = problem
        model = ksq.QuantileObjectiveModel("spread")
        _fit(model, A, B)
        A2, B2, _ = planted_problem(seed=1)
        B2 = B2 @ np.eye(B.shape[-1], dtype="float32")  # new instances, same theta*
        A2 = (B2 @ theta_star + np.random.default_rng(2).standard_normal(A2.shape)).astype(
            "float32"
        )
        learned = hard_spread(A2, B2, keras.ops.convert_to_numpy(model.theta))
        planted = hard_spread(A2, B2, theta_star)
        assert learned <= planted + 0.03 * abs(planted), (learned, planted)


class TestMetrics:
    def test_logs_are_real_values(self, problem):
        A, B, _ = problem
        model = ksq.QuantileObjectiveModel("spread", epsilon=2e-2)
        history = _fit(model, A, B, epochs=2)
        logs = {name: values[-1] for name, values in history.history.items()}
        assert set(logs) == {"loss", "hard_objective", "selection_agreement", "epsilon"}
        assert logs["loss"] < -1.0  # a logged `loss: 0.0000` would be the classic bug
        assert 0.9 < logs["selection_agreement"] <= 1.0
        np.testing.assert_allclose(logs["epsilon"], 2e-2, rtol=1e-6)

    def test_evaluate_matches_a_hand_computation(self, problem):
        A, B, _ = problem
        model = ksq.QuantileObjectiveModel("spread", epsilon=1e-3)
        model.compile()
        metrics = model.evaluate(x=(A, B), batch_size=len(A), verbose=0, return_dict=True)
        theta = keras.ops.convert_to_numpy(model.theta)
        np.testing.assert_allclose(metrics["hard_objective"], hard_spread(A, B, theta), rtol=1e-5)
        # At epsilon 1e-3 the soft objective is within a few tenths of a percent of the hard.
        np.testing.assert_allclose(metrics["loss"], metrics["hard_objective"], rtol=2e-2)
        assert metrics["selection_agreement"] > 0.97

    def test_regularization_losses_join_the_loss(self, problem):
        A, B, _ = problem
        plain = ksq.QuantileObjectiveModel("spread", epsilon=1e-2)
        scorer = ksq.models.LinearScorer(theta_regularizer=keras.regularizers.L2(10.0))
        regularized = ksq.QuantileObjectiveModel("spread", scorer=scorer, epsilon=1e-2)
        for model in (plain, regularized):
            model.build((None, *B.shape[1:]))
        regularized.theta.assign(plain.theta)
        penalty = 10.0 * float(np.sum(keras.ops.convert_to_numpy(plain.theta) ** 2))
        results = []
        for model in (plain, regularized):
            model.compile()
            results.append(model.evaluate(x=(A, B), batch_size=32, verbose=0, return_dict=True))
        np.testing.assert_allclose(results[1]["loss"] - results[0]["loss"], penalty, rtol=1e-4)


class TestOutputsAndScorers:
    # Every output mode trains: tests/backends/test_backend_model.py (every backend).

    def test_a_custom_scorer(self, problem):
        A, B, _ = problem
        scorer = keras.Sequential(
            [keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)], name="mlp"
        )
        model = ksq.QuantileObjectiveModel("spread", scorer=scorer)
        history = _fit(model, A, B, epochs=6)
        hard = history.history["hard_objective"]
        assert hard[-1] < hard[0] - 1.0, hard
        with pytest.raises(AttributeError, match=r"model\.scorer\.weights"):
            _ = model.theta

    @pytest.mark.slow
    def test_custom_objective_callable(self, problem):
        A, B, _ = problem

        def top_minus_bottom_median(low, high):
            return low.mean() - tf.reduce_sum(high.weights * high.values, -1) / high.total()

        model = ksq.QuantileObjectiveModel(top_minus_bottom_median)
        history = _fit(model, A, B, epochs=3)
        assert history.history["hard_objective"][-1] < history.history["hard_objective"][0]

    @pytest.mark.slow
    def test_dataset_input_and_jit_compile_agree(self, problem):
        A, B, _ = problem
        thetas = []
        for jit_compile, as_dataset in ((False, False), (True, True)):
            keras.utils.set_random_seed(0)
            model = ksq.QuantileObjectiveModel("spread")
            model.compile(optimizer=keras.optimizers.Adam(0.05), jit_compile=jit_compile)
            if as_dataset:
                data = tf.data.Dataset.from_tensor_slices((A, B)).batch(8)
                model.fit(data, epochs=2, verbose=0)
            else:
                model.fit(x=(A, B), batch_size=8, epochs=2, verbose=0, shuffle=False)
            thetas.append(keras.ops.convert_to_numpy(model.theta))
        np.testing.assert_allclose(thetas[0], thetas[1], rtol=1e-4, atol=1e-5)


class TestPredictAndPadding:
    def test_predict_returns_scores_and_exact_hard_masks(self, problem):
        A, B, _ = problem
        model = ksq.QuantileObjectiveModel("spread")
        model.build((None, *B.shape[1:]))
        outputs = model.predict((A, B), batch_size=8, verbose=0)
        assert set(outputs) == {"scores", "lower_mask", "upper_mask"}
        theta = keras.ops.convert_to_numpy(model.theta)
        np.testing.assert_allclose(outputs["scores"], B @ theta, rtol=1e-5, atol=1e-5)
        assert (outputs["lower_mask"].sum(-1) == 25).all()
        assert (outputs["upper_mask"].sum(-1) == 25).all()
        threshold = np.sort(outputs["scores"], -1)[:, 74:75]
        np.testing.assert_array_equal(outputs["upper_mask"], outputs["scores"] > threshold)
        features_only = model.predict(B, batch_size=8, verbose=0)
        np.testing.assert_array_equal(features_only["upper_mask"], outputs["upper_mask"])

    @pytest.mark.slow
    def test_nan_padding_is_the_shorter_instance(self):
        A, B, _ = planted_problem(instances=4, n=40)
        padded_A = np.concatenate([A[:, :30], np.full((4, 10), np.nan, "float32")], -1)
        padded_B = np.concatenate([B[:, :30], np.full((4, 10, 5), np.nan, "float32")], 1)
        results = []
        for values, features in ((A[:, :30], B[:, :30]), (padded_A, padded_B)):
            keras.utils.set_random_seed(0)
            model = ksq.QuantileObjectiveModel("spread", epsilon=1e-2)
            model.compile(optimizer=keras.optimizers.Adam(0.05))
            history = model.fit(x=(values, features), batch_size=4, epochs=3, verbose=0)
            results.append((history.history, keras.ops.convert_to_numpy(model.theta)))
        for name in ("loss", "hard_objective", "selection_agreement"):
            np.testing.assert_allclose(results[0][0][name], results[1][0][name], rtol=1e-4)
        np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)
        assert np.isfinite(results[1][1]).all()
        selection = model.selection(padded_A, padded_B)
        assert np.isnan(keras.ops.convert_to_numpy(selection["scores"])[:, 30:]).all()
        upper = keras.ops.convert_to_numpy(selection["upper_membership"])
        np.testing.assert_allclose(upper.sum(-1), 7.5, rtol=1e-4)  # q * 30 valid entries
        assert (keras.ops.convert_to_numpy(selection["upper_mask"]).sum(-1) == 7).all()


class TestBadArguments:
    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"objective": 42}, TypeError, "Received: objective=42"),
            ({"objective": "sharpe"}, ValueError, "Received: objective='sharpe'"),
            ({"quantile": 0.7}, ValueError, "Received: quantile=0.7"),
            ({"quantile": 0.0}, ValueError, "Received: quantile=0.0"),
            ({"epsilon": 0.0}, ValueError, "Received: epsilon=0.0"),
            ({"epsilon": "small"}, TypeError, "Received: epsilon='small'"),
            ({"output": "ranks"}, ValueError, "Received: output='ranks'"),
            ({"gradient_estimator": "reinforce"}, ValueError, "gradient_estimator='reinforce'"),
            ({"num_samples": 1}, ValueError, "Received: num_samples=1"),
            ({"sigma": -1.0}, ValueError, "Received: sigma=-1.0"),
            ({"solver": "lbfgs"}, ValueError, "Received: solver='lbfgs'"),
            ({"num_features": 0}, ValueError, "Received: num_features=0"),
            ({"scorer": "linear"}, TypeError, "Received: scorer='linear'"),
            ({"seed": 1.5}, TypeError, "Received: seed=1.5"),
            ({"objective": "rank_weighted_spread"}, ValueError, "Received: output='weights'"),
        ],
    )
    def test_constructor(self, kwargs, error, match):
        with pytest.raises(error, match=match):
            ksq.QuantileObjectiveModel(**kwargs)

    @pytest.mark.parametrize(
        ("A_shape", "B_shape", "match"),
        [
            ((4, 10, 1), (4, 10, 3), r"A.shape=\(None, 10, 1\)"),
            ((4, 10), (4, 10), r"B.shape=\(None, 10\)"),
            ((4, 10), (4, 12, 3), r"A.shape=\(None, 10\), B.shape=\(None, 12, 3\)"),
            ((4, 10), (4, 10, 5), r"num_features=3.*B.shape=\(None, 10, 5\)"),
        ],
    )
    def test_wrong_shapes_fail_before_training(self, A_shape, B_shape, match):
        model = ksq.QuantileObjectiveModel("spread", num_features=3)
        model.compile(optimizer="adam")
        A = np.zeros(A_shape, "float32")
        B = np.zeros(B_shape, "float32")
        with pytest.raises(ValueError, match=match):
            model.fit(x=(A, B), epochs=1, verbose=0)

    def test_integer_data_and_targets_are_refused(self):
        model = ksq.QuantileObjectiveModel("spread")
        model.compile(optimizer="adam")
        with pytest.raises(TypeError, match=r"Received: A\.dtype=int64"):
            model.fit(x=(np.zeros((2, 8), "int64"), np.zeros((2, 8, 3), "float32")), verbose=0)
        with pytest.raises(ValueError, match="takes no targets"):
            model.fit(x=(np.zeros((2, 8)), np.zeros((2, 8, 3))), y=np.zeros(2), verbose=0)

    def test_set_epsilon_validates(self):
        model = ksq.QuantileObjectiveModel("spread")
        with pytest.raises(ValueError, match=r"Received: epsilon=-0\.1"):
            model.set_epsilon(-0.1)
        model.set_epsilon(0.5)
        assert float(model.get_epsilon()) == 0.5


class TestPerturbedEstimator:
    # The planted-theta run of this estimator is in tests/backends/test_backend_model.py (every
    # backend, TensorFlow included).

    @pytest.mark.slow
    def test_sorted_output_with_the_order_dependent_objective(self):
        A, B, _ = planted_problem(instances=16, n=40)
        model = ksq.QuantileObjectiveModel(
            "rank_weighted_spread", output="sorted", gradient_estimator="perturbed", seed=1
        )
        history = _fit(model, A, B, epochs=6)
        hard = history.history["hard_objective"]
        assert hard[-1] < hard[0] - 0.5, hard
