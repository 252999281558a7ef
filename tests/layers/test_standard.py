"""The standard layer checks (`keras_softquantile.testing.run_layer_test`) on every layer."""

import math

import numpy as np
import pytest
from layer_inputs import distinct_scores

from keras_softquantile import layers, ops
from keras_softquantile.testing import run_layer_test


@pytest.mark.slow
def test_soft_topk_count(rng, tmp_path):
    x = distinct_scores(rng, (4, 8))
    result = run_layer_test(
        layers.SoftTopK,
        {"k": 3, "epsilon": 0.05},
        x,
        (4, 8),
        expected_output=ops.soft_topk_mask(x, 3, epsilon=0.05),
        temp_dir=str(tmp_path),
    )
    np.testing.assert_allclose(result["output"].sum(-1), 3.0, rtol=1e-5)
    # Mixed precision keeps the exact budget k up to the output dtype's rounding.
    np.testing.assert_allclose(result["mixed"]["mixed_float16"].sum(-1), 3.0, rtol=5e-3)


@pytest.mark.slow
def test_soft_topk_fraction_axis_1(rng, tmp_path):
    x = distinct_scores(rng, (3, 5, 10)).transpose(0, 2, 1).copy()  # n = 10 along axis 1
    result = run_layer_test(
        layers.SoftTopK,
        {"k": 0.3, "epsilon": 0.05, "axis": 1},
        x,
        (3, 10, 5),
        expected_output=ops.soft_topk_mask(x, 3, epsilon=0.05, axis=1),
        rtol=1e-4,
        atol=1e-5,
        temp_dir=str(tmp_path),
    )
    np.testing.assert_allclose(result["output"].sum(1), 3.0, rtol=1e-5)


@pytest.mark.slow
def test_soft_topk_trainable_epsilon(rng, tmp_path):
    x = distinct_scores(rng, (4, 6))
    result = run_layer_test(
        layers.SoftTopK,
        {"k": 2, "epsilon": 0.1, "trainable_epsilon": True},
        x,
        (4, 6),
        expected_output=ops.soft_topk_mask(x, 2, epsilon=0.1),
        mixed_precision_policies=(),
        temp_dir=str(tmp_path),
    )
    layer = result["model"].layers[-1]
    assert [w.path.split("/")[-1] for w in layer.trainable_weights] == ["log_epsilon"]


# With output="weights" nothing depends on `values`: its Dense gets no gradient, as it should.
@pytest.mark.filterwarnings("ignore:Gradients do not exist:UserWarning")
@pytest.mark.parametrize("output", ["weights", "mean", "sorted"])
@pytest.mark.slow
def test_soft_quantile_split(rng, tmp_path, output):
    scores = distinct_scores(rng, (3, 8))
    values = rng.standard_normal((3, 8)).astype("float32")
    k = math.floor(0.25 * 8)
    shape = {"weights": (3, 8), "mean": (3,), "sorted": (3, k)}[output]
    epsilon = 1e-3 if output == "sorted" else 0.05
    expected = ops.soft_quantile_split(values, scores, 0.25, epsilon=epsilon, output=output)
    result = run_layer_test(
        layers.SoftQuantileSplit,
        {"quantile": 0.25, "epsilon": epsilon, "output": output},
        [values, scores],
        (shape, shape),
        expected_output=expected,
        mixed_precision_policies=("mixed_float16",),
        temp_dir=str(tmp_path),
    )
    low, high = result["output"]
    if output == "weights":
        np.testing.assert_allclose(low.sum(-1), 2.0, rtol=1e-5)
        np.testing.assert_allclose(high.sum(-1), 2.0, rtol=1e-5)
    elif output == "sorted":
        # Sharp enough to match the hard selection ordered by ascending score.
        order = np.argsort(scores, axis=-1)
        hard = np.take_along_axis(values, order, axis=-1)
        np.testing.assert_allclose(low, hard[:, :k], atol=1e-3)
        np.testing.assert_allclose(high, hard[:, -k:], atol=1e-3)


@pytest.mark.slow
def test_soft_quantile_masks(rng, tmp_path):
    x = distinct_scores(rng, (2, 3, 8))
    result = run_layer_test(
        layers.SoftQuantileMasks,
        {"quantiles": (0.25, 0.75), "epsilon": 0.05},
        x,
        (2, 3, 8, 3),
        expected_output=ops.soft_quantile_masks(x, (0.25, 0.75), epsilon=0.05),
        temp_dir=str(tmp_path),
    )
    masks = result["output"]
    np.testing.assert_allclose(masks.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(masks.sum(-2), np.broadcast_to([2.0, 4.0, 2.0], (2, 3, 3)), 1e-5)


@pytest.mark.slow
def test_soft_sort(rng, tmp_path):
    x = distinct_scores(rng, (3, 6))
    result = run_layer_test(
        layers.SoftSort,
        {"epsilon": 0.01, "descending": True},
        x,
        (3, 6),
        expected_output=ops.soft_sort(x, epsilon=0.01, descending=True),
        temp_dir=str(tmp_path),
    )
    np.testing.assert_allclose(result["output"], -np.sort(-x, axis=-1), atol=1e-2)
    np.testing.assert_allclose(result["output"].sum(-1), x.sum(-1), rtol=1e-5)


def test_soft_rank(rng, tmp_path):
    x = distinct_scores(rng, (3, 6))
    result = run_layer_test(
        layers.SoftRank,
        {"epsilon": 0.01},
        x,
        (3, 6),
        expected_output=ops.soft_rank(x, epsilon=0.01),
        temp_dir=str(tmp_path),
    )
    hard = np.argsort(np.argsort(x, axis=-1), axis=-1)
    np.testing.assert_allclose(result["output"], hard, atol=1e-2)
    np.testing.assert_allclose(result["output"].sum(-1), 15.0, rtol=1e-5)


@pytest.mark.parametrize(("quantiles", "shape"), [(0.5, (3,)), ([0.0, 0.25, 1.0], (3, 3))])
@pytest.mark.slow
def test_soft_quantiles(rng, tmp_path, quantiles, shape):
    x = distinct_scores(rng, (3, 9))
    result = run_layer_test(
        layers.SoftQuantiles,
        {"quantiles": quantiles, "epsilon": 1e-3},
        x,
        shape,
        expected_output=ops.soft_quantile(x, quantiles, epsilon=1e-3),
        mixed_precision_policies=("mixed_bfloat16",),
        temp_dir=str(tmp_path),
    )
    hard = np.quantile(x, quantiles, axis=-1)
    hard = hard.T if isinstance(quantiles, list) else hard
    np.testing.assert_allclose(result["output"], hard, atol=1e-3)


class _ForgetfulTopK(layers.SoftTopK):
    """Takes an argument that `get_config` does not list: the helper must notice."""

    def __init__(self, k, scale=1.0, **kwargs):
        super().__init__(k, **kwargs)
        self.scale = scale


def test_the_helper_catches_broken_layers(rng):
    x = distinct_scores(rng, (2, 5))
    with pytest.raises(AssertionError, match=r"misses constructor arguments \['scale'\]"):
        run_layer_test(_ForgetfulTopK, {"k": 2}, x, (2, 5), run_fit=False, run_saving=False)
    with pytest.raises(AssertionError, match="eager call vs expected"):
        run_layer_test(
            layers.SoftTopK, {"k": 2}, x, (2, 5), expected_output=ops.soft_topk_mask(x, 3)
        )
    with pytest.raises(AssertionError, match="shapes"):
        run_layer_test(layers.SoftTopK, {"k": 2}, x, (2, 6))
