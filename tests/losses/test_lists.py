"""The ranking inputs (`keras_softquantile.losses._lists`) under the active Keras backend:
labels and masks as keras-rs gives them, the list statistics, and every input error."""

import numpy as np
import pytest
from harness import float64_available, tensor, to_numpy

from keras_softquantile.losses import _lists

WIDEST = "float64" if float64_available() else "float32"


def np_average_ranks(values: np.ndarray) -> np.ndarray:
    """Ascending 0-based ranks, ties sharing their average rank (a loop: the reference)."""
    ranks = np.empty(len(values))
    for i, value in enumerate(values):
        ranks[i] = np.sum(values < value) + 0.5 * (np.sum(values == value) - 1)
    return ranks


def test_negative_labels_are_padding():
    labels, scores, mask = _lists.list_inputs(
        np.array([[2, -1, 0], [-1, 1, 3]]), np.zeros((2, 3), "float32")
    )
    np.testing.assert_array_equal(to_numpy(mask), [[True, False, True], [False, True, True]])
    np.testing.assert_array_equal(to_numpy(labels), [[2, 0, 0], [0, 1, 3]])
    assert to_numpy(labels).dtype == np.float32 and to_numpy(scores).dtype == np.float32


def test_a_dict_mask_combines_with_negative_labels():
    y_true = {
        "labels": tensor([[2.0, -1.0, 0.0, 1.0]]),
        "mask": tensor([[True, True, False, True]]),
    }
    labels, _, mask = _lists.list_inputs(y_true, tensor(np.zeros((1, 4)), WIDEST))
    np.testing.assert_array_equal(to_numpy(mask), [[True, False, False, True]])
    np.testing.assert_array_equal(to_numpy(labels), [[2, 0, 0, 1]])
    assert to_numpy(labels).dtype == np.dtype(WIDEST)
    _, _, mask = _lists.list_inputs({"labels": [[1.0, -2.0]]}, np.zeros((1, 2), "float32"))
    np.testing.assert_array_equal(to_numpy(mask), [[True, False]])


def test_padding_as_labels_carries_the_mask():
    labels, _, mask = _lists.list_inputs(
        {"labels": np.array([[3.0, 0.0, 1.0]]), "mask": np.array([[True, False, True]])},
        np.zeros((1, 3), "float32"),
    )
    encoded = _lists.padding_as_labels(labels, mask)
    np.testing.assert_array_equal(to_numpy(encoded), [[3, -1, 1]])
    again = _lists.list_inputs(encoded, np.zeros((1, 3), "float32"))
    np.testing.assert_array_equal(to_numpy(again[2]), to_numpy(mask))


def test_average_ranks_share_ties_and_ignore_padding(rng):
    values = rng.integers(0, 4, (6, 9)).astype("float32")
    mask = rng.random((6, 9)) < 0.7
    mask[0] = True
    got = to_numpy(_lists.average_ranks(tensor(values), tensor(mask)))
    for row in range(6):
        np.testing.assert_allclose(got[row][mask[row]], np_average_ranks(values[row][mask[row]]))
        np.testing.assert_array_equal(got[row][~mask[row]], 0)


def test_pearson_matches_numpy_and_is_zero_for_constant_rows(rng):
    x = rng.standard_normal((3, 7))
    y = x + rng.standard_normal((3, 7))
    y[1] = 2.0  # constant
    mask = np.ones((3, 7), bool)
    mask[2, :3] = False
    got = to_numpy(_lists.pearson(tensor(x, WIDEST), tensor(y, WIDEST), tensor(mask)))
    rtol = 1e-12 if WIDEST == "float64" else 1e-5
    np.testing.assert_allclose(got[0], np.corrcoef(x[0], y[0])[0, 1], rtol=rtol)
    assert got[1] == 0
    np.testing.assert_allclose(got[2], np.corrcoef(x[2, 3:], y[2, 3:])[0, 1], rtol=rtol)


def test_ideal_dcg_with_and_without_cutoff():
    labels = tensor(np.array([[0.0, 3.0, 1.0, 2.0]]), WIDEST)
    gains = np.array([7.0, 3.0, 1.0, 0.0])
    discounts = 1 / np.log2(2 + np.arange(4))
    np.testing.assert_allclose(to_numpy(_lists.ideal_dcg(labels, None)), [gains @ discounts])
    np.testing.assert_allclose(to_numpy(_lists.ideal_dcg(labels, 2)), [gains[:2] @ discounts[:2]])


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

SCORES = np.zeros((2, 3), "float32")


@pytest.mark.parametrize("dtype", ["int32", "int64", "bool"])
def test_non_float_predictions_are_a_type_error(dtype):
    with pytest.raises(
        TypeError, match=rf"`y_pred` must be a floating-point.*y_pred.dtype={dtype}"
    ):
        _lists.list_inputs(np.zeros((2, 3)), np.zeros((2, 3), dtype))


def test_a_non_boolean_mask_is_a_type_error():
    with pytest.raises(TypeError, match=r"`y_true\['mask'\]` must be a boolean.*dtype=float32"):
        _lists.list_inputs({"labels": np.zeros((2, 3)), "mask": np.ones((2, 3), "float32")}, SCORES)


@pytest.mark.parametrize(
    "y_true", [{"mask": np.ones((2, 3), bool)}, {"labels": np.zeros((2, 3)), "weights": 1}]
)
def test_dict_keys_are_checked(y_true):
    with pytest.raises(ValueError, match=r'must have the key "labels".*Received: y_true with keys'):
        _lists.list_inputs(y_true, SCORES)


@pytest.mark.parametrize("shape", [(3,), (2, 3, 1)])
def test_predictions_must_be_batches_of_lists(shape):
    with pytest.raises(ValueError, match=r"\[batch, list_size\].*Received: y_pred.shape="):
        _lists.list_inputs(np.zeros(shape), np.zeros(shape, "float32"))


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match=r"same shape.*y_true.shape=\(2, 4\), y_pred.shape"):
        _lists.list_inputs(np.zeros((2, 4)), SCORES)
    with pytest.raises(ValueError, match=r"`y_true\['mask'\]` must have the shape of `y_pred`"):
        _lists.list_inputs({"labels": np.zeros((2, 3)), "mask": np.ones((2, 4), bool)}, SCORES)


def test_empty_lists_are_refused():
    with pytest.raises(ValueError, match=r"at least one item.*y_pred.shape=\(2, 0\)"):
        _lists.list_inputs(np.zeros((2, 0)), np.zeros((2, 0), "float32"))
