"""Callbacks for soft selection: epsilon annealing and a TensorBoard selection monitor."""

from __future__ import annotations

import math
import numbers
import os

import keras
import numpy as np

from keras_softquantile.epsilon import epsilon_weights
from keras_softquantile.ops._validation import check_positive

__all__ = ["EpsilonAnnealing", "SelectionMonitor"]

_SCHEDULES = ("geometric", "linear", "cosine")


def _completed_iterations(model) -> int:
    """The optimizer steps taken so far (0 before the first `fit`, or without an optimizer).

    Under JAX, `fit` holds the variables in its own state between steps; syncing them back
    first makes the count current and keeps an assignment made now (the next step then reads
    the variables again).
    """
    sync = getattr(model, "jax_state_sync", None)
    if callable(sync):
        sync()
    iterations = getattr(getattr(model, "optimizer", None), "iterations", None)
    return 0 if iterations is None else int(keras.ops.convert_to_numpy(iterations))


def _count(value, name: str, minimum: int = 1) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int. Received: {name}={value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}. Received: {name}={value!r}")
    return int(value)


def _owner_name(weight) -> str:
    owner = weight.owner
    return "<deleted>" if owner is None else owner.name


class _MethodTarget:
    """A model's `set_epsilon`/`get_epsilon` pair, seen as an epsilon weight."""

    trainable = False

    def __init__(self, model):
        self.model = model

    def assign(self, value: float) -> None:
        self.model.set_epsilon(value)

    def value(self):
        return self.model.get_epsilon()


class EpsilonAnnealing(keras.callbacks.Callback):
    """Anneals epsilon from `start` to `end` during `fit`, without retracing.

    It assigns the epsilon weight of the model (`QuantileObjectiveModel`) or, for any other
    model, of every soft selection layer in it (the weights that
    `keras_softquantile.epsilon.epsilon_weights(model)` finds); the train function reads the
    weight, so it is traced once. With `epochs`, epsilon changes at the
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
        self.start = check_positive(start, "start")
        self.end = check_positive(end, "end")
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
        """The epsilon weights to anneal (`keras_softquantile.epsilon.EpsilonWeight`).

        The model's own epsilon if it has one (`QuantileObjectiveModel`); else, for a model
        with its own public `set_epsilon`/`get_epsilon` pair, that pair; else every epsilon
        weight inside the model (the soft selection layers'), found through `model.variables`.
        """
        model = self.model
        found = epsilon_weights(model)
        targets = [weight for weight in found if weight.owner is model]
        if not targets and hasattr(model, "set_epsilon") and hasattr(model, "get_epsilon"):
            return [_MethodTarget(model)]
        targets = targets or found
        if not targets:
            raise ValueError(
                "`EpsilonAnnealing` found no epsilon to anneal: the model is neither a "
                "`QuantileObjectiveModel` nor contains soft selection layers. "
                f"Received: model={type(model).__name__}"
            )
        trained = [_owner_name(weight) for weight in targets if weight.trainable]
        if trained:
            raise ValueError(
                "`EpsilonAnnealing` would overwrite a learned epsilon: these layers have "
                f"trainable_epsilon=True. Received: layers={trained}"
            )
        return targets

    def _assign(self, value: float) -> None:
        for target in self._targets():
            target.assign(value)

    def on_train_begin(self, logs=None) -> None:
        if self.epochs is None and self.steps is None:
            self._span = self.params.get("epochs") or 1
        self._targets()

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        # Also with `steps`: epsilon is then the schedule's before any other callback's first
        # batch hook (a snapshot before training sees the starting value).
        value = self.value_at(
            _completed_iterations(self.model) if self.steps is not None else epoch
        )
        self._assign(value)
        if self.verbose:
            print(f"\nEpoch {epoch + 1}: EpsilonAnnealing sets epsilon to {value:.4g}.")

    def on_train_batch_begin(self, batch: int, logs=None) -> None:
        if self.steps is None:
            return
        self._assign(self.value_at(_completed_iterations(self.model)))

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if logs is not None and "epsilon" not in logs:
            target = self._targets()[0]
            logs["epsilon"] = float(keras.ops.convert_to_numpy(target.value()))


class SelectionMonitor(keras.callbacks.Callback):
    """Writes TensorBoard summaries of the scorer and of the selection on a fixed batch.

    It evaluates `model.selection(A, B)` of a `QuantileObjectiveModel` on the monitored `data`
    before training and every `every_n_epochs` epochs (and after the last), and writes under
    `log_dir/selection`, on the step axis of `keras.callbacks.TensorBoard` (step `e` is epoch
    `e`, counted from 0; the snapshot after epoch `e` is at step `e`, the one before training
    at step `e0 - 1` for a `fit` that starts at epoch `e0`, so -1 for a new run):

    * histograms of the scorer's weights (`theta` for the default linear scorer, else
      `scorer/<weight path>`);
    * histograms `selection/lower_membership` and `selection/upper_membership` of the soft
      memberships of the valid entries;
    * scalars `selection/mean_abs_difference`, the soft-vs-hard mask difference (sharpness),
      averaged over both buckets, and `selection/epsilon`, the epsilon of the snapshot;
    * images `selection/membership_vs_rank`, one per instance (up to `max_images`): a plot of
      the soft lower-bucket (red) and upper-bucket (blue) memberships of the entries against
      their score rank, over the hard buckets shaded in the same colours, with axes, legend
      and the epoch and epsilon in the title. As epsilon shrinks the curves become steps at
      the quantiles.

    The snapshot before training is taken at the first batch, after every callback's start of
    epoch, so it shows the epsilon that `EpsilonAnnealing` starts from whatever the order of
    the callbacks. Each summary carries a description, shown in TensorBoard. Use it beside
    `keras.callbacks.TensorBoard(log_dir)`, which logs the metrics. The images are drawn with
    matplotlib.

    Args:
        log_dir: the TensorBoard log directory.
        data: a pair `(A, B)` of arrays, `A` `[batch, n]` and `B` `[batch, n, M]`: a small,
            fixed set of instances to monitor.
        every_n_epochs: write every this many epochs (and after the last one).
        max_images: the number of instances drawn as images (0: none).
        image_width: width in pixels of each image, at least 240.
        image_height: height in pixels of each image, at least 160.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        data,
        every_n_epochs: int = 1,
        max_images: int = 3,
        image_width: int = 480,
        image_height: int = 340,
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
        self.image_width = _count(image_width, "image_width", minimum=240)
        self.image_height = _count(image_height, "image_height", minimum=160)
        self._writer = None
        self._last_epoch = None
        self._started = False  # the first epoch of this `fit` has begun
        self._pending_step = None  # the step of the snapshot before training, until taken

    def on_train_begin(self, logs=None) -> None:
        if not hasattr(self.model, "selection"):
            raise ValueError(
                "`SelectionMonitor` needs a `QuantileObjectiveModel` (a model with a "
                f"`selection` method). Received: model={type(self.model).__name__}"
            )
        self._last_epoch = (self.params or {}).get("epochs")
        self._pending_step = None
        self._started = False

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        if not self._started:  # Keras gives the first epoch here, resumed runs included
            self._started = True
            self._pending_step = epoch - 1

    def on_train_batch_begin(self, batch: int, logs=None) -> None:
        self._write_pending()

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        self._write_pending()  # an epoch without batches
        last = self._last_epoch is not None and epoch + 1 == self._last_epoch
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        self.write(epoch)

    def on_train_end(self, logs=None) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write_pending(self) -> None:
        if self._pending_step is not None:
            step, self._pending_step = self._pending_step, None
            self.write(step, when="before training")

    def write(self, step: int, when: str | None = None) -> None:
        """Writes the summaries now, at TensorBoard step `step` (an epoch index).

        Args:
            step: the TensorBoard step.
            when: the moment named in the images' titles; default "after epoch {step + 1}".
        """
        # TensorFlow (a dependency whatever the Keras backend) writes the event files, from
        # numpy values only.
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "selection"))
        selection = {
            key: keras.ops.convert_to_numpy(value)
            for key, value in self.model.selection(self.values, self.features).items()
        }
        epsilon = float(keras.ops.convert_to_numpy(self.model.get_epsilon()))
        valid = np.isfinite(selection["scores"])
        low, high = selection["lower_membership"], selection["upper_membership"]
        low_mask, high_mask = selection["lower_mask"], selection["upper_mask"]
        difference = 0.5 * (
            np.abs(low - low_mask)[valid].mean() + np.abs(high - high_mask)[valid].mean()
        )
        with self._writer.as_default(step=step):
            for path, weight in self._scorer_weights():
                tf.summary.histogram(path, weight, description=_DESCRIPTIONS["weights"])
            tf.summary.histogram(
                "selection/lower_membership", low[valid], description=_DESCRIPTIONS["lower"]
            )
            tf.summary.histogram(
                "selection/upper_membership", high[valid], description=_DESCRIPTIONS["upper"]
            )
            tf.summary.scalar(
                "selection/mean_abs_difference", difference, description=_DESCRIPTIONS["sharp"]
            )
            tf.summary.scalar("selection/epsilon", epsilon, description=_DESCRIPTIONS["epsilon"])
            if self.max_images:
                when = when or f"after epoch {step + 1}"
                images = [
                    _membership_image(
                        selection["scores"][i],
                        low[i],
                        high[i],
                        low_mask[i],
                        high_mask[i],
                        title=f"instance {i}, {when}, epsilon {epsilon:.3g}",
                        size=(self.image_width, self.image_height),
                    )
                    for i in range(min(self.max_images, len(low)))
                ]
                tf.summary.image(
                    "selection/membership_vs_rank",
                    np.stack(images),
                    max_outputs=len(images),
                    description=_DESCRIPTIONS["image"],
                )
        self._writer.flush()

    def _scorer_weights(self):
        scorer = self.model.scorer
        weights = scorer.trainable_weights
        if len(weights) == 1 and getattr(scorer, "theta", None) is weights[0]:
            return [("theta", keras.ops.convert_to_numpy(weights[0]))]
        return [(f"scorer/{w.path}", keras.ops.convert_to_numpy(w)) for w in weights]


_DESCRIPTIONS = {
    "weights": "Histogram of the scorer's weights (`theta` for the default linear scorer).",
    "lower": (
        "Soft membership of the monitored entries in the **lower** bucket (the entries with "
        "the lowest scores). Sharp selection: mass near 0 and 1 only."
    ),
    "upper": (
        "Soft membership of the monitored entries in the **upper** bucket (the entries with "
        "the highest scores). Sharp selection: mass near 0 and 1 only."
    ),
    "sharp": (
        "Mean absolute difference between the soft and the hard bucket masks on the monitored "
        "instances (both buckets averaged): the sharpness of the soft selection, about "
        "1.4 x epsilon for Gaussian scores. It falls as epsilon is annealed."
    ),
    "epsilon": "The OT temperature epsilon when the snapshot was taken.",
    "image": (
        "Each monitored instance: its entries ordered by score rank (x axis, lowest score on "
        "the left), with their soft membership (y axis, 0 to 1) in the **lower** bucket (red "
        "curve) and the **upper** bucket (blue curve). The shaded bands are the hard buckets "
        "(red: lower quantile, blue: upper). As epsilon shrinks the curves become steps that "
        "fill the shaded bands."
    ),
}

_RED, _BLUE = (0.85, 0.1, 0.1), (0.1, 0.2, 0.9)


def _membership_image(
    scores, low, high, low_mask, high_mask, title: str, size: tuple[int, int]
) -> np.ndarray:
    """An RGB image (uint8 `[height, width, 3]`) of soft memberships against score rank."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    valid = np.isfinite(scores)
    order = np.argsort(scores[valid], kind="stable")
    ranks = np.arange(1, len(order) + 1)
    width, height = size
    dpi = 100
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for mask, colour, name in ((low_mask, _RED, "lower"), (high_mask, _BLUE, "upper")):
        axes.fill_between(
            ranks,
            0,
            1,
            where=mask[valid][order],
            step="mid",
            color=colour,
            alpha=0.12,
            linewidth=0,
            label=f"hard {name} bucket",
        )
    axes.plot(ranks, low[valid][order], color=_RED, linewidth=2.2, label="soft lower membership")
    axes.plot(ranks, high[valid][order], color=_BLUE, linewidth=2.2, label="soft upper membership")
    axes.set_xlim(0.5, len(order) + 0.5)
    axes.set_ylim(-0.04, 1.04)
    axes.set_xlabel("entries by score rank (lowest left)", fontsize=10)
    axes.set_ylabel("membership", fontsize=10)
    axes.set_title(title, fontsize=11)
    axes.tick_params(labelsize=9)
    figure.legend(loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
