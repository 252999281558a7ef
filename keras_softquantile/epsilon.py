"""The entropic `epsilon` of a layer or model, held in a weight, and how callbacks find it.

`EpsilonWeight` is shared by the soft layers and `QuantileObjectiveModel`: it validates
`epsilon`, creates the weight in its owner (`build`), reads it (`value`) and assigns it
(`assign`). The weight is what the compiled train function reads, so changing epsilon (an
annealing callback) does not retrace it. `epsilon_weights(model)` lists every such weight in a
model through the public `model.variables`, for callbacks such as `EpsilonAnnealing`.
"""

from __future__ import annotations

import math
import weakref

import keras
import numpy as np
from keras import ops

from keras_softquantile.ops import _validation

__all__ = ["EpsilonWeight", "epsilon_weights"]

# id(variable) -> the EpsilonWeight that created it. Weak values: a collected layer drops out.
# A variable id can be reused after the variable is collected, so lookups check identity.
_WEIGHTS: weakref.WeakValueDictionary[int, EpsilonWeight] = weakref.WeakValueDictionary()


def check_epsilon(epsilon, dtype=None) -> float:
    """Validates a Python `epsilon` and returns it as a float.

    It must be a finite real number > 0 and, when a compute `dtype` is given, at least
    `_validation.epsilon_minimum(dtype)` (8 machine epsilons of the dtype the transport is
    solved in: about 9.5e-7 for float32 and half precision, 1.8e-15 for float64), with the ops'
    messages, so that a layer fails at construction (or `set_epsilon`), not at call.

    Args:
        epsilon: the value to check.
        dtype: a compute dtype (string or dtype object), or None to skip the minimum.

    Returns:
        `epsilon` as a Python float.
    """
    value = _validation.check_positive(epsilon, "epsilon")
    if dtype is not None:
        dtype = _validation.compute_dtype(dtype)
        if value < _validation.epsilon_minimum(dtype):
            raise ValueError(
                f"{_validation.epsilon_too_small_message(dtype)} Received: epsilon={epsilon!r}"
            )
    return value


class EpsilonWeight:
    """The entropic epsilon of a layer or model, in a weight: changing it does not retrace.

    Non-trainable (the default), the weight is named "epsilon" and holds epsilon itself;
    trainable, it is named "log_epsilon" and holds `log(epsilon)`, so that epsilon stays
    positive while an optimizer learns it. The weight is float32 (float64 when its owner's
    variables are float64) and never autocast: the transport reads it at full precision under
    any dtype policy.

    Args:
        value: the initial epsilon, a finite float > 0.
        trainable: hold a trainable `log(epsilon)`.
        dtype_for_minimum: the owner's compute dtype: `value` (and every assigned value) must
            then be at least the ops' minimum for it; None checks only positivity.
    """

    def __init__(
        self, value: float, *, trainable: bool = False, dtype_for_minimum: str | None = None
    ):
        if not isinstance(trainable, bool | np.bool_):
            raise TypeError(f"`trainable` must be a bool. Received: trainable={trainable!r}")
        self.dtype_for_minimum = (
            None if dtype_for_minimum is None else _validation.compute_dtype(dtype_for_minimum)
        )
        self.initial = check_epsilon(value, self.dtype_for_minimum)
        self.trainable = bool(trainable)
        self._variable = None
        self._owner = None

    def __repr__(self) -> str:
        owner = self.owner
        where = "unbuilt" if owner is None else f"of {owner.name!r}"
        return f"<EpsilonWeight {where}, trainable={self.trainable}, initial={self.initial}>"

    @property
    def variable(self):
        """The Keras variable (None before `build`)."""
        return self._variable

    @property
    def built(self) -> bool:
        """Whether `build` has created the weight."""
        return self._variable is not None

    @property
    def owner(self):
        """The layer or model whose weight this is (None before `build`)."""
        return None if self._owner is None else self._owner()

    def build(self, owner: keras.layers.Layer) -> None:
        """Creates the weight in `owner` (`owner.add_weight`), once.

        Args:
            owner: the layer or model the weight belongs to (it is saved with it).
        """
        if self._variable is not None:
            if self.owner is not owner:
                raise RuntimeError(
                    "This EpsilonWeight is already built in another layer. "
                    f"Received: owner={getattr(owner, 'name', owner)!r}"
                )
            return
        dtype = "float64" if owner.variable_dtype == "float64" else "float32"
        initial = math.log(self.initial) if self.trainable else self.initial
        variable = owner.add_weight(
            name="log_epsilon" if self.trainable else "epsilon",
            shape=(),
            dtype=dtype,
            initializer=keras.initializers.Constant(initial),
            trainable=self.trainable,
            autocast=False,
        )
        self._variable = variable
        self._owner = weakref.ref(owner)
        _WEIGHTS[id(variable)] = self

    def _require_built(self) -> None:
        if self._variable is None:
            raise RuntimeError("The epsilon weight is read or assigned before it is built.")

    def _read(self):
        """The variable's current value (the traced one inside a Keras stateless scope)."""
        self._require_built()
        try:
            return self._variable.value
        except TypeError:
            # JAX: inside `fit`, the variables are purged and the values live in the
            # trainer's state until it syncs them back. Reading (or assigning, which the next
            # sync would overwrite) now would be wrong, so say what to do instead.
            if getattr(self._variable, "_value", 0) is None:
                raise RuntimeError(
                    f"The epsilon weight of {self.owner.name!r} is held in `fit`'s own state "
                    "during an epoch (the JAX backend). In a callback, reach the layer "
                    "through `self.model` (Keras then syncs the model's variables first), or "
                    "call `model.jax_state_sync()` before reading or assigning epsilon."
                ) from None
            raise

    def value(self):
        """The current epsilon, a scalar tensor of the active backend (`exp` if trainable)."""
        value = self._read()
        if self.trainable:
            return ops.exp(value)
        # A read, not the variable itself: a tensor (not a `tf.Variable`, a distributed
        # `MirroredVariable` included), which a later `assign` does not change (PyTorch
        # assigns in place), and a tracer inside `jax.jit` even outside Keras's stateless
        # scope (the variable's concrete array would pass for an eager value there).
        return ops.copy(value)

    def assign(self, value: float) -> None:
        """Assigns a new epsilon, validated like the constructor's.

        Outside a traced function (e.g. from a callback): the compiled train function reads
        the weight, so it is not retraced.
        """
        self._read()  # built, and not held apart by JAX's `fit`
        value = check_epsilon(value, self.dtype_for_minimum)
        self._variable.assign(math.log(value) if self.trainable else value)


def epsilon_weights(model: keras.layers.Layer) -> list[EpsilonWeight]:
    """Every built `EpsilonWeight` inside `model` (itself included), in `model.variables` order.

    Args:
        model: a Keras layer or model.

    Returns:
        The list of epsilon weights (empty when there are none).
    """
    found = []
    for variable in model.variables:
        weight = _WEIGHTS.get(id(variable))
        if weight is not None and weight.variable is variable and weight not in found:
            found.append(weight)
    return found
