"""Keras masks exclude padded entries, and are propagated where outputs align with inputs."""

import keras
import numpy as np
import pytest

from keras_softquantile import layers, ops

to_numpy = keras.ops.convert_to_numpy


@pytest.fixture
def padded(rng):
    """[batch=3, n=7, features=2] with trailing padding (all-zero timesteps) per row."""
    x = rng.uniform(0.5, 2.0, size=(3, 7, 2)).astype("float32")
    lengths = np.array([7, 5, 3])
    valid = np.arange(7)[None, :] < lengths[:, None]
    x[~valid] = 0.0
    return x, valid, lengths


def _masked_model(layer, features=2, n=7):
    inputs = keras.Input((n, features))
    masked = keras.layers.Masking(mask_value=0.0)(inputs)
    outputs = layer(masked)
    return keras.Model(inputs, outputs), outputs


def test_topk_count_with_masking_layer(padded):
    x, valid, _ = padded
    model, symbolic = _masked_model(layers.SoftTopK(2, epsilon=0.01, axis=1))
    assert symbolic._keras_mask.shape == (None, 7)
    y = model(x)
    mask3 = np.broadcast_to(valid[:, :, None], x.shape)
    expected = ops.soft_topk_mask(x, 2, epsilon=0.01, axis=1, mask=mask3)
    np.testing.assert_array_equal(to_numpy(y), to_numpy(expected))
    assert np.all(to_numpy(y)[~valid] == 0.0)
    np.testing.assert_allclose(to_numpy(y).sum(axis=1), 2.0, rtol=1e-5)
    np.testing.assert_array_equal(to_numpy(y._keras_mask), valid)  # mask kept


def test_topk_fraction_resolves_against_unmasked_length(padded):
    x, valid, lengths = padded
    model, _ = _masked_model(layers.SoftTopK(0.4, epsilon=0.01, axis=1))
    y = to_numpy(model(x))
    assert np.all(y[~valid] == 0.0)
    # Each row selects 40% of its own valid entries: 2.8, 2.0 and 1.2.
    np.testing.assert_allclose(y.sum(axis=1), np.repeat(0.4 * lengths[:, None], 2, 1), rtol=1e-5)


def test_quantile_masks_with_masking_layer(padded):
    x, valid, lengths = padded
    model, symbolic = _masked_model(layers.SoftQuantileMasks((0.5,), epsilon=0.01, axis=1))
    assert symbolic.shape == (None, 7, 2, 2)
    y = model(x)
    masks = to_numpy(y)
    assert np.all(masks[~valid] == 0.0)
    np.testing.assert_allclose(masks[valid].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(masks.sum(axis=1)[:, 0, :], 0.5 * lengths[:, None] * [1, 1], 1e-5)
    np.testing.assert_array_equal(to_numpy(y._keras_mask), valid)


def test_split_with_embedding_mask(rng):
    tokens = np.array([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 0, 0, 0, 0]])
    valid = tokens != 0
    inputs = keras.Input((8,), dtype="int32")
    embedded = keras.layers.Embedding(10, 3, mask_zero=True)(inputs)
    scores = keras.layers.Dense(3)(embedded)  # Dense passes the mask on
    low, high = layers.SoftQuantileSplit(0.25, epsilon=0.01, axis=1)([embedded, scores])
    mean_low, _ = layers.SoftQuantileSplit(0.25, epsilon=0.01, axis=1, output="mean")(
        [embedded, scores]
    )
    assert low._keras_mask is not None and getattr(mean_low, "_keras_mask", None) is None
    model = keras.Model(inputs, [low, high, mean_low, embedded, scores])
    low, high, mean_low, embedded, scores = model(tokens)
    mask3 = np.broadcast_to(valid[:, :, None], scores.shape)
    expected = ops.soft_quantile_split(embedded, scores, 0.25, epsilon=0.01, axis=1, mask=mask3)
    np.testing.assert_array_equal(to_numpy(low), to_numpy(expected[0]))
    np.testing.assert_array_equal(to_numpy(high), to_numpy(expected[1]))
    assert np.all(to_numpy(low)[~valid] == 0.0)
    np.testing.assert_allclose(
        to_numpy(high).sum(axis=1), 0.25 * valid.sum(1)[:, None] * [1, 1, 1], 1e-5
    )
    np.testing.assert_array_equal(to_numpy(low._keras_mask), valid)
    expected_mean = ops.soft_quantile_split(
        embedded, scores, 0.25, epsilon=0.01, axis=1, mask=mask3, output="mean"
    )[0]
    np.testing.assert_allclose(to_numpy(mean_low), to_numpy(expected_mean), rtol=1e-6)


def test_mask_drops_after_reductions():
    inputs = keras.Input((6,))
    masked = keras.layers.Masking()(inputs)
    assert getattr(layers.SoftQuantiles(0.5)(masked), "_keras_mask", None) is None
    assert getattr(layers.SoftSort()(masked), "_keras_mask", None) is None
    assert layers.SoftRank()(masked)._keras_mask is not None


@pytest.mark.parametrize("cls", [layers.SoftRank, layers.SoftSort, layers.SoftQuantiles])
def test_sorting_layers_refuse_real_padding(cls):
    x = np.array([[3.0, 1.0, 2.0, 0.0]], "float32")
    model, _ = _masked_model(cls(axis=1), features=1, n=4)
    # An all-valid mask is harmless: the output equals the unmasked call.
    full = np.array([[3.0, 1.0, 2.0, 5.0]], "float32")[..., None]
    unmasked = cls(axis=1)(full)
    np.testing.assert_allclose(cls(axis=1)(full, mask=np.ones((1, 4), bool)), unmasked)
    with pytest.raises(ValueError, match="cannot exclude padded entries"):
        cls(axis=1)(x[..., None], mask=np.array([[True, True, True, False]]))
    if keras.backend.backend() == "tensorflow":  # in a graph: a run-time assertion
        import tensorflow as tf

        with pytest.raises(tf.errors.InvalidArgumentError, match="cannot exclude padded"):
            tf.function(lambda t: model(t))(x[..., None])
