"""XLA-compiled training and prediction, and SavedModel export, of models of soft layers."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_softquantile import layers

N = 8


def _selection_model():
    """Scores from a Dense, then the few-bucket layers (the usual training-time heads)."""
    inputs = keras.Input((N,))
    scores = keras.layers.Dense(N, name="scorer")(inputs)
    low, high = layers.SoftQuantileSplit(0.25, epsilon=0.05)([inputs, scores])
    outputs = {
        "topk": layers.SoftTopK(0.25, epsilon=0.05)(scores),
        "split": keras.layers.Concatenate()([low, high]),
    }
    return keras.Model(inputs, outputs)


def _sorting_model(everything=False):
    """The layers whose transport has many targets (XLA-compiled forward only: slow to build)."""
    inputs = keras.Input((N,))
    outputs = {
        "sort": layers.SoftSort(epsilon=0.05, descending=True)(inputs),
        "quantiles": layers.SoftQuantiles([0.1, 0.5, 0.9], epsilon=0.05)(inputs),
    }
    if everything:
        sorted_low, sorted_high = layers.SoftQuantileSplit(0.25, epsilon=0.05, output="sorted")(
            [inputs, -inputs]
        )
        mean_low, _ = layers.SoftQuantileSplit(0.25, epsilon=0.05, output="mean")([inputs, inputs])
        outputs.update(
            {
                "rank": layers.SoftRank(epsilon=0.05)(inputs),
                "masks": layers.SoftQuantileMasks((0.25, 0.75), epsilon=0.05)(inputs),
                "sorted": keras.layers.Concatenate()([sorted_low, sorted_high]),
                "mean_low": mean_low,
            }
        )
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def data():
    return np.random.default_rng(7).standard_normal((16, N)).astype("float32")


@pytest.mark.slow
def test_fit_with_xla_matches_fit_without(data):
    rng = np.random.default_rng(8)
    targets = {
        "topk": rng.uniform(size=(16, N)),
        "split": rng.uniform(size=(16, 2 * N)),
    }
    results = {}
    for jit_compile in (False, True):
        keras.utils.set_random_seed(3)
        model = _selection_model()
        model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=jit_compile)
        history = model.fit(data, targets, epochs=2, batch_size=8, verbose=0)
        assert np.all(np.isfinite(history.history["loss"]))
        results[jit_compile] = (history.history["loss"], model.get_layer("scorer").get_weights())
    assert results[False][0][1] < results[False][0][0]  # it learns
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-3)
    for a, b in zip(results[True][1], results[False][1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_xla_prediction_matches_eager(data):
    model = _sorting_model()
    eager = model(data)
    compiled = tf.function(model, jit_compile=True)(tf.constant(data))
    for key, value in eager.items():
        np.testing.assert_allclose(compiled[key].numpy(), value.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(eager["sort"].numpy().sum(-1), data.sum(-1), rtol=1e-4, atol=1e-5)


def test_xla_with_a_keras_mask():
    inputs = keras.Input((6, 2))
    masked = keras.layers.Masking()(inputs)
    model = keras.Model(inputs, layers.SoftTopK(0.5, epsilon=0.05, axis=1)(masked))
    x = np.random.default_rng(5).uniform(1, 2, size=(4, 6, 2)).astype("float32")
    x[1, 3:] = 0.0
    x[2, 1:] = 0.0
    compiled = tf.function(model, jit_compile=True)(tf.constant(x)).numpy()
    np.testing.assert_allclose(compiled, model(x).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(compiled.sum(1)[:, 0], [3.0, 1.5, 0.5, 3.0], rtol=1e-5)
    assert np.all(compiled[1, 3:] == 0) and np.all(compiled[2, 1:] == 0)


@pytest.mark.slow
def test_export_saved_model_reproduces_outputs(data, tmp_path):
    model = _selection_model()
    expected = model(data)
    path = str(tmp_path / "exported")
    model.export(path, verbose=False)
    restored = tf.saved_model.load(path)
    served = restored.serve(tf.constant(data))
    assert set(served) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(served[key].numpy(), value.numpy(), rtol=1e-5, atol=1e-6)
    # Another batch size goes through the same serving function.
    np.testing.assert_allclose(
        restored.serve(tf.constant(data[:3]))["topk"].numpy(), expected["topk"].numpy()[:3], 1e-5
    )


def test_keras_file_round_trip_of_a_model_of_every_layer(data, tmp_path):
    inputs = keras.Input((N,))
    selection, sorting = _selection_model(), _sorting_model(everything=True)
    model = keras.Model(inputs, {**selection(inputs), **sorting(inputs)})
    for layer in selection.layers + sorting.layers:
        if hasattr(layer, "set_epsilon"):
            layer.set_epsilon(0.02)
    expected = model(data)
    path = str(tmp_path / "all.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    got = loaded(data)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key].numpy(), value.numpy())
