"""EpsilonAnnealing and SelectionMonitor, with TensorBoard event files read back."""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

import keras_softquantile as ksq
from keras_softquantile.callbacks import EpsilonAnnealing, SelectionMonitor


def _problem(instances=8, n=40, features=3, seed=0):
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((instances, n, features)).astype("float32")
    A = (B @ rng.standard_normal(features) + rng.standard_normal((instances, n))).astype("float32")
    return A, B


def _events(directory):
    accumulator = event_accumulator.EventAccumulator(
        directory, size_guidance={event_accumulator.TENSORS: 0}
    )
    accumulator.Reload()
    return accumulator


class TestEpsilonAnnealing:
    @pytest.mark.parametrize(
        ("schedule", "expected"),
        [
            ("geometric", [0.1, 0.01, 0.001]),
            ("linear", [0.1, 0.0505, 0.001]),
            ("cosine", [0.1, 0.0505, 0.001]),
        ],
    )
    def test_schedules(self, schedule, expected):
        annealing = EpsilonAnnealing(0.1, 0.001, epochs=3, schedule=schedule)
        np.testing.assert_allclose([annealing.value_at(e) for e in range(3)], expected)
        assert annealing.value_at(10) == pytest.approx(0.001)

    def test_changes_epsilon_each_epoch_without_retracing(self):
        A, B = _problem()
        traces = []

        def counting_spread(low, high):
            traces.append(1)  # Python side effect: runs only while tracing
            return low.mean() - high.mean()

        model = ksq.QuantileObjectiveModel(counting_spread, epsilon=0.5)
        model.compile(optimizer=keras.optimizers.Adam(0.01))
        annealing = EpsilonAnnealing(0.1, 0.001, epochs=3)
        per_epoch = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: counts.append(len(traces))
        )
        counts = []
        history = model.fit(
            x=(A, B), batch_size=4, epochs=4, verbose=0, callbacks=[annealing, per_epoch]
        )
        np.testing.assert_allclose(history.history["epsilon"], [0.1, 0.01, 0.001, 0.001], rtol=1e-6)
        # The first epoch traces (tf.function traces twice while the optimizer creates its
        # variables); later epochs, with a new epsilon each, reuse that trace.
        assert counts[0] > 0 and counts == [counts[0]] * 4, counts

    def test_steps_schedule_follows_optimizer_iterations(self):
        A, B = _problem()
        model = ksq.QuantileObjectiveModel("spread", epsilon=0.5)
        model.compile(optimizer=keras.optimizers.Adam(0.01))
        annealing = EpsilonAnnealing(0.1, 0.01, steps=4, schedule="linear")
        history = model.fit(x=(A, B), batch_size=2, epochs=2, verbose=0, callbacks=[annealing])
        # Epoch 1 runs iterations 0..3 (0.1, 0.0775, 0.055, 0.0325), epoch 2 stays at 0.01.
        np.testing.assert_allclose(
            history.history["epsilon"], [np.mean([0.1, 0.0775, 0.055, 0.0325]), 0.01], rtol=1e-5
        )

    def test_anneals_soft_layers_inside_any_model(self):
        inputs = keras.Input((10,))
        topk = ksq.SoftTopK(3, epsilon=0.5, name="topk")
        model = keras.Model(inputs, topk(keras.layers.Dense(10)(inputs)))
        model.compile(optimizer="adam", loss="mse")
        x = np.random.default_rng(0).standard_normal((8, 10)).astype("float32")
        history = model.fit(
            x, np.zeros((8, 10)), epochs=2, verbose=0, callbacks=[EpsilonAnnealing(0.2, 0.02)]
        )
        np.testing.assert_allclose(float(topk.get_epsilon()), 0.02, rtol=1e-6)
        np.testing.assert_allclose(history.history["epsilon"], [0.2, 0.02], rtol=1e-6)

    def test_refuses_models_without_epsilon_and_learned_epsilons(self):
        plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        plain.compile(optimizer="adam", loss="mse")
        with pytest.raises(ValueError, match="found no epsilon"):
            plain.fit(
                np.zeros((2, 3)),
                np.zeros((2, 1)),
                verbose=0,
                callbacks=[EpsilonAnnealing(0.1, 0.01)],
            )
        inputs = keras.Input((5,))
        learned = keras.Model(inputs, ksq.SoftTopK(2, trainable_epsilon=True)(inputs))
        learned.compile(optimizer="adam", loss="mse")
        with pytest.raises(ValueError, match="trainable_epsilon=True"):
            learned.fit(
                np.zeros((2, 5)),
                np.zeros((2, 5)),
                verbose=0,
                callbacks=[EpsilonAnnealing(0.1, 0.01)],
            )

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"start": 0.0, "end": 0.1}, ValueError, "Received: start=0.0"),
            ({"start": 0.1, "end": -1.0}, ValueError, r"Received: end=-1\.0"),
            ({"start": "a", "end": 0.1}, TypeError, "Received: start='a'"),
            ({"start": 0.1, "end": 0.01, "epochs": 0}, ValueError, "Received: epochs=0"),
            ({"start": 0.1, "end": 0.01, "epochs": 3, "steps": 3}, ValueError, "not both"),
            ({"start": 0.1, "end": 0.01, "schedule": "step"}, ValueError, "schedule='step'"),
        ],
    )
    def test_bad_arguments(self, kwargs, error, match):
        with pytest.raises(error, match=match):
            EpsilonAnnealing(**kwargs)


class TestTensorBoard:
    def test_metrics_histograms_and_images_are_written(self, tmp_path):
        A, B = _problem()
        log_dir = os.fspath(tmp_path)
        model = ksq.QuantileObjectiveModel("spread", epsilon=0.05)
        model.compile(optimizer=keras.optimizers.Adam(0.05))
        monitor = SelectionMonitor(log_dir, (A[:2], B[:2]), every_n_epochs=2, max_images=2)
        model.fit(
            x=(A, B),
            batch_size=4,
            epochs=3,
            verbose=0,
            callbacks=[keras.callbacks.TensorBoard(log_dir), monitor],
        )
        train = _events(os.path.join(log_dir, "train"))
        for tag in (
            "epoch_loss",
            "epoch_hard_objective",
            "epoch_selection_agreement",
            "epoch_epsilon",
        ):
            assert tag in train.Tags()["tensors"], train.Tags()
        losses = [float(tf.make_ndarray(e.tensor_proto)) for e in train.Tensors("epoch_loss")]
        history = model.history.history["loss"]
        np.testing.assert_allclose(losses, history, rtol=1e-6)  # the logged values, per epoch

        selection = _events(os.path.join(log_dir, "selection"))
        tags = selection.Tags()["tensors"]
        for tag in (
            "theta",
            "selection/lower_membership",
            "selection/upper_membership",
            "selection/mean_abs_difference",
            "selection/membership_vs_rank",
        ):
            assert tag in tags, tags
        # Written before training, after epoch 2 (every_n_epochs) and after the last, 3.
        assert [e.step for e in selection.Tensors("theta")] == [0, 2, 3]
        theta = tf.make_ndarray(selection.Tensors("theta")[-1].tensor_proto)
        assert theta.shape[-1] == 3  # histogram buckets: (left, right, count)
        assert theta[:, 2].sum() == 3  # the three entries of theta
        image = selection.Tensors("selection/membership_vs_rank")[-1]
        encoded = tf.make_ndarray(image.tensor_proto)
        assert encoded[:2].tolist() == [b"40", b"64"]  # width = n, height
        pixels = tf.io.decode_png(encoded[2]).numpy()
        assert pixels.shape == (64, 40, 3)
        red = (pixels[..., 0] > 150) & (pixels[..., 2] < 100)
        blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 100)
        # The lower-bucket membership curve is high on the left, the upper one on the right.
        assert red[:10, :5].any() and blue[:10, -5:].any()
        assert glob.glob(os.path.join(log_dir, "selection", "events.out.tfevents.*"))

    def test_monitor_needs_the_objective_model_and_good_data(self, tmp_path):
        with pytest.raises(ValueError, match=r"A\.shape=\(4,\)"):
            SelectionMonitor(tmp_path, (np.zeros(4), np.zeros((4, 2))))
        with pytest.raises(ValueError, match="pair"):
            SelectionMonitor(tmp_path, np.zeros((4, 2)))
        with pytest.raises(ValueError, match="Received: every_n_epochs=0"):
            SelectionMonitor(tmp_path, (np.zeros((1, 4)), np.zeros((1, 4, 2))), every_n_epochs=0)
        plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        plain.compile(optimizer="adam", loss="mse")
        monitor = SelectionMonitor(tmp_path, (np.zeros((1, 4)), np.zeros((1, 4, 2))))
        with pytest.raises(ValueError, match="QuantileObjectiveModel"):
            plain.fit(np.zeros((2, 3)), np.zeros((2, 1)), verbose=0, callbacks=[monitor])
