"""Padding reaching a layer whose op has no mask support never yields plausible numbers.

`SoftSort`, `SoftRank` and `SoftQuantiles` cannot exclude padded entries. A Keras mask with a
False entry is a `ValueError` eagerly and an `InvalidArgumentError` inside `tf.function`. Under
`jit_compile=True` XLA drops the assertion, so the rows holding padding come out NaN (and only
those rows), instead of a sort with the padding sorted in.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_softquantile import layers

MESSAGE = "cannot exclude padded entries"

# [batch=4, n=5, features=1]; rows 1 and 3 end with padding (Masking's value 0).
X = np.array(
    [
        [3.0, 1.0, 2.0, 5.0, 4.0],
        [3.0, 1.0, 2.0, 0.0, 0.0],
        [4.0, 2.0, 1.0, 3.0, 6.0],
        [0.5, 1.5, 0.0, 0.0, 0.0],
    ],
    "float32",
)[..., None]
PADDED_ROWS = np.array([False, True, False, True])

LAYERS = {
    "SoftSort": lambda: layers.SoftSort(axis=1, epsilon=1e-2),
    "SoftSort descending": lambda: layers.SoftSort(axis=1, epsilon=1e-2, descending=True),
    "SoftRank": lambda: layers.SoftRank(axis=1, epsilon=1e-2),
    "SoftQuantiles scalar": lambda: layers.SoftQuantiles(0.5, axis=1, epsilon=1e-2),
    "SoftQuantiles list": lambda: layers.SoftQuantiles([0.25, 0.75], axis=1, epsilon=1e-2),
}


def _masked_model(name: str) -> keras.Model:
    inputs = keras.Input((5, 1))
    masked = keras.layers.Masking(mask_value=0.0)(inputs)
    return keras.Model(inputs, LAYERS[name]()(masked))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_padding_is_a_value_error_eagerly(name):
    model = _masked_model(name)
    with pytest.raises(ValueError, match=MESSAGE):
        model(X)
    with pytest.raises(ValueError, match=MESSAGE):
        LAYERS[name]()(X, mask=X[..., 0] != 0)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_padding_is_an_invalid_argument_error_in_function(name):
    model = _masked_model(name)
    with pytest.raises(tf.errors.InvalidArgumentError, match=MESSAGE):
        tf.function(model)(X)


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.slow
def test_padding_gives_nan_in_exactly_the_padded_rows_under_xla(name):
    model = _masked_model(name)
    y = tf.function(model, jit_compile=True)(X).numpy().reshape(len(X), -1)
    assert np.isnan(y[PADDED_ROWS]).all()
    assert np.isfinite(y[~PADDED_ROWS]).all()
    # The unpadded rows are what the layer gives without any mask.
    unmasked = tf.function(model.layers[-1], jit_compile=True)(X[~PADDED_ROWS])
    np.testing.assert_allclose(y[~PADDED_ROWS], unmasked.numpy().reshape(len(unmasked), -1))


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("jit_compile", [False, True])
def test_an_all_valid_mask_changes_nothing(name, jit_compile):
    model = _masked_model(name)
    full = X[~PADDED_ROWS]
    expected = model.layers[-1](full).numpy()
    got = tf.function(model, jit_compile=jit_compile)(full).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_nan_rows_follow_the_axis_not_the_batch():
    # Sorting along the features of each timestep: only the padded timesteps are NaN.
    x = np.stack([X[..., 0], X[..., 0] + 1.0], axis=-1)  # [4, 5, 2]
    mask = X[..., 0] != 0  # [4, 5], broadcast over the features
    layer = layers.SoftSort(axis=-1, epsilon=1e-2)
    y = tf.function(lambda t, m: layer(t, mask=m), jit_compile=True)(x, mask).numpy()
    assert np.isnan(y[~mask]).all()
    assert np.isfinite(y[mask]).all()
