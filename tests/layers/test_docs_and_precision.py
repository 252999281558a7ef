"""Docstring examples run as written; global mixed-precision policies train without NaN."""

import doctest

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_softquantile
from keras_softquantile import layers, ops
from keras_softquantile.layers import (
    soft_quantile_masks,
    soft_quantile_split,
    soft_quantiles,
    soft_rank,
    soft_sort,
    soft_topk,
)

MODULES = [
    soft_quantile_masks,
    soft_quantile_split,
    soft_quantiles,
    soft_rank,
    soft_sort,
    soft_topk,
]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_docstring_examples(module):
    globs = {"np": np, "keras": keras, "tf": tf, "keras_softquantile": keras_softquantile}
    result = doctest.testmod(
        module, extraglobs=globs, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted >= 2 and result.failed == 0, result


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.slow
def test_global_mixed_precision_policy_fit(rng, policy):
    keras.config.set_dtype_policy(policy)  # reset by the autouse fixture
    compute = policy.split("_")[1]
    x = rng.standard_normal((16, 2, 8)).astype("float32")
    inputs = keras.Input((2, 8))
    scores = keras.layers.Dense(8)(inputs)
    topk = layers.SoftTopK(0.25, epsilon=0.05)
    masks = layers.SoftQuantileMasks((0.5,), epsilon=0.05)
    outputs = keras.layers.Concatenate()([topk(scores), masks(scores)[..., 1]])
    model = keras.Model(inputs, outputs)
    assert topk.compute_dtype == compute and topk.epsilon_variable.dtype == "float32"
    y = model(x)
    assert keras.backend.standardize_dtype(y.dtype) == compute
    # The transport ran in float32: the budget of 2 per row holds to the output's rounding.
    np.testing.assert_allclose(np.asarray(y, "float32")[..., :8].sum(-1), 2.0, rtol=1e-2)
    model.compile("adam", "mse")  # LossScaleOptimizer under mixed_float16
    history = model.fit(x, np.zeros((16, 2, 16), "float32"), epochs=2, batch_size=8, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    hidden = model.layers[1](x)
    reference = ops.soft_topk_mask(tf.cast(hidden, "float32"), 2, epsilon=0.05)
    np.testing.assert_allclose(
        np.asarray(model(x), "float32")[..., :8], reference.numpy(), atol=5e-2
    )
    assert not np.any(np.isnan(np.asarray(model(x), "float32")))
