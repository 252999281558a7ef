"""The layers under the active Keras backend, beyond the backend-neutral layer tests.

`.ci/other_backends` also runs tests/layers/test_standard.py, test_arguments.py,
test_epsilon_and_models.py, test_masking.py and tests/test_callbacks.py (the standard layer
checks, bad arguments, the epsilon weight, Keras masks, annealing and TensorBoard) under JAX and
PyTorch; this file adds what only matters across backends.
"""

import keras
import numpy as np
import pytest
from harness import backend, is_backend_tensor, to_numpy
from layer_inputs import distinct_scores

from keras_softquantile import layers, ops

SHAPE = (4, 8)


def _data(rng, n=8, batch=16):
    x = rng.standard_normal((batch, n)).astype("float32")
    y = (x > np.sort(x, axis=-1)[:, -3:-2]).astype("float32")  # the hard top-2 mask of x
    return x, y


def test_layers_return_backend_tensors(rng):
    x = distinct_scores(rng, SHAPE)
    for layer in (
        layers.SoftTopK(2),
        layers.SoftQuantileMasks(),
        layers.SoftSort(),
        layers.SoftRank(),
        layers.SoftQuantiles(0.5),
    ):
        out = layer(x)
        assert is_backend_tensor(out), (type(layer).__name__, type(out).__name__, backend())
        assert keras.backend.standardize_dtype(out.dtype) == "float32"
    low, high = layers.SoftQuantileSplit()([x, x])
    assert is_backend_tensor(low) and is_backend_tensor(high)


class Anneal(keras.callbacks.Callback):
    def __init__(self, layer, schedule):
        super().__init__()
        self.layer, self.schedule, self.seen = layer, schedule, []

    def on_epoch_begin(self, epoch, logs=None):
        self.layer.set_epsilon(self.schedule[epoch])

    def on_train_batch_end(self, batch, logs=None):
        # Through `self.model`: under JAX that syncs `fit`'s state back into the variables.
        assert self.model.layers[-1] is self.layer
        self.seen.append(float(to_numpy(self.layer.get_epsilon())))


def test_a_layer_model_trains_with_fit_and_anneals_epsilon(rng):
    x, y = _data(rng, batch=32)
    topk = layers.SoftTopK(2, epsilon=0.1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8), topk])
    model.compile(keras.optimizers.Adam(0.05), "mse")
    history = model.fit(x, y, epochs=10, batch_size=16, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
    # Annealing epsilon between epochs (the weight is read at run time: no retrace needed).
    schedule = [0.1, 0.03, 0.01]
    callback = Anneal(topk, schedule)
    model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[callback])
    assert callback.seen == pytest.approx(np.repeat(schedule, 2))
    hidden = model.layers[0](x)
    np.testing.assert_allclose(
        to_numpy(model(x)),
        to_numpy(ops.soft_topk_mask(hidden, 2, epsilon=0.01)),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.skipif(backend() != "jax", reason="only JAX's `fit` holds the variables apart")
def test_reading_epsilon_mid_epoch_without_a_sync_is_a_clear_error(rng):
    x, y = _data(rng, batch=16)
    topk = layers.SoftTopK(2, epsilon=0.1)
    model = keras.Sequential([keras.Input((8,)), topk])
    model.compile("adam", "mse")
    reader = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: topk.get_epsilon()  # not through `self.model`
    )
    with pytest.raises(RuntimeError, match=r"held in `fit`'s own state.*jax_state_sync"):
        model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[reader])
