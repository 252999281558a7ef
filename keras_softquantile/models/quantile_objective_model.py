"""`QuantileObjectiveModel`: learn a scorer so that its quantile selection minimises f."""

from __future__ import annotations

import functools
import math
import numbers
import random
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_softquantile import objectives, ops
from keras_softquantile.models.linear_scorer import LinearScorer
from keras_softquantile.ops import _validation
from keras_softquantile.ops.perturbed import check_num_samples

__all__ = ["QuantileObjectiveModel"]

_OUTPUTS = ("weights", "mean", "sorted")
_ESTIMATORS = ("ot", "perturbed")
_SOLVERS = ("auto", "newton", "sinkhorn")


def _check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a positive float. Received: {name}={value!r}")
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"`{name}` must be a finite number > 0. Received: {name}={value!r}")
    return float(value)


def _shape_string(tensor: tf.Tensor) -> tf.Tensor:
    """The dynamic shape of a tensor as a string tensor, "(2, 30)"."""
    parts = tf.strings.reduce_join(tf.strings.as_string(tf.shape(tensor)), separator=", ")
    return tf.strings.join(["(", parts, ")"])


@keras.saving.register_keras_serializable(package="keras_softquantile")
class QuantileObjectiveModel(keras.Model):
    """Learns scores `C = scorer(B)` whose lower/upper quantile selection minimises `f`.

    Each instance (a batch row) has values `A` `[n]` and features `B` `[n, M]`; all instances
    share the scorer (by default `C = B @ theta`, with `theta` exposed as `model.theta`).
    `A_low` and `A_high` are the entries of `A` whose scores fall in the lower and upper
    `quantile` of `C`. The hard selection (`tf.argsort`) has a zero gradient in `theta`, so
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

    Data: `fit(x=(A, B))` or a `tf.data.Dataset` of `(A, B)` pairs, `A` `[batch, n]` and `B`
    `[batch, n, M]`, cast to float32 (float64 for a model with `dtype="float64"`).

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
    step runs, outside the step's XLA function, so the rules hold with `jit_compile` True or
    False, for arrays and datasets alike: a bad batch raises, before any update, a
    `ValueError` (with `run_eagerly=True`) or an `InvalidArgumentError` (from the graph) whose
    message names `A` or `B`, the rule and the first bad entry, indexed within the batch
    (`Received: B[1, 3, 0]=nan`). Instances too short for a static n raise a `ValueError` when
    the step is traced. `selection` checks its arguments in the same way; inside your own
    XLA-compiled function that check cannot raise, so call it outside.

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
            `f(low, high)` returning `[batch]` values or a scalar, to minimise. Register your
            own function with `keras.saving.register_keras_serializable` to save the model.
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
        self.epsilon = _check_positive(epsilon, "epsilon")
        if output not in _OUTPUTS:
            raise ValueError(f"`output` must be one of {_OUTPUTS}. Received: output={output!r}")
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
        self.sigma = _check_positive(sigma, "sigma")
        if solver not in _SOLVERS:
            raise ValueError(f"`solver` must be one of {_SOLVERS}. Received: solver={solver!r}")
        self.solver = solver
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
        self.epsilon_variable = self.add_weight(
            name="epsilon",
            shape=(),
            initializer=keras.initializers.Constant(self.epsilon),
            trainable=False,
            autocast=False,
        )
        # The perturbed estimator's random state `[seed, counter]` is a weight of the model
        # (created after `epsilon_variable`, so it is the last of the model's own variables):
        # it is saved by `save`, `save_weights` and `BackupAndRestore`, so a resumed `fit`
        # draws the same noise as an uninterrupted one. (A `keras.random.SeedGenerator`
        # state is not saved.)
        self.perturbation_seed = None
        if gradient_estimator == "perturbed":
            initial = random.randint(1, int(1e9)) if seed is None else int(seed)
            self.perturbation_seed = self.add_weight(
                name="perturbation_seed",
                shape=(2,),
                dtype="int64",
                initializer=lambda shape, dtype: tf.constant([initial, 0], dtype),
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

    def get_epsilon(self) -> tf.Tensor:
        """The current epsilon, a float32 scalar tensor."""
        return tf.convert_to_tensor(self.epsilon_variable)

    def set_epsilon(self, value: float) -> None:
        """Assigns a new epsilon (a finite float > 0) without retracing the train function."""
        self.epsilon_variable.assign(_check_positive(value, "epsilon"))

    # ----------------------------------------------------------------- forward

    def build(self, input_shape) -> None:
        input_shape = tuple(input_shape)
        self._check_feature_shape(input_shape)
        if not self.scorer.built:
            self.scorer.build(input_shape)
        self.built = True

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
        """Scores `[batch, n]` of features `[batch, n, M]`."""
        scores = self.scorer(features, training=training)
        if scores.shape.rank == 3 and scores.shape[-1] == 1:
            scores = keras.ops.squeeze(scores, -1)
        if scores.shape.rank != 2:
            raise ValueError(
                "The scorer must map features [batch, n, M] to scores [batch, n] or "
                f"[batch, n, 1]. Received: scores.shape={scores.shape}"
            )
        return scores

    def compute_output_shape(self, input_shape) -> tuple:
        return tuple(input_shape[:2])

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

    def _work_dtype(self) -> tf.DType:
        """The dtype of A, B and the selection: float64 for a float64 model, else float32."""
        return tf.float64 if self.compute_dtype == "float64" else tf.float32

    def _check_data(self, values, features):
        """Static checks of `(A, B)` (`A` None: features alone), cast to the work dtype."""
        features = tf.convert_to_tensor(features)
        values = (
            tf.zeros(tf.shape(features)[:2], features.dtype)
            if values is None
            else tf.convert_to_tensor(values)
        )
        for tensor, name in ((values, "A"), (features, "B")):
            if not tensor.dtype.is_floating:
                raise TypeError(
                    f"`QuantileObjectiveModel` expects floating-point {name}. "
                    f"Received: {name}.dtype={tensor.dtype.name}"
                )
        if values.shape.rank != 2:
            raise ValueError(
                "`QuantileObjectiveModel` expects values A of shape [batch, n] (one row per "
                f"instance). Received: A.shape={values.shape}"
            )
        self._check_feature_shape(tuple(features.shape))
        if not values.shape.is_compatible_with(features.shape[:2]):
            raise ValueError(
                "A [batch, n] and B [batch, n, M] must agree on batch and n. "
                f"Received: A.shape={values.shape}, B.shape={features.shape}"
            )
        dtype = self._work_dtype()
        return tf.cast(values, dtype), tf.cast(features, dtype)

    def _min_length(self) -> int:
        """The fewest valid entries of an instance whose buckets hold >= 1 entry each."""
        length = max(1, math.ceil(1 / self.quantile) - 1)
        while math.floor(self.quantile * length + 1e-9) < 1:
            length += 1
        return length

    def _max_abs_value(self) -> float:
        """The largest |A| accepted: the fourth root of the work dtype's largest value."""
        return float(np.finfo(self._work_dtype().as_numpy_dtype).max) ** 0.25

    def _check_length(self, values) -> None:
        """Raises if the static n is too short for the split (trace time, so also under XLA)."""
        n = values.shape[-1]
        if n is not None and n < self._min_length():
            raise ValueError(
                f"At quantile={self.quantile} each instance needs at least "
                f"{self._min_length()} valid entries, so that each bucket holds "
                f"floor(quantile * n) >= 1 of them. Received: A.shape={values.shape}"
            )

    def _check_values(self, values, features, objective: bool = True):
        """Checks the values of a batch `(A, B)` (already through `_check_data`).

        Rules: `A` is finite or NaN (padding); `B` is finite wherever `A` is not NaN; for the
        objective (`objective=True`: `fit`, `evaluate`, soft selections) also `|A| <=
        _max_abs_value()`, at least `_min_length()` valid entries per instance and, with
        `output="sorted"`, no padding. Eagerly a failure raises `ValueError`; in a graph this
        returns an assertion op, which raises `InvalidArgumentError` with the same message.
        Under XLA an assertion cannot raise: call this outside the compiled function (as
        `_autoconvert_optionals` does for `fit`, `evaluate` and `predict`).
        """
        if objective:
            self._check_length(values)
        if tf.executing_eagerly() or (
            values.shape.is_fully_defined() and features.shape[:2].is_fully_defined()
        ):
            shapes_check = None  # `_check_data` compared the static shapes
        else:
            # Shapes known only when the graph runs (a dataset of variable-length instances):
            # compared before the element-wise rules, which would fail on them less clearly.
            shapes_check = tf.debugging.Assert(
                tf.reduce_all(tf.equal(tf.shape(values), tf.shape(features)[:2])),
                [
                    tf.strings.join(
                        [
                            "A [batch, n] and B [batch, n, M] must agree on batch and n. "
                            "Received: A.shape=",
                            _shape_string(values),
                            ", B.shape=",
                            _shape_string(features),
                        ]
                    )
                ],
                name="check_shapes",
            )
        with tf.control_dependencies([] if shapes_check is None else [shapes_check]):
            return self._check_value_rules(values, features, objective)

    def _check_value_rules(self, values, features, objective: bool):
        """`_check_values` once A and B are known to agree in shape."""
        padding = tf.math.is_nan(values)
        valid = tf.logical_not(padding)
        limit = self._max_abs_value() if objective else math.inf
        bad_values = tf.math.is_inf(values) | (tf.abs(values) > limit)  # NaN: neither
        if objective and self.output_mode == "sorted":
            bad_values = bad_values | padding
        bad_features = tf.logical_not(tf.math.is_finite(features)) & valid[..., None]
        bad_entries = bad_values | tf.reduce_any(bad_features, axis=-1)
        length = tf.reduce_sum(tf.cast(valid, tf.int32), axis=-1)
        short = length < (self._min_length() if objective else 0)
        ok = tf.logical_not(tf.reduce_any(bad_entries) | tf.reduce_any(short))

        def describe():
            return self._describe_bad_data(
                values, features, padding, bad_features, short, length, limit, objective
            )

        if tf.executing_eagerly():
            if not bool(ok):
                raise ValueError(tf.get_static_value(describe()).decode())
            return None
        message = tf.cond(ok, lambda: tf.constant(""), describe)
        return tf.debugging.Assert(ok, [message], name="check_data")

    def _describe_bad_data(
        self, values, features, padding, bad_features, short, length, limit, objective
    ) -> tf.Tensor:
        """The error message (a string tensor) for the first broken rule of `_check_values`."""

        def received(mask, tensor, name):
            index = tf.where(mask)[0]
            count = tf.strings.as_string(tf.math.count_nonzero(mask))
            position = tf.strings.reduce_join(tf.strings.as_string(index), separator=", ")
            value = tf.gather_nd(tensor, index[None])[0]
            return count, tf.strings.join(
                [f"Received: {name}[", position, "]=", tf.strings.as_string(value, shortest=True)]
            )

        def infinite_values():
            count, where = received(tf.math.is_inf(values), values, "A")
            return tf.strings.join(
                [
                    "`A` must be finite or NaN: NaN marks padding, an infinite value is an "
                    "error. Infinite entries: ",
                    count,
                    ". ",
                    where,
                ]
            )

        def large_values():
            count, where = received(tf.abs(values) > limit, values, "A")
            return tf.strings.join(
                [
                    f"`A` is too large: |A| must be at most {limit:.4g} in "
                    f"{self._work_dtype().name} (the fourth root of its largest value), "
                    "because the gradient that reaches the optimizer grows with |A| and "
                    "optimizers such as Adam square it. Rescale A (the built-in objectives "
                    "scale with A, so the optimal theta does not change) or use a float64 model. "
                    "Entries too large: ",
                    count,
                    ". ",
                    where,
                ]
            )

        def padded_values():
            count, where = received(padding, values, "A")
            return tf.strings.join(
                [
                    "The sorted output needs instances of equal length: A must not have NaN "
                    "padding. NaN entries: ",
                    count,
                    ". ",
                    where,
                ]
            )

        def bad_feature_values():
            count, where = received(bad_features, features, "B")
            return tf.strings.join(
                [
                    "`B` must be finite wherever A is not NaN (B is ignored only at padding). "
                    "Entries that are NaN or infinite: ",
                    count,
                    ". ",
                    where,
                ]
            )

        def short_rows():
            row = tf.where(short)[0, 0]
            return tf.strings.join(
                [
                    f"At quantile={self.quantile} each instance needs at least "
                    f"{self._min_length()} valid entries (not NaN in A), so that each bucket "
                    "holds floor(quantile * n) >= 1 of them. Instances too short: ",
                    tf.strings.as_string(tf.math.count_nonzero(short)),
                    ". Received: A[",
                    tf.strings.as_string(row),
                    "] with ",
                    tf.strings.as_string(tf.gather(length, row)),
                    " valid entries",
                ]
            )

        cases = [(tf.reduce_any(tf.math.is_inf(values)), infinite_values)]
        if objective:
            cases.append((tf.reduce_any(tf.abs(values) > limit), large_values))
            if self.output_mode == "sorted":
                cases.append((tf.reduce_any(padding), padded_values))
        cases.append((tf.reduce_any(bad_features), bad_feature_values))
        return tf.case(cases, default=short_rows, exclusive=False)

    def _local_pairs(self, values, features) -> list:
        """The per-replica `(A, B)` of a batch (distributed values in `fit` under a strategy)."""
        if not isinstance(features, tf.distribute.DistributedValues):
            return [(values, features)]
        local = self.distribute_strategy.experimental_local_results
        local_features = local(features)
        local_values = [None] * len(local_features) if values is None else local(values)
        return list(zip(local_values, local_features, strict=True))

    def _autoconvert_optionals(self, step_func):
        """Keras's wrapper of the (possibly XLA-compiled) step: we add the data checks.

        Keras's TensorFlow trainer wraps each one-batch step function with this method, outside
        the `jit_compile` function, for `fit`, `evaluate` and `predict` (and their `*_on_batch`
        forms). Checking the batch here (one pass over A and B) makes bad data raise even
        under XLA, where an assertion in the step is dropped.
        """
        step = super()._autoconvert_optionals(step_func)
        objective = not self._predict_wrapping

        @functools.wraps(step)
        def checked_step(data):
            pair = self._pair(
                tf.nest.map_structure(
                    lambda x: None if isinstance(x, tf.experimental.Optional) else x, data
                )
            )
            checks = []
            if pair is not None and (pair[0] is not None or not objective):
                for values, features in self._local_pairs(*pair):
                    values, features = self._check_data(values, features)
                    checks.append(self._check_values(values, features, objective=objective))
            with tf.control_dependencies([c for c in checks if c is not None]):
                return step(data)

        return checked_step

    def make_predict_function(self, force=False):
        self._predict_wrapping = True
        try:
            return super().make_predict_function(force=force)
        finally:
            self._predict_wrapping = False

    # ----------------------------------------------------------------- selection

    def _next_seed(self) -> tf.Tensor:
        """The perturbed estimator's stateless seed for this step; advances the counter."""
        seed = tf.identity(self.perturbation_seed.value)
        self.perturbation_seed.assign(seed + tf.constant([0, 1], seed.dtype))
        return tf.cast(seed, tf.int32)

    def _scores(self, values, features, training):
        """Padding mask, zero-filled A, and float scores of zero-filled B."""
        valid = tf.math.logical_not(tf.math.is_nan(values))
        values = tf.where(valid, values, tf.zeros_like(values))
        features = tf.where(valid[..., None], features, tf.zeros_like(features))
        scores = tf.cast(self(features, training=training), values.dtype)
        return valid, values, scores

    def _soft_selection(self, values, scores, valid):
        """`(low, high)` as the objective receives them, and the soft membership weights."""
        mask = None if self.output_mode == "sorted" else valid
        mode = "sorted" if self.output_mode == "sorted" else "weights"
        if self.gradient_estimator == "perturbed":
            seed = self._next_seed()
            (low, high), (low_w, high_w) = ops.perturbed_quantile_split(
                values,
                scores,
                self.quantile,
                sigma=self.sigma,
                num_samples=self.num_samples,
                mask=mask,
                output=mode,
                seed=seed,
                return_weights=True,
            )
            if mode == "weights":
                low_w, high_w = low, high
        elif mode == "sorted":
            (low, high), diagnostics = ops.soft_quantile_split(
                values,
                scores,
                self.quantile,
                epsilon=self.get_epsilon(),
                output="sorted",
                solver=self.solver,
                return_diagnostics=True,
            )
            k = low.shape[-1]
            memberships = diagnostics.memberships
            low_w = tf.reduce_sum(memberships[..., :k], -1)
            high_w = tf.reduce_sum(memberships[..., memberships.shape[-1] - k :], -1)
        else:
            low_w, high_w = ops.soft_quantile_split(
                values,
                scores,
                self.quantile,
                epsilon=self.get_epsilon(),
                mask=mask,
                output="weights",
                solver=self.solver,
            )
        if mode == "weights":
            low = objectives.Selection(values, low_w)
            high = objectives.Selection(values, high_w)
            if self.output_mode == "mean":
                low, high = low.mean(), high.mean()
        return (low, high), (low_w, high_w)

    def _hard_selection(self, values, scores, valid):
        """The hard `(low, high)` in the objective's form, and the hard boolean masks."""
        scores = tf.stop_gradient(scores)
        key = tf.where(valid, scores, tf.fill(tf.shape(scores), scores.dtype.max))
        order = tf.argsort(key, axis=-1, stable=True)
        ranks = tf.argsort(order, axis=-1, stable=True)
        count = tf.reduce_sum(tf.cast(valid, tf.int32), axis=-1, keepdims=True)
        k = tf.cast(tf.floor(self.quantile * tf.cast(count, tf.float64) + 1e-9), tf.int32)
        low_mask = ranks < k
        high_mask = (ranks >= count - k) & valid
        if self.output_mode == "sorted":
            n = values.shape[-1]
            k_static = math.floor(self.quantile * n + 1e-9)
            ordered = tf.gather(values, order, batch_dims=1)
            pair = (ordered[:, :k_static], ordered[:, n - k_static :])
        else:
            pair = tuple(
                objectives.Selection(values, tf.cast(m, values.dtype))
                for m in (low_mask, high_mask)
            )
            if self.output_mode == "mean":
                pair = tuple(s.mean() for s in pair)
        return pair, (low_mask, high_mask)

    def _evaluate_objective(self, pair) -> tf.Tensor:
        value = self.objective_function(*pair)
        value = tf.convert_to_tensor(value)
        if value.shape.rank not in (0, 1):
            raise ValueError(
                "The objective must return one value per instance [batch] or a scalar. "
                f"Received: an output of shape {value.shape}"
            )
        return tf.reduce_mean(value)

    def _step(self, data, training: bool):
        values, features = self._unpack(data)
        self._check_length(values)
        # The values of A and B were checked before this (possibly XLA-compiled) step, by the
        # wrapper `_autoconvert_optionals`.
        with tf.GradientTape() as tape:
            valid, values, scores = self._scores(values, features, training)
            pair, (low_w, high_w) = self._soft_selection(values, scores, valid)
            objective = self._evaluate_objective(pair)
            loss = objective
            if self.losses:
                loss = loss + tf.cast(tf.add_n(self.losses), loss.dtype)
            # As Keras's own train_step: gradients are summed over replicas.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = loss / tf.cast(replicas, loss.dtype)
            if training:
                scaled = self.optimizer.scale_loss(scaled)
        if training:
            variables = self.trainable_variables
            gradients = tape.gradient(scaled, variables)
            self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        hard_pair, (low_mask, high_mask) = self._hard_selection(values, scores, valid)
        hard_objective = self._evaluate_objective(hard_pair)
        batch = tf.shape(values)[0]
        self.loss_tracker.update_state(loss, sample_weight=batch)
        self.hard_objective_tracker.update_state(hard_objective, sample_weight=batch)
        members = tf.cast(low_mask | high_mask, low_w.dtype)
        agreed = tf.cast(low_mask, low_w.dtype) * tf.cast(low_w > 0.5, low_w.dtype) + tf.cast(
            high_mask, low_w.dtype
        ) * tf.cast(high_w > 0.5, low_w.dtype)
        self.agreement_tracker.update_state(
            tf.reduce_sum(agreed) / tf.maximum(tf.reduce_sum(members), 1),
            sample_weight=tf.reduce_sum(members),
        )
        self.epsilon_tracker.update_state(self.get_epsilon())
        return {metric.name: metric.result() for metric in self.metrics}

    def train_step(self, data):
        """One optimizer step on a batch `(A, B)`; returns the running metrics."""
        return self._step(data, training=True)

    def test_step(self, data):
        """The metrics of a batch `(A, B)`, without an update."""
        return self._step(data, training=False)

    def predict_step(self, data):
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
        eagerly, an `InvalidArgumentError` in a `tf.function` (not under XLA, where the check
        cannot raise).

        Args:
            values: A `[batch, n]` (NaN marks padding).
            features: B `[batch, n, M]`.
            soft: also compute the soft memberships (with the current estimator and epsilon).

        Returns:
            A dict with "scores" `[batch, n]` (NaN at padding), "lower_mask" and "upper_mask"
            (hard, boolean `[batch, n]`), and with `soft` also "lower_membership" and
            "upper_membership" (float `[batch, n]`).
        """
        values, features = self._check_data(values, features)
        check = self._check_values(values, features, objective=soft)
        with tf.control_dependencies([] if check is None else [check]):
            return self._selection(values, features, soft)

    def _selection(self, values, features, soft: bool) -> dict:
        valid, values, scores = self._scores(values, features, training=False)
        _, (low_mask, high_mask) = self._hard_selection(values, scores, valid)
        result = {
            "scores": tf.where(valid, scores, tf.constant(math.nan, scores.dtype)),
            "lower_mask": low_mask,
            "upper_mask": high_mask,
        }
        if soft:
            _, (low_w, high_w) = self._soft_selection(values, scores, valid)
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
            store[str(own - 1)] = self.perturbation_seed.value
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
