"""A realistic use: learning a scorer through a soft top-k ranking objective.

Each query holds `n` candidate items described by `d` features; the relevant items are the
`k` with the highest hidden utility (a nonlinear function of the features plus noise). A small
Dense scorer feeds `SoftTopK`, trained with `fit` to reproduce the hard top-k mask; on
held-out queries its hard top-k precision must beat the untrained scorer's clearly.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_softquantile import layers

N_ITEMS, N_FEATURES, K = 12, 6, 3


def _make_queries(rng, count, weights):
    features = rng.standard_normal((count, N_ITEMS, N_FEATURES)).astype("float32")
    utility = features @ weights + 0.5 * np.tanh(features[..., 0] * features[..., 1])
    utility += 0.1 * rng.standard_normal(utility.shape)
    threshold = np.sort(utility, axis=-1)[:, -K][:, None]
    relevant = (utility >= threshold).astype("float32")
    return features, relevant


def _precision_at_k(scores, relevant):
    top = np.argsort(-scores, axis=-1)[:, :K]
    return float(np.take_along_axis(relevant, top, axis=-1).sum(-1).mean() / K)


@pytest.mark.slow
def test_soft_topk_ranking_model_learns():
    rng = np.random.default_rng(2024)
    keras.utils.set_random_seed(11)
    weights = rng.standard_normal(N_FEATURES).astype("float32")
    x_train, y_train = _make_queries(rng, 512, weights)
    x_test, y_test = _make_queries(rng, 256, weights)

    inputs = keras.Input((N_ITEMS, N_FEATURES))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    scores = keras.layers.Reshape((N_ITEMS,), name="scores")(keras.layers.Dense(1)(hidden))
    selected = layers.SoftTopK(K, epsilon=0.05)(scores)
    model = keras.Model(inputs, selected)
    scorer = keras.Model(inputs, scores)

    untrained = _precision_at_k(scorer(x_test).numpy(), y_test)
    model.compile(keras.optimizers.Adam(0.02), loss="binary_crossentropy")
    history = model.fit(x_train, y_train, epochs=4, batch_size=64, verbose=0)
    trained = _precision_at_k(scorer(x_test).numpy(), y_test)

    print("precision@k untrained", untrained, "trained", trained)
    assert history.history["loss"][-1] < history.history["loss"][0]
    chance = K / N_ITEMS
    assert trained > untrained + 0.2, (untrained, trained)
    assert trained > 0.75, (untrained, trained)
    assert trained > chance + 0.4
    # The soft mask is a budget of exactly K per query, close to the hard selection now.
    soft = model(x_test).numpy()
    np.testing.assert_allclose(soft.sum(-1), K, rtol=1e-4)
    hard = tf.one_hot(tf.math.top_k(scorer(x_test).numpy(), K).indices, N_ITEMS)
    overlap = float(np.mean(np.sum(soft * tf.reduce_sum(hard, 1).numpy(), -1) / K))
    assert overlap > 0.8, overlap
