"""EpsilonAnnealing and SelectionMonitor, with TensorBoard event files read back."""

import glob
import itertools
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
        if keras.backend.backend() == "torch":
            pytest.skip("PyTorch runs the train step eagerly: there is no trace to keep")
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

    @pytest.mark.slow
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

    @pytest.mark.slow
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
    @pytest.mark.slow
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
        # On Keras's step axis (step e = epoch e): before training (-1), after the second
        # epoch (every_n_epochs) and after the last.
        assert [e.step for e in selection.Tensors("theta")] == [-1, 1, 2]
        assert [e.step for e in train.Tensors("epoch_loss")] == [0, 1, 2]
        theta = tf.make_ndarray(selection.Tensors("theta")[-1].tensor_proto)
        assert theta.shape[-1] == 3  # histogram buckets: (left, right, count)
        assert theta[:, 2].sum() == 3  # the three entries of theta
        image = selection.Tensors("selection/membership_vs_rank")[-1]
        encoded = tf.make_ndarray(image.tensor_proto)
        assert encoded[:2].tolist() == [b"480", b"340"]  # width, height
        assert len(encoded) == 2 + 2  # max_images
        pixels = tf.io.decode_png(encoded[2]).numpy().astype(int)
        assert pixels.shape == (340, 480, 3)
        red = (pixels[..., 0] > 170) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
        blue = (pixels[..., 2] > 170) & (pixels[..., 0] < 80) & (pixels[..., 1] < 110)
        top, left, right = slice(0, 150), slice(0, 150), slice(330, 480)
        # The lower-bucket curve is high on the left, the upper one on the right (the legend,
        # which also shows both colours, sits below the plot).
        assert red[top, left].sum() > 50 and blue[top, right].sum() > 50
        assert red[top, right].sum() < 10 and blue[top, left].sum() < 10
        dark = pixels.sum(-1) < 150  # text: title, axis labels, ticks
        assert dark.sum() > 500
        described = {
            tag: selection.SummaryMetadata(tag).summary_description
            for tag in ("selection/membership_vs_rank", "selection/mean_abs_difference", "theta")
        }
        assert all(len(text) > 40 for text in described.values()), described
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


class TestSnapshotBeforeTraining:
    """The snapshot before training shows the starting epsilon, whatever the callback order."""

    @pytest.mark.parametrize(
        "monitor_first", [True, False], ids=["monitor_first", "annealing_first"]
    )
    @pytest.mark.parametrize("mode", ["epochs", "steps"])
    def test_at_the_starting_epsilon(self, tmp_path, monitor_first, mode):
        A, B = _problem()
        log_dir = os.fspath(tmp_path)
        model = ksq.QuantileObjectiveModel("spread", epsilon=0.001)  # the end, not the start
        model.compile(optimizer=keras.optimizers.Adam(0.05))
        span = {"epochs": 3} if mode == "epochs" else {"steps": 6}
        annealing = EpsilonAnnealing(0.2, 0.001, **span)
        monitor = SelectionMonitor(log_dir, (A[:2], B[:2]), max_images=0)
        callbacks = [monitor, annealing] if monitor_first else [annealing, monitor]
        model.fit(x=(A, B), batch_size=4, epochs=3, verbose=0, callbacks=callbacks)
        selection = _events(os.path.join(log_dir, "selection"))

        def series(tag):
            return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in selection.Tensors(tag)}

        epsilons = series("selection/epsilon")
        assert sorted(epsilons) == [-1, 0, 1, 2]
        np.testing.assert_allclose(epsilons[-1], 0.2, rtol=1e-6)
        differences = series("selection/mean_abs_difference")
        # The same epsilon before training and in the first epoch; sharper at every later
        # snapshot as epsilon falls: the curve does not rise at the start.
        if mode == "epochs":
            np.testing.assert_allclose(differences[-1], differences[0], rtol=0.25)
            steps = [0, 1, 2]
        else:  # epsilon falls before every batch
            steps = [-1, 0, 1, 2]
        assert all(differences[a] > differences[b] for a, b in itertools.pairwise(steps))
        assert differences[-1] > 10 * differences[2], differences

    @pytest.mark.slow
    def test_a_resumed_run_continues_the_step_axis(self, tmp_path):
        A, B = _problem()
        log_dir = os.fspath(tmp_path)
        model = ksq.QuantileObjectiveModel("spread", epsilon=0.05)
        model.compile(optimizer=keras.optimizers.Adam(0.05))
        model.fit(x=(A, B), batch_size=4, epochs=2, verbose=0)
        monitor = SelectionMonitor(log_dir, (A[:2], B[:2]), max_images=1)
        model.fit(x=(A, B), batch_size=4, epochs=4, initial_epoch=2, verbose=0, callbacks=[monitor])
        selection = _events(os.path.join(log_dir, "selection"))
        assert [e.step for e in selection.Tensors("theta")] == [1, 2, 3]
