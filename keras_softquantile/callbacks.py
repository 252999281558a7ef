"""Callbacks for soft selection: epsilon annealing and a TensorBoard selection monitor."""

from __future__ import annotations

import math
import numbers
import os

import keras
import numpy as np
import tensorflow as tf

__all__ = ["EpsilonAnnealing", "SelectionMonitor"]

_SCHEDULES = ("geometric", "linear", "cosine")


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a positive float. Received: {name}={value!r}")
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"`{name}` must be a finite number > 0. Received: {name}={value!r}")
    return float(value)


def _count(value, name: str, minimum: int = 1) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int. Received: {name}={value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}. Received: {name}={value!r}")
    return int(value)


class EpsilonAnnealing(keras.callbacks.Callback):
    """Anneals epsilon from `start` to `end` during `fit`, without retracing.

    It assigns the epsilon weight of the model (`QuantileObjectiveModel.set_epsilon`) or, for
    any other model, of every soft selection layer in it (`SoftLayer.set_epsilon`); the train
    function reads the weight, so it is traced once. With `epochs`, epsilon changes at the
    start of each epoch: epoch `e` (counted from 0) gets fraction `f = min(e / (epochs - 1), 1)`
    of the way; with `steps`, before each batch, `f = min(iteration / steps, 1)` with the
    optimizer's iteration count (so a resumed `fit` continues the schedule). Neither: `epochs`
    is `fit`'s epoch count. Schedules, for `f` in [0, 1]:

    * "geometric": `start * (end / start) ** f` (equal ratios per epoch; the default);
    * "linear": `start + (end - start) * f`;
    * "cosine": `end + (start - end) * (1 + cos(pi * f)) / 2`.

    >>> annealing = keras_softquantile.callbacks.EpsilonAnnealing(1e-1, 1e-3, epochs=5)
    >>> [round(annealing.value_at(e), 6) for e in range(5)]
    [0.1, 0.031623, 0.01, 0.003162, 0.001]

    Args:
        start: epsilon at the start, > 0.
        end: epsilon at the end of the schedule, > 0.
        epochs: number of epochs the schedule spans (at least 1), or None.
        steps: number of optimizer steps the schedule spans instead, or None.
        schedule: "geometric", "linear" or "cosine".
        verbose: 1 prints the new epsilon at each epoch.
    """

    def __init__(
        self,
        start: float,
        end: float,
        epochs: int | None = None,
        steps: int | None = None,
        schedule: str = "geometric",
        verbose: int = 0,
    ):
        super().__init__()
        self.start = _positive(start, "start")
        self.end = _positive(end, "end")
        self.epochs = _count(epochs, "epochs")
        self.steps = _count(steps, "steps")
        if self.epochs is not None and self.steps is not None:
            raise ValueError(
                f"Give `epochs` or `steps`, not both. Received: epochs={epochs}, steps={steps}"
            )
        if schedule not in _SCHEDULES:
            raise ValueError(
                f"`schedule` must be one of {_SCHEDULES}. Received: schedule={schedule!r}"
            )
        self.schedule = schedule
        self.verbose = verbose
        self._span = self.epochs

    def value_at(self, position: int) -> float:
        """Epsilon at an epoch (or, with `steps`, an optimizer iteration) of the schedule."""
        if self.steps is not None:
            fraction = min(position / self.steps, 1.0)
        else:
            span = self._span or 1
            fraction = 1.0 if span == 1 else min(position / (span - 1), 1.0)
        if self.schedule == "geometric":
            return self.start * (self.end / self.start) ** fraction
        if self.schedule == "linear":
            return self.start + (self.end - self.start) * fraction
        return self.end + (self.start - self.end) * (1 + math.cos(math.pi * fraction)) / 2

    def _targets(self) -> list:
        model = self.model
        if hasattr(model, "set_epsilon"):
            return [model]
        targets = [
            layer
            for layer in model._flatten_layers(include_self=False, recursive=True)
            if hasattr(layer, "set_epsilon")
        ]
        if not targets:
            raise ValueError(
                "`EpsilonAnnealing` found no epsilon to anneal: the model is neither a "
                "`QuantileObjectiveModel` nor contains soft selection layers. "
                f"Received: model={type(model).__name__}"
            )
        trained = [layer.name for layer in targets if getattr(layer, "trainable_epsilon", False)]
        if trained:
            raise ValueError(
                "`EpsilonAnnealing` would overwrite a learned epsilon: these layers have "
                f"trainable_epsilon=True. Received: layers={trained}"
            )
        return targets

    def _assign(self, value: float) -> None:
        for target in self._targets():
            target.set_epsilon(value)

    def on_train_begin(self, logs=None) -> None:
        if self.epochs is None and self.steps is None:
            self._span = self.params.get("epochs") or 1
        self._targets()

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        if self.steps is not None:
            return
        value = self.value_at(epoch)
        self._assign(value)
        if self.verbose:
            print(f"\nEpoch {epoch + 1}: EpsilonAnnealing sets epsilon to {value:.4g}.")

    def on_train_batch_begin(self, batch: int, logs=None) -> None:
        if self.steps is None:
            return
        iteration = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self._assign(self.value_at(iteration))

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if logs is not None and "epsilon" not in logs:
            target = self._targets()[0]
            logs["epsilon"] = float(keras.ops.convert_to_numpy(target.get_epsilon()))


class SelectionMonitor(keras.callbacks.Callback):
    """Writes TensorBoard summaries of the scorer and of the selection on a fixed batch.

    Before training and every `every_n_epochs` epochs (and after the last) it evaluates
    `model.selection(A, B)` of a `QuantileObjectiveModel` on the monitored `data` and writes,
    under `log_dir/selection`, at step = the number of epochs completed:

    * histograms of the scorer's weights (`theta` for the default linear scorer, else
      `scorer/<weight path>`);
    * histograms `selection/lower_membership` and `selection/upper_membership` of the soft
      memberships of the valid entries;
    * the scalar `selection/mean_abs_difference`, the soft-vs-hard mask difference
      (sharpness), averaged over both buckets;
    * images `selection/membership_vs_rank`, one per instance (up to `max_images`): the
      entries ordered by score rank from left to right, the soft lower-bucket membership in
      red and the upper-bucket membership in blue, from 0 (bottom) to 1 (top), over the hard
      buckets shaded in grey. As epsilon shrinks the curves become steps at the quantiles.

    Use it beside `keras.callbacks.TensorBoard(log_dir)`, which logs the metrics.

    Args:
        log_dir: the TensorBoard log directory.
        data: a pair `(A, B)` of arrays, `A` `[batch, n]` and `B` `[batch, n, M]`: a small,
            fixed set of instances to monitor.
        every_n_epochs: write every this many epochs (and after the last one).
        max_images: the number of instances drawn as images.
        image_height: height in pixels of each image.
    """

    def __init__(
        self,
        log_dir: str,
        data,
        every_n_epochs: int = 1,
        max_images: int = 3,
        image_height: int = 64,
    ):
        super().__init__()
        if not isinstance(log_dir, str | os.PathLike):
            raise TypeError(f"`log_dir` must be a path. Received: log_dir={log_dir!r}")
        if not isinstance(data, tuple | list) or len(data) != 2:
            raise ValueError(
                f"`data` must be a pair (A, B) of arrays. Received: data of type {type(data)}"
            )
        values, features = (np.asarray(d) for d in data)
        if values.ndim != 2 or features.ndim != 3 or values.shape != features.shape[:2]:
            raise ValueError(
                "`data` must be (A, B) with A [batch, n] and B [batch, n, M]. Received: "
                f"A.shape={values.shape}, B.shape={features.shape}"
            )
        self.log_dir = os.fspath(log_dir)
        self.values = values
        self.features = features
        self.every_n_epochs = _count(every_n_epochs, "every_n_epochs")
        self.max_images = _count(max_images, "max_images", minimum=0)
        self.image_height = _count(image_height, "image_height", minimum=8)
        self._writer = None

    def on_train_begin(self, logs=None) -> None:
        if not hasattr(self.model, "selection"):
            raise ValueError(
                "`SelectionMonitor` needs a `QuantileObjectiveModel` (a model with a "
                f"`selection` method). Received: model={type(self.model).__name__}"
            )
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "selection"))
        self._last_epoch = (self.params or {}).get("epochs")
        self.write(self._initial_epoch())

    def _initial_epoch(self) -> int:
        """Epochs already completed before this `fit` (a continued or resumed run).

        Keras tells callbacks no initial epoch, so it is the optimizer's iteration count over
        the steps per epoch.
        """
        iterations = getattr(getattr(self.model, "optimizer", None), "iterations", None)
        steps = (self.params or {}).get("steps")
        if iterations is None or not steps:
            return 0
        return int(keras.ops.convert_to_numpy(iterations)) // steps

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        last = self._last_epoch is not None and epoch + 1 == self._last_epoch
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        self.write(epoch + 1)

    def on_train_end(self, logs=None) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def write(self, step: int) -> None:
        """Writes the summaries now, at TensorBoard step `step` (epochs completed)."""
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "selection"))
        selection = {
            key: keras.ops.convert_to_numpy(value)
            for key, value in self.model.selection(self.values, self.features).items()
        }
        valid = np.isfinite(selection["scores"])
        low, high = selection["lower_membership"], selection["upper_membership"]
        low_mask, high_mask = selection["lower_mask"], selection["upper_mask"]
        difference = 0.5 * (
            np.abs(low - low_mask)[valid].mean() + np.abs(high - high_mask)[valid].mean()
        )
        with self._writer.as_default(step=step):
            for path, weight in self._scorer_weights():
                tf.summary.histogram(path, weight)
            tf.summary.histogram("selection/lower_membership", low[valid])
            tf.summary.histogram("selection/upper_membership", high[valid])
            tf.summary.scalar("selection/mean_abs_difference", difference)
            if self.max_images:
                images = [
                    _membership_image(
                        selection["scores"][i],
                        low[i],
                        high[i],
                        low_mask[i],
                        high_mask[i],
                        self.image_height,
                    )
                    for i in range(min(self.max_images, len(low)))
                ]
                tf.summary.image(
                    "selection/membership_vs_rank", np.stack(images), max_outputs=len(images)
                )
        self._writer.flush()

    def _scorer_weights(self):
        scorer = self.model.scorer
        weights = scorer.trainable_weights
        if len(weights) == 1 and getattr(scorer, "theta", None) is weights[0]:
            return [("theta", keras.ops.convert_to_numpy(weights[0]))]
        return [(f"scorer/{w.path}", keras.ops.convert_to_numpy(w)) for w in weights]


def _membership_image(scores, low, high, low_mask, high_mask, height: int) -> np.ndarray:
    """An RGB image in [0, 1]: soft memberships (red lower, blue upper) against score rank."""
    valid = np.isfinite(scores)
    order = np.argsort(scores[valid], kind="stable")
    curves = [low[valid][order], high[valid][order]]
    hard = low_mask[valid][order] | high_mask[valid][order]
    width = len(order)
    image = np.ones((height, width, 3), np.float32)
    image[:, hard] = 0.85
    colours = ((0.85, 0.1, 0.1), (0.1, 0.2, 0.9))
    margin = 3  # keep the 2-pixel curves off the border at memberships 0 and 1
    columns = np.arange(width)
    for curve, colour in zip(curves, colours, strict=True):
        rows = margin + np.round((1 - curve) * (height - 1 - 2 * margin)).astype(int)
        for offset in (-1, 0):
            image[rows + offset, columns] = colour
    return image
