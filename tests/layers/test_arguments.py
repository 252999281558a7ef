"""Bad construction arguments and bad call inputs fail early with clear messages."""

import re

import keras
import numpy as np
import pytest

import keras_softquantile
from keras_softquantile import layers


@pytest.mark.parametrize(
    ("cls", "kwargs", "error", "message"),
    [
        (layers.SoftTopK, {"k": -1}, ValueError, "Received: k=-1"),
        (layers.SoftTopK, {"k": 0}, ValueError, "Received: k=0"),
        (layers.SoftTopK, {"k": 0.0}, ValueError, "Received: k=0.0"),
        (layers.SoftTopK, {"k": float("nan")}, ValueError, "Received: k=nan"),
        (layers.SoftTopK, {"k": "3"}, TypeError, "Received: k='3'"),
        (layers.SoftTopK, {"k": True}, TypeError, "Received: k=True"),
        (layers.SoftTopK, {"k": 2, "epsilon": 0.0}, ValueError, "Received: epsilon=0.0"),
        (layers.SoftTopK, {"k": 2, "epsilon": -1}, ValueError, "Received: epsilon=-1"),
        (layers.SoftTopK, {"k": 2, "epsilon": None}, TypeError, "Received: epsilon=None"),
        (layers.SoftTopK, {"k": 2, "axis": 1.5}, TypeError, "Received: axis=1.5"),
        (layers.SoftTopK, {"k": 2, "solver": "lbfgs"}, ValueError, "Received: solver='lbfgs'"),
        (
            layers.SoftTopK,
            {"k": 2, "trainable_epsilon": "yes"},
            TypeError,
            "Received: trainable_epsilon='yes'",
        ),
        (layers.SoftQuantileSplit, {"quantile": 0.7}, ValueError, "Received: quantile=0.7"),
        (layers.SoftQuantileSplit, {"quantile": 0}, ValueError, "Received: quantile=0"),
        (layers.SoftQuantileSplit, {"output": "max"}, ValueError, "Received: output='max'"),
        (
            layers.SoftQuantileMasks,
            {"quantiles": (0.75, 0.25)},
            ValueError,
            "Received: quantiles=(0.75, 0.25)",
        ),
        (layers.SoftQuantileMasks, {"quantiles": (0.0,)}, ValueError, "Received: quantiles=(0.0,)"),
        (layers.SoftQuantiles, {"quantiles": 1.5}, ValueError, "Received: quantiles=1.5"),
        (layers.SoftRank, {"descending": 1}, TypeError, "Received: descending=1"),
        (layers.SoftSort, {"epsilon": float("inf")}, ValueError, "Received: epsilon=inf"),
    ],
)
def test_bad_construction_arguments(cls, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        cls(**kwargs)


def test_k_larger_than_n_fails_at_build():
    with pytest.raises(ValueError, match=re.escape("Received: k=7")):
        layers.SoftTopK(7)(keras.Input((5,)))


@pytest.mark.parametrize(
    "cls", [layers.SoftTopK, layers.SoftQuantileMasks, layers.SoftSort, layers.SoftRank]
)
def test_rank_one_input_fails_at_build(cls):
    kwargs = {"k": 1} if cls is layers.SoftTopK else {}
    with pytest.raises(ValueError, match=re.escape("Received: inputs.shape=(5,)")):
        cls(**kwargs).build((5,))


def test_axis_out_of_range_fails_at_build():
    with pytest.raises(ValueError, match=re.escape("Received: axis=3")):
        layers.SoftQuantileMasks(axis=3)(keras.Input((4, 5)))


@pytest.mark.parametrize("cls", [layers.SoftSort, layers.SoftRank, layers.SoftQuantiles])
def test_sorting_layers_need_a_static_length(cls):
    with pytest.raises(ValueError, match="statically known length"):
        cls()(keras.Input((None,)))


def test_split_needs_two_inputs_of_the_same_shape():
    with pytest.raises(
        ValueError, match=re.escape("values.shape=(None, 4), scores.shape=(None, 5)")
    ):
        layers.SoftQuantileSplit()([keras.Input((4,)), keras.Input((5,))])
    with pytest.raises(ValueError, match=r"list `\[values, scores\]`"):
        layers.SoftQuantileSplit().build((None, 4))
    with pytest.raises(ValueError, match=re.escape("values.shape")):
        layers.SoftQuantileSplit()([np.zeros((2, 4), "float32"), np.zeros((2, 5), "float32")])


def test_split_sorted_refuses_a_mask():
    layer = layers.SoftQuantileSplit(output="sorted")
    x = np.ones((2, 6), "float32")
    with pytest.raises(ValueError, match="output='sorted'"):
        layer([x, x], mask=[np.ones((2, 6), bool), None])


@pytest.mark.parametrize(
    ("layer", "inputs"),
    [
        (layers.SoftTopK(2), keras.Input((5,), dtype="int32")),
        (layers.SoftRank(), keras.Input((5,), dtype="int32")),
        (layers.SoftQuantiles(0.5), keras.Input((5,), dtype="int32")),
        (layers.SoftQuantileMasks(), keras.Input((5,), dtype="int32")),
        (layers.SoftSort(), keras.Input((5,), dtype="int32")),
        (
            layers.SoftQuantileSplit(),
            [keras.Input((5,)), keras.Input((5,), dtype="int32")],
        ),
    ],
)
def test_integer_inputs_fail_symbolically(layer, inputs):
    with pytest.raises(TypeError, match=r"floating-point .*Received: (inputs|scores)\.dtype=int32"):
        layer(inputs)


def test_integer_inputs_fail_eagerly():
    # int32: JAX without 64-bit mode would make int64 input int32 before the layer sees it.
    with pytest.raises(TypeError, match=re.escape("Received: inputs.dtype=int32")):
        layers.SoftTopK(2)(np.arange(10, dtype="int32").reshape(2, 5))


def test_set_epsilon_validates_and_needs_build():
    layer = layers.SoftTopK(2)
    with pytest.raises(RuntimeError, match="before it is built"):
        layer.set_epsilon(0.1)
    layer.build((None, 5))
    with pytest.raises(ValueError, match=re.escape("Received: epsilon=-0.1")):
        layer.set_epsilon(-0.1)


def test_public_exports():
    for name in [
        "SoftQuantileMasks",
        "SoftQuantileSplit",
        "SoftQuantiles",
        "SoftRank",
        "SoftSort",
        "SoftTopK",
    ]:
        assert getattr(keras_softquantile, name) is getattr(layers, name)
        assert name in keras_softquantile.__all__
        registered = keras.saving.get_registered_object(f"keras_softquantile>{name}")
        assert registered is getattr(layers, name)
    assert "soft_topk_mask" in keras_softquantile.__all__  # the ops exports stay
