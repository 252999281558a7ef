"""`QuantileObjectiveModel` under the active Keras backend: training, metrics, saving."""

import os

import keras
import numpy as np
import pytest
from harness import backend, is_backend_tensor, to_numpy
from problems import Interrupt, hard_spread, planted_problem

import keras_softquantile as ksq

METRICS = {"loss", "hard_objective", "selection_agreement", "epsilon"}


def _fit(model, A, B, epochs=10, batch_size=8, **compile_kwargs):
    model.compile(optimizer=keras.optimizers.Adam(0.05), **compile_kwargs)
    return model.fit(x=(A, B), batch_size=batch_size, epochs=epochs, verbose=0, shuffle=False)


def _theta(model) -> np.ndarray:
    return to_numpy(model.theta)


# One problem, one batch size and one trained model for most tests: JAX compiles the train,
# test and predict steps once per model and shape.
INSTANCES, N, FEATURES, BATCH = 32, 40, 5, 8


@pytest.fixture(scope="module")
def planted():
    """The planted problem and a model trained on it with `fit` (10 epochs of 4 steps)."""
    keras.utils.set_random_seed(0)
    A, B, theta_star = planted_problem(instances=INSTANCES, n=N, features=FEATURES)
    model = ksq.QuantileObjectiveModel("spread", num_features=FEATURES, epsilon=1e-2)
    # A fixed start far from theta* (cosine -0.39), as small as the default initializer's
    # (stddev 0.05): the random one depends on the backend.
    model.theta.assign(0.05 * np.random.default_rng(2).standard_normal(FEATURES).astype("float32"))
    start = hard_spread(A, B, _theta(model))
    history = _fit(model, A, B)
    return {
        "A": A,
        "B": B,
        "theta_star": theta_star,
        "model": model,
        "start": start,
        "history": history.history,
    }


def test_fit_solves_the_planted_problem_and_logs_the_metrics(planted):
    A, B, model = planted["A"], planted["B"], planted["model"]
    learned = hard_spread(A, B, _theta(model))
    optimum = hard_spread(A, B, planted["theta_star"])
    assert planted["start"] > optimum + 1.0  # the start is far from the optimum
    assert learned <= optimum + 0.02 * abs(optimum), (learned, optimum)
    logs = {name: values[-1] for name, values in planted["history"].items()}
    assert set(logs) == METRICS
    assert logs["loss"] < -1.0  # a logged `loss: 0.0000` would be the classic bug
    assert 0.9 < logs["selection_agreement"] <= 1.0
    np.testing.assert_allclose(logs["epsilon"], 1e-2, rtol=1e-6)
    # The logged hard objective is the same quantity, measured during the last epoch.
    np.testing.assert_allclose(logs["hard_objective"], learned, atol=0.05)


def test_evaluate_matches_a_hand_computation_and_follows_set_epsilon(planted):
    A, B, model = planted["A"], planted["B"], planted["model"]
    try:
        model.set_epsilon(1e-3)
        sharp = model.evaluate(x=(A, B), batch_size=BATCH, verbose=0, return_dict=True)
        model.set_epsilon(0.3)
        assert float(to_numpy(model.get_epsilon())) == pytest.approx(0.3)
        smooth = model.evaluate(x=(A, B), batch_size=BATCH, verbose=0, return_dict=True)
    finally:
        model.set_epsilon(1e-2)
    assert set(sharp) == METRICS
    hard = hard_spread(A, B, _theta(model))
    np.testing.assert_allclose(sharp["hard_objective"], hard, rtol=1e-5)
    # At epsilon 1e-3 the soft objective is within a few tenths of a percent of the hard.
    np.testing.assert_allclose(sharp["loss"], sharp["hard_objective"], rtol=2e-2)
    assert sharp["selection_agreement"] > 0.97
    np.testing.assert_allclose([sharp["epsilon"], smooth["epsilon"]], [1e-3, 0.3], rtol=1e-6)
    np.testing.assert_allclose(smooth["hard_objective"], hard, rtol=1e-5)
    assert smooth["loss"] > sharp["loss"] + 0.1, (smooth, sharp)  # a blurred selection
    with pytest.raises(ValueError, match=r"Received: epsilon=-0\.1"):
        model.set_epsilon(-0.1)


def test_predict_returns_scores_and_exact_hard_masks(planted):
    A, B, model = planted["A"], planted["B"], planted["model"]
    outputs = model.predict((A, B), batch_size=BATCH, verbose=0)
    assert set(outputs) == {"scores", "lower_mask", "upper_mask"}
    np.testing.assert_allclose(outputs["scores"], B @ _theta(model), rtol=1e-5, atol=1e-5)
    assert (outputs["lower_mask"].sum(-1) == 10).all()
    assert (outputs["upper_mask"].sum(-1) == 10).all()
    threshold = np.sort(outputs["scores"], -1)[:, 29:30]
    np.testing.assert_array_equal(outputs["upper_mask"], outputs["scores"] > threshold)
    features_only = model.predict(B, batch_size=BATCH, verbose=0)
    np.testing.assert_array_equal(features_only["upper_mask"], outputs["upper_mask"])


def _padded(A, B):
    """The first 30 entries of 8 instances, padded to 40 with NaN."""
    padded_A = np.concatenate([A[:8, :30], np.full((8, 10), np.nan, "float32")], -1)
    padded_B = np.concatenate([B[:8, :30], np.full((8, 10, FEATURES), np.nan, "float32")], 1)
    return padded_A, padded_B


def test_selection_of_nan_padded_instances(planted):
    A, B, model = planted["A"], planted["B"], planted["model"]
    padded_A, padded_B = _padded(A, B)
    selection = model.selection(padded_A, padded_B)
    for value in selection.values():
        assert is_backend_tensor(value), (type(value).__name__, backend())
    selection = to_numpy(selection)
    assert np.isnan(selection["scores"][:, 30:]).all()
    assert np.isfinite(selection["scores"][:, :30]).all()
    np.testing.assert_allclose(selection["upper_membership"].sum(-1), 7.5, rtol=1e-4)
    assert (selection["upper_mask"].sum(-1) == 7).all()
    assert not selection["upper_mask"][:, 30:].any()
    # The instances cut to their 30 valid entries select the same (in the slow test
    # `test_padded_fit_matches_the_shorter_instances`, training on them too).


@pytest.mark.slow
def test_padded_fit_matches_the_shorter_instances(planted):
    A, B = planted["A"], planted["B"]
    padded_A, padded_B = _padded(A, B)
    padded = to_numpy(planted["model"].selection(padded_A, padded_B))
    short = to_numpy(planted["model"].selection(A[:8, :30], B[:8, :30]))
    for name in ("upper_membership", "lower_membership"):
        np.testing.assert_allclose(padded[name][:, :30], short[name], atol=1e-5, err_msg=name)
    results = []
    for values, features in ((A[:8, :30], B[:8, :30]), (padded_A, padded_B)):
        keras.utils.set_random_seed(0)
        model = ksq.QuantileObjectiveModel("spread", num_features=5, epsilon=1e-2, seed=3)
        history = _fit(model, values, features, epochs=2, batch_size=4)
        results.append((history.history, _theta(model)))
    for name in ("loss", "hard_objective", "selection_agreement"):
        np.testing.assert_allclose(results[0][0][name], results[1][0][name], rtol=1e-4)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def test_bad_data_fails_before_training():
    model = ksq.QuantileObjectiveModel("spread", num_features=3)
    model.compile(optimizer="adam")
    # The batch size is None where Keras traces the step (TensorFlow), 4 where it runs eagerly.
    with pytest.raises(ValueError, match=r"A.shape=\((None|4), 10\), B.shape=\((None|4), 12, 3\)"):
        model.fit(x=(np.zeros((4, 10), "float32"), np.zeros((4, 12, 3), "float32")), verbose=0)
    with pytest.raises(TypeError, match=r"Received: A\.dtype=int64"):
        model.fit(x=(np.zeros((2, 8), "int64"), np.zeros((2, 8, 3), "float32")), verbose=0)
    with pytest.raises(ValueError, match="takes no targets"):
        model.fit(x=(np.zeros((2, 8)), np.zeros((2, 8, 3))), y=np.zeros(2), verbose=0)
    bad_B = np.random.default_rng(0).standard_normal((2, 8, 3)).astype("float32")
    bad_B[1, 3, 0] = np.nan
    with pytest.raises(ValueError, match=r"B\[1, 3, 0\]=nan"):
        model.selection(np.zeros((2, 8), "float32"), bad_B)
    assert np.all(np.isfinite(_theta(model)))


def test_keras_round_trip(planted, tmp_path):
    """Saved and loaded: same weights, metrics, predictions, and the optimizer state (the next
    `fit` step matches). Last of the tests on the trained model: it trains it further."""
    A, B, model = planted["A"], planted["B"], planted["model"]
    model.set_epsilon(7e-3)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert isinstance(loaded, ksq.QuantileObjectiveModel)
    assert (loaded.quantile, loaded.output_mode) == (0.25, "weights")
    np.testing.assert_allclose(float(to_numpy(loaded.get_epsilon())), 7e-3, rtol=1e-6)
    for saved, restored in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(saved), to_numpy(restored))
    expected = model.evaluate(x=(A, B), batch_size=BATCH, verbose=0, return_dict=True)
    actual = loaded.evaluate(x=(A, B), batch_size=BATCH, verbose=0, return_dict=True)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5)
    predicted = loaded.predict((A, B), batch_size=BATCH, verbose=0)
    np.testing.assert_array_equal(
        predicted["upper_mask"], model.predict((A, B), batch_size=BATCH, verbose=0)["upper_mask"]
    )
    model.fit(x=(A, B), batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x=(A, B), batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    np.testing.assert_allclose(_theta(loaded), _theta(model), rtol=1e-5, atol=1e-6)


def test_perturbed_estimator_trains():
    A, B, _ = planted_problem(instances=16, n=40)
    model = ksq.QuantileObjectiveModel(
        "spread", gradient_estimator="perturbed", num_samples=20, sigma=0.05, seed=4
    )
    history = _fit(model, A, B, epochs=4)
    hard = history.history["hard_objective"]
    assert set(history.history) == METRICS
    assert np.all(np.isfinite(history.history["loss"]))
    assert hard[-1] < hard[0] - 0.5, hard


@pytest.mark.slow
def test_perturbed_estimator_is_reproducible_and_reaches_the_planted_theta():
    A, B, theta_star = planted_problem()
    thetas = []
    for _ in range(2):
        keras.utils.set_random_seed(0)
        model = ksq.QuantileObjectiveModel(
            "spread", gradient_estimator="perturbed", num_samples=50, sigma=0.05, seed=4
        )
        _fit(model, A, B)
        thetas.append(_theta(model))
    np.testing.assert_array_equal(thetas[0], thetas[1])  # seeded noise: same run twice
    learned = hard_spread(A, B, thetas[0])
    planted = hard_spread(A, B, theta_star)
    assert learned <= planted + 0.02 * abs(planted), (learned, planted)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("objective", "output"),
    [("spread", "mean"), ("spread", "sorted"), ("rank_weighted_spread", "sorted")],
)
def test_every_output_mode_trains(objective, output):
    A, B, _ = planted_problem(instances=16, n=24)
    model = ksq.QuantileObjectiveModel(objective, output=output, epsilon=1e-2)
    history = _fit(model, A, B, epochs=6)
    hard = history.history["hard_objective"]
    assert hard[-1] < hard[0] - 0.5, hard
    assert np.isfinite(history.history["loss"]).all()


@pytest.mark.slow
def test_a_custom_scorer_trains():
    A, B, theta_star = planted_problem()
    scorer = keras.Sequential(
        [keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)], name="mlp"
    )
    model = ksq.QuantileObjectiveModel("spread", scorer=scorer)
    history = _fit(model, A, B, epochs=6)
    hard = history.history["hard_objective"]
    planted = hard_spread(A, B, theta_star)
    assert hard[-1] < hard[0] and hard[-1] <= planted + 0.1 * abs(planted), (hard, planted)
    with pytest.raises(AttributeError, match=r"model\.scorer\.weights"):
        _ = model.theta


@pytest.mark.slow
@pytest.mark.skipif(
    backend() == "torch",
    reason="jit_compile=True means torch.compile on PyTorch, which this suite does not cover",
)
def test_jit_compile_and_eager_steps_agree():
    A, B, _ = planted_problem()
    thetas = []
    for jit_compile in (False, True):
        keras.utils.set_random_seed(0)
        model = ksq.QuantileObjectiveModel("spread", seed=2)
        _fit(model, A, B, epochs=2, jit_compile=jit_compile)
        thetas.append(_theta(model))
    np.testing.assert_allclose(thetas[0], thetas[1], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_backup_and_restore_resumes_fit_to_the_same_theta(tmp_path):
    A, B, _ = planted_problem(instances=16, n=40)

    def new_model():
        keras.utils.set_random_seed(3)
        model = ksq.QuantileObjectiveModel("spread", num_features=5, epsilon=2e-2)
        model.compile(optimizer=keras.optimizers.Adam(0.05))
        return model

    def anneal():
        return ksq.callbacks.EpsilonAnnealing(0.1, 0.01, epochs=4)

    reference = new_model()
    reference.fit(x=(A, B), batch_size=4, epochs=4, verbose=0, shuffle=False, callbacks=[anneal()])

    backup = keras.callbacks.BackupAndRestore(os.path.join(tmp_path, "backup"))
    interrupted = new_model()
    with pytest.raises(RuntimeError, match="interrupted"):
        interrupted.fit(
            x=(A, B),
            batch_size=4,
            epochs=4,
            verbose=0,
            shuffle=False,
            callbacks=[backup, anneal(), Interrupt(2)],
        )
    halfway = keras.ops.convert_to_numpy(interrupted.theta).copy()

    resumed = new_model()  # a fresh process would start here
    history = resumed.fit(
        x=(A, B), batch_size=4, epochs=4, verbose=0, shuffle=False, callbacks=[backup, anneal()]
    )
    assert len(history.history["loss"]) == 2  # only epochs 3 and 4 ran
    np.testing.assert_allclose(
        history.history["epsilon"], [anneal().value_at(2), anneal().value_at(3)], rtol=1e-5
    )
    final = keras.ops.convert_to_numpy(resumed.theta)
    assert not np.allclose(final, halfway)
    np.testing.assert_allclose(
        final, keras.ops.convert_to_numpy(reference.theta), rtol=1e-5, atol=1e-6
    )
