"""Saving, resuming an interrupted fit, and MirroredStrategy for QuantileObjectiveModel."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from problems import planted_problem

import keras_softquantile as ksq


@keras.saving.register_keras_serializable(package="tests")
def low_tail_spread(low, high):
    """A registered custom objective (module level, so that it reloads by name)."""
    return tf.reduce_mean(low, -1) - tf.reduce_mean(high, -1) + 0.1 * tf.math.reduce_std(low, -1)


class TestKerasRoundTrip:
    @pytest.mark.parametrize(
        ("objective", "output", "scorer"),
        [("spread", "weights", None), (low_tail_spread, "sorted", "dense")],
    )
    @pytest.mark.slow
    def test_restores_theta_epsilon_and_objective(self, tmp_path, objective, output, scorer):
        A, B, _ = planted_problem(instances=8, n=20)
        if scorer == "dense":
            scorer = keras.Sequential([keras.layers.Dense(4), keras.layers.Dense(1)])
        model = ksq.QuantileObjectiveModel(
            objective, scorer=scorer, output=output, quantile=0.2, epsilon=3e-2
        )
        model.compile(optimizer=keras.optimizers.Adam(0.05))
        model.fit(x=(A, B), batch_size=4, epochs=1, verbose=0)
        model.set_epsilon(7e-3)
        path = os.path.join(tmp_path, "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path, safe_mode=True)
        assert isinstance(loaded, ksq.QuantileObjectiveModel)
        assert loaded.objective_function is model.objective_function
        assert (loaded.quantile, loaded.output_mode) == (0.2, output)
        np.testing.assert_allclose(float(loaded.get_epsilon()), 7e-3, rtol=1e-6)
        for saved, restored in zip(model.weights, loaded.weights, strict=True):
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(saved), keras.ops.convert_to_numpy(restored)
            )
        expected = model.evaluate(x=(A, B), batch_size=8, verbose=0, return_dict=True)
        actual = loaded.evaluate(x=(A, B), batch_size=8, verbose=0, return_dict=True)
        for name in expected:
            np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5)
        # The optimizer state came back too: one more step matches.
        model.fit(x=(A, B), batch_size=8, epochs=1, verbose=0, shuffle=False)
        loaded.fit(x=(A, B), batch_size=8, epochs=1, verbose=0, shuffle=False)
        for saved, restored in zip(model.trainable_weights, loaded.trainable_weights, strict=True):
            np.testing.assert_allclose(
                keras.ops.convert_to_numpy(saved),
                keras.ops.convert_to_numpy(restored),
                rtol=1e-5,
                atol=1e-6,
            )

    @pytest.mark.parametrize("kind", ["lambda", "function", "callable_object"])
    def test_an_unregistered_objective_fails_at_save_with_the_fix(self, tmp_path, kind):
        def spread(low, high):
            return low.mean() - high.mean()

        class Spread:
            def __call__(self, low, high):
                return spread(low, high)

        objective = {
            "lambda": lambda low, high: spread(low, high),
            "function": spread,
            "callable_object": Spread(),
        }[kind]
        A, B, _ = planted_problem(instances=4, n=20)
        model = ksq.QuantileObjectiveModel(objective, num_features=B.shape[-1])
        model.compile(optimizer="adam")
        model.fit(x=(A, B), epochs=1, verbose=0)  # training needs no registration
        path = os.path.join(tmp_path, "unregistered.keras")
        with open(path, "w") as previous:  # an earlier checkpoint that a failed save must keep
            previous.write("previous")
        with pytest.raises(ValueError, match=r"register_keras_serializable.*Received: objective="):
            model.save(path)
        with open(path) as kept:
            assert kept.read() == "previous"
        with pytest.raises(ValueError, match="register_keras_serializable"):
            keras.saving.serialize_keras_object(model)  # every other way of saving refuses too

    def test_a_registered_objective_saves(self, tmp_path):
        model = ksq.QuantileObjectiveModel(low_tail_spread, num_features=3, output="sorted")
        model.save(os.path.join(tmp_path, "registered.keras"))
        loaded = keras.models.load_model(os.path.join(tmp_path, "registered.keras"))
        assert loaded.objective_function is low_tail_spread


# BackupAndRestore with a resumed fit: tests/backends/test_backend_model.py (every backend).


DISTRIBUTED = textwrap.dedent(
    """
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )

    import keras
    import keras_softquantile as ksq

    rng = np.random.default_rng(0)
    B = rng.standard_normal((16, 40, 4)).astype("float32")
    A = (B @ rng.standard_normal(4) + rng.standard_normal((16, 40))).astype("float32")
    start = rng.standard_normal(4).astype("float32")

    def train(strategy):
        with strategy.scope():
            model = ksq.QuantileObjectiveModel("spread", num_features=4, epsilon=2e-2)
            model.build((None, 40, 4))
            model.theta.assign(start)
            model.compile(optimizer=keras.optimizers.Adam(0.05))
        history = model.fit(x=(A, B), batch_size=8, epochs=3, verbose=0, shuffle=False)
        return keras.ops.convert_to_numpy(model.theta), history.history

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert mirrored.num_replicas_in_sync == 2
    theta_two, logs_two = train(mirrored)
    theta_one, logs_one = train(tf.distribute.OneDeviceStrategy("/cpu:0"))
    assert not np.allclose(theta_one, start)
    np.testing.assert_allclose(theta_two, theta_one, rtol=1e-4, atol=1e-5)
    for name in ("loss", "hard_objective", "selection_agreement", "epsilon"):
        np.testing.assert_allclose(logs_two[name], logs_one[name], rtol=1e-4)
    print("OK", theta_two, logs_two["loss"])
    """
)


class TestMirroredStrategy:
    @pytest.mark.slow
    def test_two_replicas_give_the_single_device_theta(self):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
        result = subprocess.run(
            [sys.executable, "-c", DISTRIBUTED],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        assert "OK" in result.stdout
