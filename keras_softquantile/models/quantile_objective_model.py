"""`QuantileObjectiveModel`: learn a scorer so that its quantile selection minimises f."""

from __future__ import annotations

import math
import numbers

import keras
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
    `[batch, n, M]`. Instances of different lengths are padded to a common n with NaN in `A`
    (the entries of `B` there are ignored); padding needs `output` "weights" or "mean".

    Metrics (each epoch's mean, under these names in the logs and in TensorBoard): `loss`
    (the soft objective plus any regularization losses), `hard_objective` (`f` on the hard
    selection of the same scores, no gradient), `selection_agreement` (the fraction of hard
    lower/upper members whose soft membership in their bucket exceeds 0.5) and `epsilon`.
    `predict` returns `{"scores", "lower_mask", "upper_mask"}` (hard boolean masks).

    `epsilon` lives in a non-trainable weight, `epsilon_variable`: `set_epsilon` (or the
    `keras_softquantile.callbacks.EpsilonAnnealing` callback) changes it during `fit`
    without retracing.

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
        seed: int seed of the perturbed estimator's noise, or None.
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
            scorer = LinearScorer(num_features, name="linear_scorer")
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
        self.seed_generator = (
            keras.random.SeedGenerator(seed, name="perturbation_seed")
            if gradient_estimator == "perturbed"
            else None
        )
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

    def _unpack(self, data):
        """`(A, B)` from what `fit`/`evaluate` pass: `((A, B),)`, `(A, B)` or `{values, ...}`."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if isinstance(x, dict) and y is None and set(x) == {"values", "features"}:
            values, features = x["values"], x["features"]
        elif isinstance(x, tuple | list) and len(x) == 2 and y is None:
            values, features = x
        elif y is not None and sample_weight is None and not isinstance(x, tuple | list | dict):
            values, features = x, y
        else:
            raise ValueError(
                "`QuantileObjectiveModel` expects data `(A, B)`: `fit(x=(A, B))` or a dataset "
                "of `(A, B)` pairs, A [batch, n] and B [batch, n, M]; it takes no targets or "
                f"sample weights. Received: data={data!r}"
            )
        return self._check_data(values, features)

    def _check_data(self, values, features):
        values = tf.convert_to_tensor(values)
        features = tf.convert_to_tensor(features)
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
        return values, features

    # ----------------------------------------------------------------- selection

    def _work_dtype(self, values) -> tf.DType:
        return tf.float64 if values.dtype == tf.float64 else tf.float32

    def _scores(self, values, features, training):
        """Padding mask, zero-filled A, and float scores of zero-filled B."""
        dtype = self._work_dtype(values)
        valid = tf.math.is_finite(values)
        values = tf.where(valid, values, tf.zeros_like(values))
        features = tf.where(valid[..., None], features, tf.zeros_like(features))
        scores = tf.cast(self(features, training=training), dtype)
        return valid, tf.cast(values, dtype), scores

    def _check_unpadded(self, valid) -> list:
        if self.output_mode != "sorted":
            return []
        return [
            tf.debugging.assert_equal(
                tf.reduce_all(valid),
                True,
                message="output='sorted' needs instances of equal length: A has NaN padding",
            )
        ]

    def _soft_selection(self, values, scores, valid):
        """`(low, high)` as the objective receives them, and the soft membership weights."""
        mask = None if self.output_mode == "sorted" else valid
        mode = "sorted" if self.output_mode == "sorted" else "weights"
        if self.gradient_estimator == "perturbed":
            seed = tf.cast(self.seed_generator.next(), tf.int32)
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
        with tf.GradientTape() as tape:
            valid, values, scores = self._scores(values, features, training)
            with tf.control_dependencies(self._check_unpadded(valid)):
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
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        if isinstance(x, tuple | list) and len(x) == 2:
            values, features = self._check_data(*x)
        else:
            features = tf.convert_to_tensor(x)
            self._check_feature_shape(tuple(features.shape))
            values = tf.zeros(tf.shape(features)[:2], features.dtype)
        return self.selection(values, features, soft=False)

    def selection(self, values, features, soft: bool = True) -> dict:
        """The scores and the hard (and soft) lower/upper selections of a batch of instances.

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
        valid, values, scores = self._scores(values, features, training=False)
        _, (low_mask, high_mask) = self._hard_selection(values, scores, valid)
        result = {
            "scores": tf.where(valid, scores, tf.fill(tf.shape(scores), math.nan)),
            "lower_mask": low_mask,
            "upper_mask": high_mask,
        }
        if soft:
            with tf.control_dependencies(self._check_unpadded(valid)):
                _, (low_w, high_w) = self._soft_selection(values, scores, valid)
            result["lower_membership"] = low_w
            result["upper_membership"] = high_w
        return result

    # ----------------------------------------------------------------- config

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
