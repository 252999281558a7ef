"""The built-in objectives and the objective registry."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_softquantile import objectives


class TestSpread:
    def test_selection_form_is_the_weighted_mean_difference(self):
        values = tf.constant([[1.0, 2.0, 3.0, 4.0]])
        low = objectives.Selection(values, tf.constant([[1.0, 0.5, 0.0, 0.0]]))
        high = objectives.Selection(values, tf.constant([[0.0, 0.0, 0.5, 1.0]]))
        np.testing.assert_allclose(objectives.spread(low, high), [(2.0 / 1.5) - (5.5 / 1.5)])

    def test_mean_and_sorted_forms(self):
        np.testing.assert_allclose(objectives.spread(tf.constant([1.0]), tf.constant([3.0])), [-2])
        low = tf.constant([[1.0, 2.0], [0.0, 0.0]])
        high = tf.constant([[5.0, 7.0], [1.0, 3.0]])
        np.testing.assert_allclose(objectives.spread(low, high), [-4.5, -2.0])

    def test_empty_selection_has_zero_mean_not_nan(self):
        empty = objectives.Selection(tf.ones([2, 3]), tf.zeros([2, 3]))
        np.testing.assert_array_equal(empty.mean(), [0.0, 0.0])


class TestRankWeightedSpread:
    def test_extreme_scores_weigh_most(self):
        low = tf.constant([[10.0, 0.0, 0.0]])  # lowest score first
        high = tf.constant([[0.0, 0.0, 10.0]])  # highest score last
        # weights 3/6, 2/6, 1/6 on the lower; 1/6, 2/6, 3/6 on the upper selection
        np.testing.assert_allclose(objectives.rank_weighted_spread(low, high), [5.0 - 5.0])
        np.testing.assert_allclose(
            objectives.rank_weighted_spread(low, tf.zeros([1, 3])), [10.0 * 3 / 6]
        )
        np.testing.assert_allclose(
            objectives.rank_weighted_spread(tf.zeros([1, 3]), tf.constant([[10.0, 0, 0]])),
            [-10.0 / 6],
        )

    def test_needs_sorted_output(self):
        selection = objectives.Selection(tf.ones([1, 4]), tf.ones([1, 4]))
        with pytest.raises(ValueError, match="output='sorted'"):
            objectives.rank_weighted_spread(selection, selection)
        with pytest.raises(ValueError, match=r"low\.shape"):
            objectives.rank_weighted_spread(tf.ones([2]), tf.ones([2]))
        assert objectives.rank_weighted_spread.required_output == "sorted"


class TestRegistry:
    def test_names_and_callables(self):
        assert objectives.get("spread") is objectives.spread

        def custom(low, high):
            return low - high

        assert objectives.get(custom) is custom

    @pytest.mark.parametrize(
        ("identifier", "error", "match"),
        [
            ("sharpe", ValueError, "Received: objective='sharpe'"),
            (3, TypeError, "Received: objective=3"),
            (None, TypeError, "Received: objective=None"),
        ],
    )
    def test_bad_identifiers(self, identifier, error, match):
        with pytest.raises(error, match=match):
            objectives.get(identifier)

    def test_registered_function_round_trips(self):
        @keras.saving.register_keras_serializable(package="tests")
        def worst_low(low, high):
            return tf.reduce_max(low, -1) - tf.reduce_mean(high, -1)

        config = objectives.serialize(worst_low)
        assert isinstance(config, dict)
        assert objectives.get(config) is worst_low
        assert objectives.serialize(objectives.spread) == "spread"
