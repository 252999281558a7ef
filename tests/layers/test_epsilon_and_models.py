"""The epsilon weight (annealing, learning) and use in Sequential and subclassed models."""

import keras
import numpy as np
import pytest

from keras_softquantile import layers, ops

to_numpy = keras.ops.convert_to_numpy


def _data(rng, n=6, batch=16):
    x = rng.standard_normal((batch, n)).astype("float32")
    y = (x > np.sort(x, axis=-1)[:, -3:-2]).astype("float32")  # hard top-2 mask of x
    return x, y


def test_epsilon_is_a_non_trainable_weight():
    layer = layers.SoftTopK(2, epsilon=0.05)
    layer.build((None, 6))
    assert layer.trainable_weights == [] and layer.non_trainable_weights == [layer.epsilon_variable]
    assert layer.epsilon_variable.dtype == "float32"
    layer.set_epsilon(0.2)
    assert float(to_numpy(layer.epsilon_variable)) == pytest.approx(0.2)
    assert layer.get_config()["epsilon"] == 0.05  # the config keeps the constructor value


def test_set_epsilon_changes_the_output(rng):
    x, _ = _data(rng)
    layer = layers.SoftRank(epsilon=0.1)
    first = layer(x)
    np.testing.assert_array_equal(to_numpy(first), to_numpy(ops.soft_rank(x, epsilon=0.1)))
    layer.set_epsilon(1e-3)
    np.testing.assert_array_equal(to_numpy(layer(x)), to_numpy(ops.soft_rank(x, epsilon=1e-3)))


class CountingTopK(layers.SoftTopK):
    """Counts executions of `call`: inside `fit`, one per trace of the train step."""

    calls = 0

    def call(self, inputs, mask=None):
        CountingTopK.calls += 1
        return super().call(inputs, mask=mask)


class Anneal(keras.callbacks.Callback):
    def __init__(self, layer, schedule):
        super().__init__()
        self.layer, self.schedule, self.seen, self.traces = layer, schedule, [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.layer.set_epsilon(self.schedule[epoch])

    def on_train_batch_end(self, batch, logs=None):
        self.model  # noqa: B018 (under JAX, reaching the model syncs `fit`'s state back)
        self.seen.append(float(self.layer.get_epsilon()))

    def on_epoch_end(self, epoch, logs=None):
        self.traces.append(CountingTopK.calls)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.slow
def test_annealing_callback_does_not_retrace(rng, jit_compile):
    if keras.backend.backend() == "torch" or (keras.backend.backend() == "jax" and not jit_compile):
        pytest.skip("`fit` runs the train step eagerly here: nothing is traced")
    x, y = _data(rng)
    topk = CountingTopK(2, epsilon=0.3)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(6), topk])
    model.compile("adam", "mse", jit_compile=jit_compile)
    schedule = [0.3, 0.1, 0.03]
    callback = Anneal(topk, schedule)
    model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[callback])
    assert callback.seen == pytest.approx([0.3, 0.3, 0.1, 0.1, 0.03, 0.03])
    # One trace of the train step for all epochs, whatever epsilon was.
    assert callback.traces[0] >= 1 and callback.traces[-1] == callback.traces[0], callback.traces
    hidden = model.layers[0](x)
    np.testing.assert_allclose(
        to_numpy(model(x)),
        to_numpy(ops.soft_topk_mask(hidden, 2, epsilon=0.03)),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.slow
def test_trainable_epsilon_is_learned_and_stays_positive(rng):
    x, y = _data(rng, batch=32)
    topk = layers.SoftTopK(2, epsilon=0.5, trainable_epsilon=True)
    model = keras.Sequential([keras.Input((6,)), topk])
    assert [w.name for w in model.trainable_weights] == ["log_epsilon"]
    model.compile(keras.optimizers.Adam(0.1), "mse")
    model.fit(x, y, epochs=5, batch_size=32, verbose=0)
    # The targets are the hard top-2 of the inputs: sharper is better, so epsilon shrinks.
    epsilon = float(topk.get_epsilon())
    assert 0 < epsilon < 0.5
    assert float(to_numpy(topk.epsilon_variable)) == pytest.approx(np.log(epsilon), rel=1e-5)
    np.testing.assert_allclose(
        to_numpy(model(x)),
        to_numpy(ops.soft_topk_mask(x, 2, epsilon=epsilon)),
        rtol=1e-4,
        atol=1e-5,
    )


class Selector(keras.Model):
    """A subclassed model: scores by a Dense, then soft top-k and quartile means."""

    def __init__(self, n, **kwargs):
        super().__init__(**kwargs)
        self.scorer = keras.layers.Dense(n)
        self.topk = layers.SoftTopK(0.5, epsilon=0.05)
        self.split = layers.SoftQuantileSplit(0.25, epsilon=0.05, output="mean")

    def call(self, x):
        scores = self.scorer(x)
        low, high = self.split([x, scores])
        selected = keras.ops.sum(self.topk(scores) * x, axis=-1)
        return selected + high - low


def test_subclassed_model(rng):
    x, _ = _data(rng, n=8)
    model = Selector(8)
    y = model(x)
    assert y.shape == (16,)
    scores = model.scorer(x)
    low, high = ops.soft_quantile_split(x, scores, 0.25, epsilon=0.05, output="mean")
    expected = keras.ops.sum(
        ops.soft_topk_mask(scores, 4, epsilon=0.05) * keras.ops.convert_to_tensor(x), -1
    )
    expected = expected + high - low
    np.testing.assert_allclose(to_numpy(y), to_numpy(expected), rtol=1e-4, atol=1e-4)
    model.compile("adam", "mse")
    history = model.fit(x, np.zeros(16, "float32"), epochs=1, batch_size=8, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert len(model.non_trainable_weights) == 2  # one epsilon weight per soft layer


def test_sequential_stack(rng):
    x, _ = _data(rng, n=8)
    model = keras.Sequential(
        [keras.Input((8,)), layers.SoftSort(epsilon=0.01), layers.SoftQuantiles([0.25, 0.75])]
    )
    assert model.output_shape == (None, 2)
    expected = ops.soft_quantile(ops.soft_sort(x, epsilon=0.01), [0.25, 0.75])
    np.testing.assert_allclose(to_numpy(model(x)), to_numpy(expected), rtol=1e-6)
