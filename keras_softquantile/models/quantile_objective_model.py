"""`QuantileObjectiveModel`: learn a scorer so that its quantile selection minimises f."""

from __future__ import annotations

import functools
import math
import numbers
import random
import warnings
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_softquantile import objectives
from keras_softquantile import ops as soft_ops
from keras_softquantile.epsilon import EpsilonWeight, check_epsilon
from keras_softquantile.models import _selection, _steps
from keras_softquantile.models.linear_scorer import LinearScorer
from keras_softquantile.ops import _backend, _validation
from keras_softquantile.ops.perturbed import check_num_samples

__all__ = ["QuantileObjectiveModel"]

_ESTIMATORS = ("ot", "perturbed")


def _dtype(x) -> str:
    return keras.backend.standardize_dtype(x.dtype)


def _is_float(x) -> bool:
    return _dtype(x).startswith(("float", "bfloat"))


def _compatible(a: tuple, b: tuple) -> bool:
    """Whether two static shapes (None: unknown) can be equal."""
    if len(a) != len(b):
        return False
    return all(x is None or y is None or x == y for x, y in zip(a, b, strict=True))


def _features_of(inputs):
    """The features B of what the model is called on: B, an `(A, B)` pair or a dict."""
    if isinstance(inputs, dict) and set(inputs) == {"values", "features"}:
        return inputs["features"]
    if isinstance(inputs, tuple | list) and len(inputs) == 2:
        return inputs[1]
    return inputs


def _is_shape(shape) -> bool:
    return isinstance(shape, tuple | list) and all(
        d is None or isinstance(d, numbers.Integral) for d in shape
    )


class _DataRules(NamedTuple):
    """The element-wise data rules of a batch (tensors of the active backend)."""

    padding: object  # A is NaN [batch, n]
    bad_features: object  # B not finite where A is not NaN [batch, n, M]
    short: object  # too few valid entries [batch]
    length: object  # valid entries [batch], int32
    ok: object  # every rule holds, a boolean scalar


def _data_rules(values, features, limit: float, min_length: int, padding_allowed: bool):
    """The rules of `QuantileObjectiveModel._check_values` as tensors (A and B agree in shape):
    `A` finite or NaN and `|A| <= limit`, no NaN unless `padding_allowed`, `B` finite wherever
    `A` is not NaN, and at least `min_length` valid entries per instance."""
    padding = ops.isnan(values)
    valid = ops.logical_not(padding)
    bad_values = ops.logical_or(ops.isinf(values), ops.abs(values) > limit)  # NaN: neither
    if not padding_allowed:
        bad_values = ops.logical_or(bad_values, padding)
    bad_features = ops.logical_and(ops.logical_not(ops.isfinite(features)), valid[..., None])
    bad_entries = ops.logical_or(bad_values, ops.any(bad_features, axis=-1))
    length = ops.sum(ops.cast(valid, "int32"), axis=-1)
    short = length < min_length
    ok = ops.logical_not(ops.logical_or(ops.any(bad_entries), ops.any(short)))
    return _DataRules(padding, bad_features, short, length, ok)


def _data_rules_hold(values, features, limit: float, min_length: int, padding_allowed: bool):
    """Whether every rule of `_data_rules` holds, a boolean scalar."""
    return _data_rules(values, features, limit, min_length, padding_allowed).ok


# In TensorFlow graphs the check of a batch runs as one XLA cluster: one fused pass over A and
# B (16 x 2000 x 20 float32: 0.29 ms against 0.78 ms op by op, measured 2026-12-01).
_run_data_rules_hold = _backend.compiled_stage(_data_rules_hold)


class _Forward(NamedTuple):
    """What a step's forward pass leaves for the metrics (no gradient is taken of it)."""

    values: object  # A, zero at padding [batch, n]
    scores: object  # [batch, n]
    valid: object  # not padding [batch, n]
    low_weights: object  # soft membership of the lower bucket [batch, n]
    high_weights: object  # soft membership of the upper bucket [batch, n]
    epsilon: object  # the epsilon of the step, a scalar


@keras.saving.register_keras_serializable(package="keras_softquantile")
class QuantileObjectiveModel(_steps.BackendSteps, keras.Model):
    """Learns scores `C = scorer(B)` whose lower/upper quantile selection minimises `f`.

    Each instance (a batch row) has values `A` `[n]` and features `B` `[n, M]`; all instances
    share the scorer (by default `C = B @ theta`, with `theta` exposed as `model.theta`).
    `A_low` and `A_high` are the entries of `A` whose scores fall in the lower and upper
    `quantile` of `C`. The hard selection (`argsort`) has a zero gradient in `theta`, so
    training minimises the mean over instances of `f(A_low, A_high)` on a smooth selection:

    * `gradient_estimator="ot"`: `keras_softquantile.ops.soft_quantile_split`, entropic
      optimal transport with temperature `epsilon` (exact bucket masses, exact implicit
      gradients, deterministic);
    * `gradient_estimator="perturbed"`: `keras_softquantile.ops.perturbed_quantile_split`,
      the average of `num_samples` hard selections of Gaussian-perturbed scores (noise
      `sigma`) with a Monte-Carlo gradient (Berthet et al., 2020).

    `f` receives the selections in the form `output` gives (see `keras_softquantile.objectives`):
    `Selection(values, weights)` pairs ("weights"), weighted means ("mean"), or the selected
    values in ascending score order ("sorted").

    The model trains with `fit` under every Keras backend (TensorFlow, JAX, PyTorch): the
    forward pass, the loss and the metrics are written once on `keras.ops`, and only the
    optimizer step is written per backend (a `tf.GradientTape`; `jax.value_and_grad` of a
    stateless forward pass; `loss.backward()`), chosen from `keras.backend.backend()`.

    Data: `fit(x=(A, B))` or a dataset of `(A, B)` pairs (a `tf.data.Dataset`, or a
    `keras.utils.PyDataset` / `torch` `DataLoader` where the backend takes them), `A`
    `[batch, n]` and `B` `[batch, n, M]`, cast to float32 (float64 for a model with
    `dtype="float64"`).

    * NaN in `A` marks padding: instances of different lengths are padded to a common n with
      NaN in `A`, and the entries of `B` there are ignored (they may be NaN too). Padding
      needs `output` "weights" or "mean". Only NaN is padding: an infinite `A` is an error.
    * `B` must be finite wherever `A` is not NaN.
    * `|A|` must be at most the fourth root of the dtype's largest value, `2**32` (about
      4.3e9) in float32 and about 1.2e77 in float64: the gradient that reaches the optimizer
      grows with `|A|` (times the feature scale, n and `1 / epsilon`), and optimizers such as
      Adam square it, so larger values would end in a NaN `theta`. Rescale `A` (the built-in
      objectives are proportional to `A`, so Adam then learns the same `theta`) or use float64.
    * Each instance needs at least the fewest valid entries that put one entry in each
      bucket (`floor(quantile * n) >= 1`: 4 at quantile 0.25).

    `predict` and `selection(..., soft=False)` use `A` only as the padding mask: they apply
    the first two rules, and accept larger `|A|`, shorter instances (with empty hard masks)
    and padding with `output="sorted"`.

    `fit`, `evaluate` and `predict` check every batch (one pass over `A` and `B`) before the
    step runs, outside the step's compiled function (XLA, `jax.jit` or `torch.compile`), so
    the rules hold with `jit_compile` True or False, for arrays and datasets alike: a bad
    batch raises, before any update, a `ValueError` (JAX, PyTorch, and TensorFlow with
    `run_eagerly=True`) or a TensorFlow `InvalidArgumentError` (from the graph) whose message
    names `A` or `B`, the rule and the first bad entry, indexed within the batch
    (`Received: B[1, 3, 0]=nan`). Instances too short for a static n raise a `ValueError` when
    the step is traced. `selection` checks its arguments in the same way; inside your own
    compiled function (XLA, `jax.jit`) that check cannot raise, so call it outside.

    Metrics (each epoch's mean, under these names in the logs and in TensorBoard): `loss`
    (the soft objective plus any regularization losses), `hard_objective` (`f` on the hard
    selection of the same scores, no gradient), `selection_agreement` (the fraction of hard
    lower/upper members whose soft membership in their bucket exceeds 0.5) and `epsilon`.
    `predict` returns `{"scores", "lower_mask", "upper_mask"}` (hard boolean masks).

    `epsilon` lives in a non-trainable weight, `epsilon_variable`: `set_epsilon` (or the
    `keras_softquantile.callbacks.EpsilonAnnealing` callback) changes it during `fit`
    without retracing. The perturbed estimator's random state `[seed, step]` is also a
    non-trainable weight, `perturbation_seed`, so `save`, `save_weights` and
    `keras.callbacks.BackupAndRestore` keep it: a resumed `fit` draws the same noise, and
    ends at the same `theta`, as an uninterrupted one.

    >>> A = np.random.normal(size=(16, 40)).astype("float32")
    >>> B = np.random.normal(size=(16, 40, 3)).astype("float32")
    >>> model = keras_softquantile.models.QuantileObjectiveModel("spread", num_features=3)
    >>> model.compile(optimizer=keras.optimizers.Adam(0.05))
    >>> history = model.fit(x=(A, B), batch_size=8, epochs=2, verbose=0)
    >>> sorted(history.history)
    ['epsilon', 'hard_objective', 'loss', 'selection_agreement']

    Args:
        objective: "spread", "rank_weighted_spread" (needs `output="sorted"`), or a callable
            `f(low, high)` returning `[batch]` values or a scalar, to minimise (write it on
            `keras.ops` to train under every backend). Register your own function with
            `keras.saving.register_keras_serializable` to save the model.
        num_features: M, for the default linear scorer (or None to take it from the data).
        scorer: a Keras layer or model mapping `B` `[batch, n, M]` to scores `[batch, n]` (or
            `[batch, n, 1]`); default `LinearScorer(num_features)`.
        quantile: the level q in (0, 0.5]; 0.25 selects the quartiles.
        epsilon: positive float, the OT temperature (in quantile-level units: the soft mask
            differs from the hard one by about `1.4 * epsilon` in mean absolute value).
        output: "weights", "mean" or "sorted": what `objective` receives.
        gradient_estimator: "ot" or "perturbed".
        num_samples: noise draws per step of the perturbed estimator (>= 2).
        sigma: noise standard deviation of the perturbed estimator, on the squashed scores
            (quantile-level units, like `epsilon`).
        solver: "auto", "newton" or "sinkhorn" for the OT estimator.
        seed: int seed of the model's own random draws (the default scorer's initial theta
            and the perturbed estimator's noise), or None (drawn from Keras's global seed and
            Python's `random`, which `keras.utils.set_random_seed` seeds). `fit` also shuffles
            the instances each epoch: for bit-identical runs call
            `keras.utils.set_random_seed(seed)` before building the model.
        **kwargs: base model arguments (`name`, `dtype`, ...).

    References:
        Cuturi, Teboul, Vert (2019). Differentiable ranking and sorting using optimal
        transport. NeurIPS. Berthet et al. (2020). Learning with differentiable perturbed
        optimizers. NeurIPS.
    """

    def __init__(
        self,
        objective="spread",
        num_features: int | None = None,
        scorer: keras.layers.Layer | None = None,
        quantile: float = 0.25,
        epsilon: float = 1e-2,
        output: str = "weights",
        gradient_estimator: str = "ot",
        num_samples: int = 100,
        sigma: float = 0.02,
        solver: str = "auto",
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.objective_function = objectives.get(objective)
        # Kept as given (a name or a callable); `get_config` serializes it.
        self.objective = objective if isinstance(objective, str) else self.objective_function
        self.quantile = _validation.check_split_quantile(quantile)
        self.epsilon = check_epsilon(epsilon)
        _validation.check_split_output(output)
        required = getattr(self.objective_function, "required_output", None)
        if required is not None and output != required:
            raise ValueError(
                f"The objective {self.objective_function.__name__!r} depends on the order of "
                f"the selected values and needs output={required!r}. Received: output={output!r}"
            )
        # `Model.output` is Keras's symbolic output, so the mode is kept as `output_mode`.
        self.output_mode = output
        if gradient_estimator not in _ESTIMATORS:
            raise ValueError(
                f"`gradient_estimator` must be one of {_ESTIMATORS}. "
                f"Received: gradient_estimator={gradient_estimator!r}"
            )
        self.gradient_estimator = gradient_estimator
        self.num_samples = check_num_samples(num_samples)
        self.sigma = _validation.check_positive(sigma, "sigma")
        self.solver = _validation.check_solver(solver)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"`seed` must be an int or None. Received: seed={seed!r}")
        self.seed = seed
        if scorer is None:
            initializer = (
                "random_normal" if seed is None else keras.initializers.RandomNormal(seed=seed)
            )
            scorer = LinearScorer(num_features, theta_initializer=initializer, name="linear_scorer")
        elif not isinstance(scorer, keras.layers.Layer):
            raise TypeError(
                "`scorer` must be a Keras layer or model mapping features [batch, n, M] to "
                f"scores [batch, n]. Received: scorer={scorer!r}"
            )
        if num_features is not None and (
            isinstance(num_features, bool)
            or not isinstance(num_features, numbers.Integral)
            or num_features < 1
        ):
            raise ValueError(
                f"`num_features` must be a positive int or None. "
                f"Received: num_features={num_features!r}"
            )
        self.num_features = num_features
        self.scorer = scorer
        # The model's own variables, in this order (saved `.keras` files and
        # `BackupAndRestore` checkpoints list them by position): "epsilon", then
        # "perturbation_seed" for the perturbed estimator.
        self._epsilon_weight = EpsilonWeight(self.epsilon)
        self._epsilon_weight.build(self)
        # The perturbed estimator's random state `[seed, counter]` is a weight of the model
        # (created after the epsilon weight, so it is the last of the model's own variables):
        # it is saved by `save`, `save_weights` and `BackupAndRestore`, so a resumed `fit`
        # draws the same noise as an uninterrupted one. (A `keras.random.SeedGenerator`
        # state is not saved.)
        self.perturbation_seed = None
        if gradient_estimator == "perturbed":
            initial = random.randint(1, int(1e9)) if seed is None else int(seed)
            # int64, except on JAX without `jax_enable_x64` (no 64-bit types: int32, which
            # holds the seeds and step counts as well; saved files load across backends).
            seed_dtype = "int64" if _backend.float64_available() else "int32"
            self.perturbation_seed = self.add_weight(
                name="perturbation_seed",
                shape=(2,),
                dtype=seed_dtype,
                initializer=lambda shape, dtype: ops.convert_to_tensor(
                    np.array([initial, 0], dtype), dtype
                ),
                trainable=False,
                autocast=False,
            )
        self._predict_wrapping = False
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.hard_objective_tracker = keras.metrics.Mean(name="hard_objective")
        self.agreement_tracker = keras.metrics.Mean(name="selection_agreement")
        self.epsilon_tracker = keras.metrics.Mean(name="epsilon")
        if num_features is not None and isinstance(scorer, LinearScorer):
            # Known weights from the start: `model.theta` exists, and callbacks that need a
            # built model (BackupAndRestore) work before the first batch.
            self.build((None, None, num_features))

    # ----------------------------------------------------------------- state

    @property
    def metrics(self) -> list:
        return [
            self.loss_tracker,
            self.hard_objective_tracker,
            self.agreement_tracker,
            self.epsilon_tracker,
        ]

    @property
    def theta(self):
        """The parameters `theta` `[M]` of the default linear scorer (a Keras variable)."""
        if not isinstance(self.scorer, LinearScorer):
            raise AttributeError(
                "`theta` exists only with the default linear scorer; this model scores with "
                f"{type(self.scorer).__name__}: read `model.scorer.weights` instead"
            )
        if self.scorer.theta is None:
            raise AttributeError(
                "`theta` is created when the model is built: call `fit`, the model, or "
                "`model.build((None, None, num_features))` first"
            )
        return self.scorer.theta

    @property
    def epsilon_variable(self):
        """The non-trainable weight "epsilon" (a Keras variable) that the steps read."""
        return self._epsilon_weight.variable

    def get_epsilon(self):
        """The current epsilon, a float32 scalar tensor of the active backend (float64 for a
        float64 model)."""
        self._sync_backend_state()
        return self._epsilon_weight.value()

    def set_epsilon(self, value: float) -> None:
        """Assigns a new epsilon (a finite float > 0) without retracing the train function."""
        value = check_epsilon(value)
        self._sync_backend_state()
        self._epsilon_weight.assign(value)

    # ----------------------------------------------------------------- forward

    def build(self, input_shape) -> None:
        """Builds the scorer for features `[batch, n, M]` (or an `(A, B)` pair of shapes)."""
        input_shape = self._feature_shape(input_shape)
        self._check_feature_shape(input_shape)
        if not self.scorer.built:
            self.scorer.build(input_shape)
        self.built = True

    @staticmethod
    def _feature_shape(input_shape) -> tuple:
        """The shape of B from the shape Keras builds with: B's, or those of `(A, B)`."""
        if isinstance(input_shape, dict) and set(input_shape) == {"values", "features"}:
            input_shape = input_shape["features"]
        elif (
            isinstance(input_shape, tuple | list)
            and len(input_shape) == 2
            and all(_is_shape(shape) for shape in input_shape)
        ):
            input_shape = input_shape[1]
        return tuple(input_shape)

    def _check_feature_shape(self, shape: tuple) -> None:
        if len(shape) != 3:
            raise ValueError(
                "`QuantileObjectiveModel` expects features B of shape [batch, n, M]. "
                f"Received: B.shape={shape}"
            )
        if self.num_features is not None and shape[-1] not in (None, self.num_features):
            raise ValueError(
                f"`QuantileObjectiveModel` was created with num_features={self.num_features}. "
                f"Received: B.shape={shape}"
            )

    def call(self, features, training=None):
        """Scores `[batch, n]` of features `[batch, n, M]` (or of the B of an `(A, B)` pair)."""
        scores = self.scorer(_features_of(features), training=training)
        if len(scores.shape) == 3 and scores.shape[-1] == 1:
            scores = ops.squeeze(scores, -1)
        if len(scores.shape) != 2:
            raise ValueError(
                "The scorer must map features [batch, n, M] to scores [batch, n] or "
                f"[batch, n, 1]. Received: scores.shape={tuple(scores.shape)}"
            )
        return scores

    def compute_output_shape(self, input_shape) -> tuple:
        return tuple(self._feature_shape(input_shape)[:2])

    # ----------------------------------------------------------------- data

    def _pair(self, data):
        """`(A, B)` from a batch as the step receives it, `(None, B)` for features alone.

        Accepts `((A, B),)`, `(A, B)`, `({"values": A, "features": B},)` and, for `predict`,
        `(B,)`; returns None for anything else.
        """
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if sample_weight is not None:
            return None
        if y is None and isinstance(x, dict) and set(x) == {"values", "features"}:
            return x["values"], x["features"]
        if y is None and isinstance(x, tuple | list) and len(x) == 2:
            return tuple(x)
        if not isinstance(x, tuple | list | dict):
            return (x, y) if y is not None else (None, x)
        return None

    def _unpack(self, data):
        """`(A, B)` from what `fit`/`evaluate` pass: `((A, B),)`, `(A, B)` or `{values, ...}`."""
        pair = self._pair(data)
        if pair is None or pair[0] is None:
            raise ValueError(
                "`QuantileObjectiveModel` expects data `(A, B)`: `fit(x=(A, B))` or a dataset "
                "of `(A, B)` pairs, A [batch, n] and B [batch, n, M]; it takes no targets or "
                f"sample weights. Received: data={data!r}"
            )
        return self._check_data(*pair)

    def _work_dtype(self) -> str:
        """The dtype of A, B and the selection: float64 for a float64 model, else float32."""
        return "float64" if self.compute_dtype == "float64" else "float32"

    def _check_data(self, values, features):
        """Static checks of `(A, B)` (`A` None: features alone), cast to the work dtype."""
        # The dtypes as given (JAX without `jax_enable_x64` would make an int64 array int32).
        given = [_dtype(x) if hasattr(x, "dtype") else None for x in (values, features)]
        features = ops.convert_to_tensor(features)
        if values is None:  # features alone (`predict(B)`)
            self._check_feature_shape(tuple(features.shape))
            values = ops.zeros_like(features[..., 0])
            given[0] = given[1]
        else:
            values = ops.convert_to_tensor(values)
        for tensor, name, dtype in ((values, "A", given[0]), (features, "B", given[1])):
            if not _is_float(tensor):
                raise TypeError(
                    f"`QuantileObjectiveModel` expects floating-point {name}. "
                    f"Received: {name}.dtype={dtype or _dtype(tensor)}"
                )
        if len(values.shape) != 2:
            raise ValueError(
                "`QuantileObjectiveModel` expects values A of shape [batch, n] (one row per "
                f"instance). Received: A.shape={tuple(values.shape)}"
            )
        self._check_feature_shape(tuple(features.shape))
        if not _compatible(tuple(values.shape), tuple(features.shape[:2])):
            raise ValueError(
                "A [batch, n] and B [batch, n, M] must agree on batch and n. "
                f"Received: A.shape={tuple(values.shape)}, B.shape={tuple(features.shape)}"
            )
        dtype = self._work_dtype()
        return ops.cast(values, dtype), ops.cast(features, dtype)

    def _min_length(self) -> int:
        """The fewest valid entries of an instance whose buckets hold >= 1 entry each."""
        return _validation.min_split_length(self.quantile)

    def _max_abs_value(self) -> float:
        """The largest |A| accepted: the fourth root of the work dtype's largest value."""
        return float(np.finfo(self._work_dtype()).max) ** 0.25

    def _check_length(self, values) -> None:
        """Raises if the static n is too short for the split (trace time, so also under XLA)."""
        n = values.shape[-1]
        if n is not None and n < self._min_length():
            raise ValueError(
                f"At quantile={self.quantile} each instance needs at least "
                f"{self._min_length()} valid entries, so that each bucket holds "
                f"floor(quantile * n) >= 1 of them. Received: A.shape={tuple(values.shape)}"
            )

    def _check_values(self, values, features, objective: bool = True) -> list:
        """Checks the values of a batch `(A, B)` (already through `_check_data`).

        Rules: `A` is finite or NaN (padding); `B` is finite wherever `A` is not NaN; for the
        objective (`objective=True`: `fit`, `evaluate`, soft selections) also `|A| <=
        _max_abs_value()`, at least `_min_length()` valid entries per instance and, with
        `output="sorted"`, no padding. Where the values can be read (eagerly, and outside
        `jax.jit`) a failure raises `ValueError`, and this returns `[]`; in a TensorFlow graph
        this returns an assertion op, which raises `InvalidArgumentError` with the same
        message. Under XLA and `jax.jit` nothing can raise: call this outside the compiled
        function (as `fit`, `evaluate` and `predict` do, see `_steps`).
        """
        if objective:
            self._check_length(values)
        if _backend.values_available(values, features):
            rules = self._data_rules(values, features, objective)
            if not bool(ops.convert_to_numpy(rules.ok)):
                raise ValueError(self._describe_bad_data(values, features, rules, objective))
            return []
        return self._traced_data_checks(values, features, objective)

    def _check_pair(self, values, features, objective: bool) -> list:
        """`_check_data` then `_check_values` of a raw `(A, B)`: the checks of one batch."""
        values, features = self._check_data(values, features)
        return self._check_values(values, features, objective=objective)

    def _check_batch(self, data, objective: bool) -> list:
        """The checks of a batch as `fit`, `evaluate` (`objective`) or `predict` get it."""
        pair = self._pair(data)
        if pair is None or (pair[0] is None and objective):
            return []  # the step raises its own error for data that are no `(A, B)` pair
        return self._check_pair(*pair, objective=objective)

    def _data_rule_settings(self, objective: bool) -> tuple[float, int, bool]:
        """`(limit, min_length, padding_allowed)` of `_data_rules` for `_check_values`."""
        if not objective:
            return math.inf, 0, True
        return self._max_abs_value(), self._min_length(), self.output_mode != "sorted"

    def _data_rules(self, values, features, objective: bool) -> _DataRules:
        """The rules of `_check_values`, as tensors (A and B agree in shape)."""
        return _data_rules(values, features, *self._data_rule_settings(objective))

    def _data_rules_hold(self, values, features, objective: bool):
        """Whether every rule of `_check_values` holds, a boolean scalar: one compiled stage
        where the rows and features have static lengths (an XLA cluster in TensorFlow graphs,
        which compiles once per batch size)."""
        settings = self._data_rule_settings(objective)
        if None in (*values.shape[1:], *features.shape[1:]):
            return _data_rules_hold(values, features, *settings)
        return _run_data_rules_hold(values, features, *settings)

    def _data_error_parts(self, rule: str, count, received: list) -> list:
        """The error message of a broken data rule, as parts to join (strings, or TensorFlow
        string tensors in a graph): `count` the bad entries, `received` the first of them."""
        if rule == "infinite":
            head = (
                "`A` must be finite or NaN: NaN marks padding, an infinite value is an error. "
                "Infinite entries: "
            )
        elif rule == "large":
            head = (
                f"`A` is too large: |A| must be at most {self._max_abs_value():.4g} in "
                f"{self._work_dtype()} (the fourth root of its largest value), because the "
                "gradient that reaches the optimizer grows with |A| and optimizers such as Adam "
                "square it. Rescale A (the built-in objectives scale with A, so the optimal "
                "theta does not change) or use a float64 model. Entries too large: "
            )
        elif rule == "padded":
            head = (
                "The sorted output needs instances of equal length: A must not have NaN "
                "padding. NaN entries: "
            )
        elif rule == "features":
            head = (
                "`B` must be finite wherever A is not NaN (B is ignored only at padding). "
                "Entries that are NaN or infinite: "
            )
        else:  # "short": `received` is [row, valid entries]
            row, length = received
            return [
                f"At quantile={self.quantile} each instance needs at least "
                f"{self._min_length()} valid entries (not NaN in A), so that each bucket "
                "holds floor(quantile * n) >= 1 of them. Instances too short: ",
                count,
                ". Received: A[",
                row,
                "] with ",
                length,
                " valid entries",
            ]
        return [head, count, ". ", *received]

    def _describe_bad_data(self, values, features, rules: _DataRules, objective: bool) -> str:
        """The error message for the first broken rule of `_check_values`, read eagerly."""
        values = ops.convert_to_numpy(values)
        padding = ops.convert_to_numpy(rules.padding)
        limit = self._max_abs_value() if objective else math.inf

        def received(mask, array, name):
            index = np.argwhere(mask)[0]
            # "%g" is how TensorFlow's graph message writes it (`tf.strings.as_string`).
            where = [
                f"Received: {name}[",
                ", ".join(str(int(i)) for i in index),
                "]=",
                f"{float(array[tuple(index)]):g}",
            ]
            return str(int(np.count_nonzero(mask))), where

        if np.isinf(values).any():
            return "".join(
                self._data_error_parts("infinite", *received(np.isinf(values), values, "A"))
            )
        if objective and (np.abs(values) > limit).any():
            large = np.abs(values) > limit
            return "".join(self._data_error_parts("large", *received(large, values, "A")))
        if objective and self.output_mode == "sorted" and padding.any():
            return "".join(self._data_error_parts("padded", *received(padding, values, "A")))
        bad_features = ops.convert_to_numpy(rules.bad_features)
        if bad_features.any():
            features = ops.convert_to_numpy(features)
            return "".join(
                self._data_error_parts("features", *received(bad_features, features, "B"))
            )
        short = ops.convert_to_numpy(rules.short)
        length = ops.convert_to_numpy(rules.length)
        row = int(np.argwhere(short)[0, 0])
        count = str(int(np.count_nonzero(short)))
        return "".join(self._data_error_parts("short", count, [str(row), str(int(length[row]))]))

    def make_predict_function(self, force=False):
        self._predict_wrapping = True
        try:
            return super().make_predict_function(force=force)
        finally:
            self._predict_wrapping = False

    # ----------------------------------------------------------------- selection

    def _next_seed(self):
        """The perturbed estimator's stateless seed for this step; advances the counter."""
        state = ops.convert_to_tensor(self.perturbation_seed)
        # Read (a new tensor) before the assignment: on PyTorch the variable's tensor is
        # updated in place.
        seed = ops.cast(state, "int32")
        self.perturbation_seed.assign(state + ops.convert_to_tensor([0, 1], _dtype(state)))
        return seed

    def _scores(self, values, features, training):
        """Padding mask, zero-filled A, and float scores of zero-filled B."""
        valid = ops.logical_not(ops.isnan(values))
        values = ops.where(valid, values, ops.zeros_like(values))
        features = ops.where(valid[..., None], features, ops.zeros_like(features))
        scores = ops.cast(self(features, training=training), _dtype(values))
        return valid, values, scores

    def _soft_selection(self, values, scores, valid, epsilon):
        """`(low, high)` as the objective receives them, and the soft membership weights."""
        if self.gradient_estimator == "ot":
            return _selection.soft_selection(
                values,
                scores,
                valid,
                quantile=self.quantile,
                epsilon=epsilon,
                output=self.output_mode,
                solver=self.solver,
            )
        mode = "sorted" if self.output_mode == "sorted" else "weights"
        seed = self._next_seed()
        (low, high), (low_w, high_w) = soft_ops.perturbed_quantile_split(
            values,
            scores,
            self.quantile,
            sigma=self.sigma,
            num_samples=self.num_samples,
            mask=None if mode == "sorted" else valid,
            output=mode,
            seed=seed,
            return_weights=True,
        )
        if mode == "weights":
            low_w, high_w = low, high
            low, high = _selection.selection_pair(values, low_w, high_w, self.output_mode)
        return (low, high), (low_w, high_w)

    def _hard_selection(self, values, scores, valid):
        """The hard `(low, high)` in the objective's form, and the hard boolean masks."""
        return _selection.hard_selection(
            values, scores, valid, quantile=self.quantile, output=self.output_mode
        )

    def _evaluate_objective(self, pair):
        return ops.mean(_selection.objective_values(self.objective_function, pair))

    # ----------------------------------------------------------------- steps
    #
    # The backend's step (`_steps`: a `tf.GradientTape`, `jax.value_and_grad` of a stateless
    # call, or `loss.backward()`) differentiates `_forward` and then calls `_update_metrics`.

    def _forward(self, values, features, training: bool):
        """The loss of a checked batch, and what the metrics need (`_Forward`).

        Reads the model's variables (and advances the perturbed estimator's seed state): the
        JAX step runs it inside a `keras.StatelessScope`.
        """
        epsilon = self._epsilon_weight.value()
        valid, values, scores = self._scores(values, features, training)
        pair, (low_w, high_w) = self._soft_selection(values, scores, valid, epsilon)
        loss = self._evaluate_objective(pair)
        if self.losses:
            loss = loss + ops.cast(functools.reduce(ops.add, self.losses), _dtype(loss))
        return loss, _Forward(values, scores, valid, low_w, high_w, epsilon)

    def _update_metrics(self, loss, forward: _Forward) -> dict:
        """Updates the four metrics with a step's results; returns their running values."""
        values, scores, valid, low_w, high_w, epsilon = forward
        hard_pair, (low_mask, high_mask) = self._hard_selection(values, scores, valid)
        hard_objective = self._evaluate_objective(hard_pair)
        batch = ops.shape(values)[0]
        self.loss_tracker.update_state(loss, sample_weight=batch)
        self.hard_objective_tracker.update_state(hard_objective, sample_weight=batch)
        dtype = _dtype(low_w)
        members = ops.cast(ops.logical_or(low_mask, high_mask), dtype)
        agreed = ops.cast(low_mask, dtype) * ops.cast(low_w > 0.5, dtype) + ops.cast(
            high_mask, dtype
        ) * ops.cast(high_w > 0.5, dtype)
        self.agreement_tracker.update_state(
            ops.sum(agreed) / ops.maximum(ops.sum(members), 1),
            sample_weight=ops.sum(members),
        )
        self.epsilon_tracker.update_state(epsilon)
        return {metric.name: metric.result() for metric in self.metrics}

    def _predict_outputs(self, data) -> dict:
        """`{"scores", "lower_mask", "upper_mask"}` of a batch `(A, B)` or of features `B`."""
        pair = self._pair(data)
        if pair is None:
            raise ValueError(
                "`QuantileObjectiveModel.predict` expects `(A, B)` pairs or features B "
                f"[batch, n, M] alone. Received: data={data!r}"
            )
        values, features = self._check_data(*pair)
        return self._selection(values, features, soft=False)

    def selection(self, values, features, soft: bool = True) -> dict:
        """The scores and the hard (and soft) lower/upper selections of a batch of instances.

        `A` and `B` are cast to the model's work dtype (float64 for a float64 model, else
        float32) and checked as in `fit` (with `soft`) or `predict` (without): a `ValueError`
        eagerly, an `InvalidArgumentError` in a `tf.function` (not under XLA or `jax.jit`,
        where the check cannot raise).

        Args:
            values: A `[batch, n]` (NaN marks padding).
            features: B `[batch, n, M]`.
            soft: also compute the soft memberships (with the current estimator and epsilon).

        Returns:
            A dict with "scores" `[batch, n]` (NaN at padding), "lower_mask" and "upper_mask"
            (hard, boolean `[batch, n]`), and with `soft` also "lower_membership" and
            "upper_membership" (float `[batch, n]`), tensors of the active backend.
        """
        values, features = self._check_data(values, features)
        checks = self._check_values(values, features, objective=soft)
        values = _backend.with_dependencies(values, checks)
        features = _backend.with_dependencies(features, checks)
        return self._selection(values, features, soft)

    def _selection(self, values, features, soft: bool) -> dict:
        valid, values, scores = self._scores(values, features, training=False)
        _, (low_mask, high_mask) = self._hard_selection(values, scores, valid)
        result = {
            "scores": ops.where(valid, scores, ops.full_like(scores, math.nan)),
            "lower_mask": low_mask,
            "upper_mask": high_mask,
        }
        if soft:
            _, (low_w, high_w) = self._soft_selection(values, scores, valid, self.get_epsilon())
            result["lower_membership"] = low_w
            result["upper_membership"] = high_w
        return result

    def load_own_variables(self, store) -> None:
        """Loads `epsilon` and the perturbed estimator's seed state.

        A file saved before the seed state was saved lacks it: the model then keeps its initial
        seed state, with a warning.
        """
        own = len(self._trainable_variables) + len(self._non_trainable_variables)
        if self.perturbation_seed is not None and len(store.keys()) == own - 1:
            warnings.warn(
                "This saved QuantileObjectiveModel has no perturbation seed state (it predates "
                "it); the perturbed estimator's noise restarts from the initial seed.",
                stacklevel=2,
            )
            store = {str(i): store[str(i)] for i in range(own - 1)}
            store[str(own - 1)] = ops.convert_to_numpy(self.perturbation_seed)
        super().load_own_variables(store)

    # ----------------------------------------------------------------- config

    def save(self, filepath, *args, **kwargs) -> None:
        """Saves the model as a `.keras` file (see `keras.Model.save`).

        Raises:
            ValueError: before anything is written (an existing file is kept), if the
                objective is a callable not registered with
                `keras.saving.register_keras_serializable`: the file could not be loaded.
        """
        objectives.serialize(self.objective)
        super().save(filepath, *args, **kwargs)

    def get_config(self) -> dict:
        config = {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
            "objective": objectives.serialize(self.objective),
            "num_features": self.num_features,
            "scorer": keras.saving.serialize_keras_object(self.scorer),
            "quantile": self.quantile,
            "epsilon": self.epsilon,
            "output": self.output_mode,
            "gradient_estimator": self.gradient_estimator,
            "num_samples": self.num_samples,
            "sigma": self.sigma,
            "solver": self.solver,
            "seed": self.seed,
        }
        return config

    @classmethod
    def from_config(cls, config: dict) -> QuantileObjectiveModel:
        config = dict(config)
        config["scorer"] = keras.saving.deserialize_keras_object(config["scorer"])
        if "dtype" in config and isinstance(config["dtype"], dict):
            config["dtype"] = keras.dtype_policies.deserialize(config["dtype"])
        return cls(**config)
