"""Objectives `f(A_low, A_high)` of a quantile selection, minimised by `QuantileObjectiveModel`.

An objective receives the lower and the upper selection of one batch of instances, in the form
the model's `output` mode gives them, and returns one value per instance (`[batch]`) or a
scalar; the model minimises its mean.

* `output="weights"`: each argument is a `Selection(values, weights)`: `values` `[batch, n]`
  (padding zeroed) and the soft membership `weights` `[batch, n]`, which sum to `q * n` per
  instance. `Selection.mean()` gives the membership-weighted mean.
* `output="mean"`: each argument is the weighted mean, `[batch]`.
* `output="sorted"`: each argument holds the selected values ordered by ascending score,
  `[batch, k]` with `k = floor(q * n)`: the soft counterpart of
  `keras.ops.take_along_axis(A, keras.ops.argsort(C), axis=-1)[:, :k]` and `[:, -k:]`.

The model also evaluates the objective on the hard selection (without gradient), passing the
same structure with 0/1 weights, so the `hard_objective` metric is the same `f` at epsilon 0.

Built-in objectives, by name: `"spread"` (any output) and `"rank_weighted_spread"` (needs
`output="sorted"`). Your own objective is any callable with this signature; register it with
`keras.saving.register_keras_serializable` so a saved model reloads it with `safe_mode` on. An
objective that needs one output mode can say so in a `required_output` attribute
(`f.required_output = "sorted"`), which the model checks at construction.

The built-in objectives are written on `keras.ops`, so they run under every Keras backend
(TensorFlow, JAX, PyTorch); write your own on `keras.ops` too for the same reach (an objective
written with `tf` ops runs only under the TensorFlow backend).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import NamedTuple

import keras
from keras import ops

__all__ = ["Selection", "get", "rank_weighted_spread", "serialize", "spread"]


class Selection(NamedTuple):
    """Values with selection weights, what an objective receives with `output="weights"`.

    Attributes:
        values: `[batch, n]` values `A` (zero at padded positions).
        weights: `[batch, n]` membership of each entry in the selection, in [0, 1].
    """

    values: object
    weights: object

    def total(self):
        """Selected mass per instance, `[batch]` (`q * n` for the soft selection)."""
        return ops.sum(self.weights, axis=-1)

    def mean(self):
        """Membership-weighted mean of the values per instance, `[batch]`."""
        total = self.total()
        safe = ops.where(total > 0, total, ops.ones_like(total))
        return ops.sum(self.weights * self.values, axis=-1) / safe


def _mean_of(selection):
    if isinstance(selection, Selection):
        return selection.mean()
    selection = ops.convert_to_tensor(selection)
    return selection if len(selection.shape) == 1 else ops.mean(selection, axis=-1)


@keras.saving.register_keras_serializable(package="keras_softquantile")
def spread(low, high):
    """The quartile spread `mean(A_low) - mean(A_high)`, per instance.

    Minimising it ranks high the entries with high values: it is minus the return of a
    long-short portfolio that buys the upper quantile of the scores and sells the lower one.
    Works with every `output` mode.

    Args:
        low: the lower selection (`Selection`, `[batch]` means or `[batch, k]` values).
        high: the upper selection, in the same form.

    Returns:
        `[batch]` spreads.
    """
    return _mean_of(low) - _mean_of(high)


def _rank_weights(k: int, dtype: str, increasing: bool):
    steps = ops.arange(1, k + 1, dtype=dtype)
    weights = steps if increasing else ops.flip(steps, axis=0)
    return weights / ops.sum(weights)


@keras.saving.register_keras_serializable(package="keras_softquantile")
def rank_weighted_spread(low, high):
    """The spread with linearly more weight on the more extreme scores, per instance.

    With `A_low` and `A_high` ordered by ascending score (as `output="sorted"` gives them),
    position `j` of the lower selection gets weight proportional to `k - j` (the lowest score
    weighs most) and position `j` of the upper one weight proportional to `j + 1` (the highest
    score weighs most); each set of weights sums to one. It depends on the order of the
    selected values, so it needs `output="sorted"`:
    `sum_j w_low[j] A_low[j] - sum_j w_high[j] A_high[j]`.

    Args:
        low: `[batch, k]` lower selection, ascending score order.
        high: `[batch, k]` upper selection, ascending score order.

    Returns:
        `[batch]` weighted spreads.
    """
    if isinstance(low, Selection) or isinstance(high, Selection):
        raise ValueError(
            "`rank_weighted_spread` depends on the order of the selected values: use it with "
            "output='sorted'. Received: a Selection (output='weights')"
        )
    low = ops.convert_to_tensor(low)
    high = ops.convert_to_tensor(high)
    if len(low.shape) != 2 or len(high.shape) != 2:
        raise ValueError(
            "`rank_weighted_spread` needs the sorted selections `[batch, k]` of "
            f"output='sorted'. Received: low.shape={tuple(low.shape)}, "
            f"high.shape={tuple(high.shape)}"
        )
    k = low.shape[-1]
    if k is None:
        raise ValueError(
            f"`rank_weighted_spread` needs a static k. Received: low.shape={tuple(low.shape)}"
        )
    if k == 0:
        return ops.sum(low, axis=-1)  # [batch] zeros
    low_weights = _rank_weights(k, keras.backend.standardize_dtype(low.dtype), increasing=False)
    high_weights = _rank_weights(k, keras.backend.standardize_dtype(high.dtype), increasing=True)
    # Elementwise products and sums, not `ops.matmul`: Keras's PyTorch backend computes a
    # float64 matmul in float32.
    return ops.sum(low * low_weights, axis=-1) - ops.sum(high * high_weights, axis=-1)


# An objective that needs one `output` mode says so in this attribute; the model checks it.
rank_weighted_spread.required_output = "sorted"
_BUILTINS: dict[str, Callable] = {"spread": spread, "rank_weighted_spread": rank_weighted_spread}


def get(identifier: str | Callable | dict) -> Callable:
    """The objective function for a built-in name, a callable or a serialized config.

    Args:
        identifier: "spread", "rank_weighted_spread", a callable `f(low, high)`, or the config
            that `serialize` returned (for a function registered with
            `keras.saving.register_keras_serializable`).

    Returns:
        The callable.
    """
    if isinstance(identifier, str):
        if identifier in _BUILTINS:
            return _BUILTINS[identifier]
        raise ValueError(
            f"Unknown objective name; built-in objectives are {sorted(_BUILTINS)}, or pass a "
            f"callable f(low, high). Received: objective={identifier!r}"
        )
    if isinstance(identifier, dict):
        identifier = keras.saving.deserialize_keras_object(identifier)
    if not callable(identifier):
        raise TypeError(
            "`objective` must be a built-in name or a callable f(low, high) returning one "
            f"value per instance. Received: objective={identifier!r}"
        )
    return identifier


def serialize(objective: str | Callable) -> str | dict:
    """What `QuantileObjectiveModel.get_config` stores for an objective: a name or a config.

    Raises:
        ValueError: for a callable that is not registered with
            `keras.saving.register_keras_serializable` (a lambda, or a function or callable
            class without the decorator): a saved model holding it could not be loaded.
    """
    if isinstance(objective, str):
        return objective
    for name, function in _BUILTINS.items():
        if objective is function:
            return name
    target = objective if isinstance(objective, type | types.FunctionType) else type(objective)
    registered = keras.saving.get_registered_name(target)
    if keras.saving.get_registered_object(registered) is not target:
        # Keras would write a file that no `load_model` can read: refuse now, with the fix.
        shown = getattr(target, "__qualname__", repr(target))
        raise ValueError(
            f"Cannot save the objective {shown!r}: it is not registered, so the saved model "
            "could not be loaded. Define it as a named module-level function decorated with "
            '`@keras.saving.register_keras_serializable(package="my_package")`, and import '
            "its module before `keras.saving.load_model`. Received: "
            f"objective={objective!r}"
        )
    return keras.saving.serialize_keras_object(objective)
