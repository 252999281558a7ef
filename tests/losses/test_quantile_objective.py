"""The `QuantileObjective` loss and the `HardQuantileObjective` metric under the active Keras
backend: agreement with `QuantileObjectiveModel` and with numpy, padding, gradients, training,
saving and argument errors."""

import doctest

import keras
import numpy as np
import pytest
from harness import backend, float64_available, grad, needs_float64, tensor, to_numpy

import keras_softquantile.losses
import keras_softquantile.metrics
from keras_softquantile import objectives
from keras_softquantile.losses import QuantileObjective, quantile_objective
from keras_softquantile.metrics import HardQuantileObjective
from keras_softquantile.metrics import quantile_objective as quantile_objective_metric
from keras_softquantile.models import QuantileObjectiveModel

WIDEST = "float64" if float64_available() else "float32"
SHARP = {"float64": (1e-6, 1e-7), "float32": (1e-4, 1e-4)}  # (epsilon, rtol) near the hard limit
ATOL = {"float64": 1e-10, "float32": 1e-5}  # two computations of the same values
# See tests/losses/test_regression.py: no XLA for training under TensorFlow.
COMPILE = {"jit_compile": False} if backend() == "tensorflow" else {}
N, M = 12, 3


def instances(rng, batch=4, n=N):
    """Values A `[batch, n]` and distinct scores `[batch, n]`."""
    values = rng.normal(size=(batch, n))
    scores = np.argsort(rng.random((batch, n)), axis=-1) + rng.uniform(-0.2, 0.2, (batch, n))
    return values, scores


def hard_spread(values, scores, quantile):
    """numpy: mean of A at the floor(q v) lowest scores minus at the highest, per row (NaN A:
    padding)."""
    result = []
    for a, c in zip(values, scores, strict=True):
        valid = ~np.isnan(a)
        a, c = a[valid], c[valid]
        k = int(np.floor(quantile * len(a) + 1e-9))
        order = np.argsort(c)
        result.append(a[order[:k]].mean() - a[order[-k:]].mean())
    return np.array(result)


def per_instance(loss, values, scores, dtype=WIDEST):
    return to_numpy(loss.call(tensor(values, dtype), tensor(scores, dtype)))


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantile", [0.25, 0.5])
@pytest.mark.parametrize("output", ["weights", "mean", "sorted"])
def test_small_epsilon_gives_the_hard_spread(rng, quantile, output):
    values, scores = instances(rng)
    epsilon, rtol = SHARP[WIDEST]
    loss = QuantileObjective("spread", quantile, epsilon=epsilon, output=output, dtype=WIDEST)
    expected = hard_spread(values, scores, quantile)
    np.testing.assert_allclose(per_instance(loss, values, scores), expected, rtol=rtol, atol=rtol)
    total = float(to_numpy(loss(tensor(values, WIDEST), tensor(scores, WIDEST))))
    assert total == pytest.approx(expected.mean(), rel=rtol, abs=rtol)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("objective", "output"), [("spread", "weights"), ("rank_weighted_spread", "sorted")]
)
def test_equals_the_models_own_soft_objective(rng, objective, output):
    features = rng.normal(size=(6, N, M)).astype("float32")
    values = (features @ rng.normal(size=M) + rng.normal(size=(6, N))).astype("float32")
    if output == "weights":
        values[1, [2, 5]] = np.nan  # padding
    model = QuantileObjectiveModel(objective, num_features=M, epsilon=0.05, output=output, seed=0)
    model.compile(keras.optimizers.SGD(0.0), **COMPILE)
    expected = model.evaluate(x=(values, features), batch_size=6, verbose=0, return_dict=True)
    theta = to_numpy(model.theta)
    scores = np.einsum("bnm,m->bn", features, theta).astype("float32")
    loss = QuantileObjective(objective, epsilon=0.05, output=output)
    assert float(to_numpy(loss(values, scores))) == pytest.approx(expected["loss"], rel=1e-5)
    metric = HardQuantileObjective(objective, output=output)
    metric.update_state(values, scores)
    assert float(to_numpy(metric.result())) == pytest.approx(expected["hard_objective"], rel=1e-5)


def test_metric_is_the_hard_objective_streaming_mean(rng):
    values, scores = instances(rng, batch=6)
    values[2, [0, 4, 9]] = np.nan  # a shorter row: k = floor(0.25 * 9) = 2
    scores[2, [0, 4, 9]] = np.nan  # padding may hold anything
    expected = hard_spread(values, scores, 0.25)
    weights = np.array([1.0, 2.0, 0.5, 1.0, 0.0, 3.0])
    metric = HardQuantileObjective("spread", 0.25)
    metric.update_state(values[:4], scores[:4], sample_weight=weights[:4])
    metric.update_state(values[4:], scores[4:], sample_weight=weights[4:])
    result = float(to_numpy(metric.result()))
    assert result == pytest.approx(np.sum(weights * expected) / weights.sum(), rel=1e-5)
    metric.reset_state()
    metric.update_state(values, scores)
    assert float(to_numpy(metric.result())) == pytest.approx(expected.mean(), rel=1e-5)
    restored = HardQuantileObjective.from_config(metric.get_config())
    assert restored.get_config() == metric.get_config()


def test_scalar_objectives_and_sample_weights(rng):
    values, scores = instances(rng)

    def worst(low, high):  # a scalar for the whole batch
        return keras.ops.max(low.mean() - high.mean())

    loss = QuantileObjective(worst, dtype=WIDEST)
    spread = per_instance(QuantileObjective(dtype=WIDEST), values, scores)
    np.testing.assert_allclose(per_instance(loss, values, scores), np.full(4, spread.max()))
    weights = np.array([1.0, 0.0, 2.0, 1.0])
    weighted = QuantileObjective(dtype=WIDEST)(
        tensor(values, WIDEST), tensor(scores, WIDEST), sample_weight=tensor(weights, WIDEST)
    )
    assert float(to_numpy(weighted)) == pytest.approx(np.mean(weights * spread), rel=1e-6)


# --------------------------------------------------------------------------------------------
# Padding and gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output", ["weights", "mean"])
def test_a_padded_row_gives_the_unpadded_loss_and_gradient(rng, output):
    values, scores = instances(rng, batch=1, n=9)
    padded_values = np.full((1, N), np.nan)
    padded_scores = np.full((1, N), np.nan)  # NaN scores at padding reach nothing
    kept = np.array([0, 1, 3, 4, 6, 7, 8, 10, 11])  # padding in the middle and at the end
    padded_values[0, kept] = values[0]
    padded_scores[0, kept] = scores[0]
    loss = QuantileObjective("spread", 0.25, epsilon=0.05, output=output, dtype=WIDEST)
    alone = per_instance(loss, values, scores)
    np.testing.assert_allclose(
        per_instance(loss, padded_values, padded_scores), alone, atol=ATOL[WIDEST]
    )
    a, a_padded = tensor(values, WIDEST), tensor(padded_values, WIDEST)
    g = grad(lambda c: loss.call(a, c), scores.astype(WIDEST))
    g_padded = grad(lambda c: loss.call(a_padded, c), padded_scores.astype(WIDEST))
    assert np.all(g_padded[0, [2, 5, 9]] == 0)
    np.testing.assert_allclose(g_padded[0, kept], g[0], atol=ATOL[WIDEST] * 10)
    assert np.abs(g).max() > 1e-3


def test_sorted_output_gives_nan_for_padded_rows(rng):
    values, scores = instances(rng, batch=2)
    values[1, 3] = np.nan
    loss = QuantileObjective("rank_weighted_spread", output="sorted")
    result = per_instance(loss, values, scores, "float32")
    assert np.isfinite(result[0]) and np.isnan(result[1])


@needs_float64
@pytest.mark.parametrize(
    ("objective", "output"),
    [
        ("spread", "weights"),
        ("spread", "mean"),
        ("rank_weighted_spread", "sorted"),
    ],
)
def test_gradient_matches_finite_differences(rng, objective, output):
    values, scores = instances(rng, batch=1, n=8)
    scores = scores / 4.0
    loss = QuantileObjective(objective, epsilon=0.1, output=output, dtype="float64")
    a = tensor(values, "float64")
    g = grad(lambda c: loss.call(a, c), scores)
    numeric = np.zeros_like(scores)
    h = 1e-6
    for index in np.ndindex(scores.shape):
        step = np.zeros_like(scores)
        step[index] = h
        plus = per_instance(loss, values, scores + step, "float64").sum()
        minus = per_instance(loss, values, scores - step, "float64").sum()
        numeric[index] = (plus - minus) / (2 * h)
    np.testing.assert_allclose(g, numeric, rtol=1e-5, atol=1e-8)
    assert np.abs(g).max() > 1e-2


# --------------------------------------------------------------------------------------------
# Training and saving
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_any_scorer_trains_and_the_model_round_trips(rng, tmp_path):
    features = rng.normal(size=(64, N, M)).astype("float32")
    values = (features @ np.array([1.0, -2.0, 0.5]) + rng.normal(size=(64, N))).astype("float32")
    values[::4, -2:] = np.nan  # every fourth instance is two entries shorter
    model = keras.Sequential(
        [keras.Input((N, M)), keras.layers.Dense(4, "tanh"), keras.layers.Dense(1)]
    )
    model.compile(
        keras.optimizers.Adam(0.05),
        loss=QuantileObjective("spread", 0.25, epsilon=0.05),
        metrics=[HardQuantileObjective("spread", 0.25)],
        **COMPILE,
    )
    history = model.fit(features, values, batch_size=16, epochs=5, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0] - 0.5 and history.history["hard_quantile_objective"][-1] < -1.0
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.loss, QuantileObjective)
    assert loaded.loss.get_config() == model.loss.get_config()
    np.testing.assert_allclose(
        to_numpy(loaded.loss(values[:16], loaded(features[:16]))),
        to_numpy(model.loss(values[:16], model(features[:16]))),
        rtol=1e-6,
    )


@keras.saving.register_keras_serializable(package="tests")
def low_minus_high_max(low, high):
    return keras.ops.max(low, axis=-1) - keras.ops.max(high, axis=-1)


def test_config_round_trip_with_a_registered_objective(rng):
    loss = QuantileObjective(low_minus_high_max, 0.5, epsilon=0.2, output="sorted")
    config = loss.get_config()
    restored = QuantileObjective.from_config(config)
    assert restored.objective_function is low_minus_high_max
    values, scores = instances(rng)
    np.testing.assert_allclose(
        per_instance(restored, values, scores, "float32"),
        per_instance(loss, values, scores, "float32"),
    )
    assert QuantileObjective().get_config()["objective"] == "spread"
    with pytest.raises(ValueError, match="not registered"):
        QuantileObjective(lambda low, high: low.mean() - high.mean()).get_config()


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [QuantileObjective, HardQuantileObjective])
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"objective": "sharpe"}, ValueError, "Received: objective='sharpe'"),
        ({"objective": 3}, TypeError, "Received: objective=3"),
        ({"quantile": 0.0}, ValueError, "Received: quantile=0.0"),
        ({"quantile": 0.6}, ValueError, "Received: quantile=0.6"),
        ({"output": "ranks"}, ValueError, "Received: output='ranks'"),
        ({"objective": "rank_weighted_spread"}, ValueError, "Received: output='weights'"),
    ],
)
def test_argument_errors(make, kwargs, error, match):
    with pytest.raises(error, match=match):
        make(**kwargs)


def test_epsilon_and_call_errors(rng):
    with pytest.raises(ValueError, match="Received: epsilon=0"):
        QuantileObjective(epsilon=0)
    values, scores = instances(rng)
    loss = QuantileObjective()
    with pytest.raises(TypeError, match=r"Received: y_pred\.dtype=int"):
        loss(values, scores.astype("int32"))
    with pytest.raises(
        ValueError, match=r"Received: y_true\.shape=\(4, 12\), y_pred\.shape=\(4, 11\)"
    ):
        loss(values, scores[:, :11])
    with pytest.raises(ValueError, match=r"Received: y_true\.shape=\(12,\)"):
        loss(values[0], scores[0])
    with pytest.raises(ValueError, match=r"y_pred\.shape=\(4, 12\)"):
        HardQuantileObjective().update_state(values[:, :, None, None], scores)
    assert objectives.get("spread") is loss.objective_function


def test_docstring_examples():
    globs = {"np": np, "keras": keras, "keras_softquantile": keras_softquantile}
    for module in [quantile_objective, quantile_objective_metric]:
        result = doctest.testmod(module, extraglobs=globs, optionflags=doctest.ELLIPSIS)
        assert result.attempted >= 3 and result.failed == 0, (module.__name__, result)
