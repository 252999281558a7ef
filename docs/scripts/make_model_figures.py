"""Figures of the objective-model guide, from a real training run's TensorBoard event files.

It trains `QuantileObjectiveModel` on the demo's generated problem with the standard
`keras.callbacks.TensorBoard` and `SelectionMonitor`, then reads the event files back with
TensorBoard's own reader and draws what TensorBoard shows:

  docs/assets/tensorboard_scalars.png      the four logged metrics per epoch
  docs/assets/membership_vs_rank.png       SelectionMonitor's image at the first and last write

Usage: python docs/scripts/make_model_figures.py   (about a minute on 2 CPU cores)
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import matplotlib
import numpy as np
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

import keras_softquantile as ksq

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ASSETS = os.path.join(os.path.dirname(__file__), "..", "assets")


def train(log_dir: str) -> None:
    rng = np.random.default_rng(0)
    B = rng.standard_normal((64, 200, 20)).astype("float32")
    A = (B @ rng.standard_normal(20) + rng.standard_normal((64, 200))).astype("float32")
    keras.utils.set_random_seed(0)
    model = ksq.QuantileObjectiveModel("spread", num_features=20, epsilon=1e-2)
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    model.fit(
        x=(A, B),
        batch_size=8,
        epochs=20,
        verbose=0,
        callbacks=[
            ksq.callbacks.EpsilonAnnealing(start=0.1, end=0.005),
            keras.callbacks.TensorBoard(log_dir),
            ksq.callbacks.SelectionMonitor(log_dir, (A[:2], B[:2]), every_n_epochs=20),
        ],
    )


def read(directory: str) -> event_accumulator.EventAccumulator:
    accumulator = event_accumulator.EventAccumulator(
        directory, size_guidance={event_accumulator.TENSORS: 0}
    )
    accumulator.Reload()
    return accumulator


def scalars_figure(log_dir: str) -> None:
    train_events = read(os.path.join(log_dir, "train"))
    names = ["epoch_loss", "epoch_hard_objective", "epoch_selection_agreement", "epoch_epsilon"]
    figure, axes = plt.subplots(1, 4, figsize=(13, 2.8))
    for axis, name in zip(axes, names, strict=True):
        events = train_events.Tensors(name)
        steps = [e.step + 1 for e in events]
        values = [float(tf.make_ndarray(e.tensor_proto)) for e in events]
        axis.plot(steps, values, marker=".", color="tab:blue")
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("epoch")
        if name == "epoch_epsilon":
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(os.path.join(ASSETS, "tensorboard_scalars.png"), dpi=90)


def image_figure(log_dir: str) -> None:
    selection = read(os.path.join(log_dir, "selection"))
    events = selection.Tensors("selection/membership_vs_rank")
    figure, axes = plt.subplots(1, 2, figsize=(10.4, 3.5))
    for axis, event in zip(axes, (events[0], events[-1]), strict=True):
        encoded = tf.make_ndarray(event.tensor_proto)
        axis.imshow(tf.io.decode_png(encoded[2]).numpy(), interpolation="none")
        axis.set_title(f"TensorBoard step {event.step}", fontsize=10)
        axis.axis("off")  # the image has its own axes, title and legend
    figure.tight_layout()
    figure.savefig(os.path.join(ASSETS, "membership_vs_rank.png"), dpi=90)


def main() -> None:
    os.makedirs(ASSETS, exist_ok=True)
    with tempfile.TemporaryDirectory() as log_dir:
        train(log_dir)
        scalars_figure(log_dir)
        image_figure(log_dir)


if __name__ == "__main__":
    main()
