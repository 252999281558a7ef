"""The TensorFlow steps of `QuantileObjectiveModel`: a `tf.GradientTape`, and the data checks
in Keras's per-batch wrapper (outside the XLA function) and as graph assertions."""

from __future__ import annotations

import functools
import math

import tensorflow as tf

__all__ = ["BackendSteps"]


def _shape_string(tensor: tf.Tensor) -> tf.Tensor:
    """The dynamic shape of a tensor as a string tensor, "(2, 30)"."""
    parts = tf.strings.reduce_join(tf.strings.as_string(tf.shape(tensor)), separator=", ")
    return tf.strings.join(["(", parts, ")"])


def _collective_logs(logs: dict) -> dict:
    """The step's logs as Keras 3.15 can average them over the workers of a
    `MultiWorkerMirroredStrategy`: with shape `[1]`, not scalars.

    There Keras averages each log over the replicas with `strategy.reduce("MEAN", v, axis=0)`,
    which refuses a scalar ("Invalid reduction dimension 0", keras-team/keras#20585); over
    values of shape `[1]` it returns the scalar average. Anywhere else the logs stay as they
    are.
    """
    strategy = tf.distribute.get_strategy()
    multi_worker = getattr(strategy.extended, "_in_multi_worker_mode", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or not (
        multi_worker is not None and multi_worker()
    ):
        return logs
    return tf.nest.map_structure(
        lambda value: tf.reshape(value, [1]) if value.shape.rank == 0 else value, logs
    )


class BackendSteps:
    """`train_step`, `test_step` and `predict_step` of `QuantileObjectiveModel` on TensorFlow.

    As in Keras's guide "Customizing what happens in fit() with TensorFlow": the forward pass
    runs under a `tf.GradientTape`, and `optimizer.apply_gradients` updates the weights.
    """

    def train_step(self, data):
        """One optimizer step on a batch `(A, B)`; returns the running metrics."""
        return self._tape_step(data, training=True)

    def test_step(self, data):
        """The metrics of a batch `(A, B)`, without an update."""
        return self._tape_step(data, training=False)

    def predict_step(self, data):
        """`{"scores", "lower_mask", "upper_mask"}` of a batch `(A, B)` or of features `B`."""
        return self._predict_outputs(data)

    def _tape_step(self, data, training: bool):
        values, features = self._unpack(data)
        self._check_length(values)
        # The values of A and B were checked before this (possibly XLA-compiled) step, by the
        # wrapper `_autoconvert_optionals`.
        with tf.GradientTape() as tape:
            loss, forward = self._forward(values, features, training)
            # As Keras's own train_step: gradients are summed over replicas.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = loss / tf.cast(replicas, loss.dtype)
            if training:
                scaled = self.optimizer.scale_loss(scaled)
        if training:
            variables = self.trainable_variables
            gradients = tape.gradient(scaled, variables)
            self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        return _collective_logs(self._update_metrics(loss, forward))

    # ----------------------------------------------------- MultiWorkerMirroredStrategy

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Builds the optimizer and metrics before the first step under a strategy, from one
        replica's share of the first batch.

        Keras 3.15 averages the first distributed batch over the replicas for this with
        `strategy.reduce`, which `MultiWorkerMirroredStrategy` refuses for a `PerReplica` batch
        ("unsupported type PerReplica", keras-team/keras#20585). The build needs only the
        structure and shapes of a batch, which one replica's share has.
        """
        if iterator is not None and self._distribute_strategy is not None:
            local = self.distribute_strategy.experimental_local_results
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(
                    lambda x: local(x)[0] if isinstance(x, tf.distribute.DistributedValues) else x,
                    next(batches),
                )
                break
        return super()._maybe_symbolic_build(data_batch=data_batch)

    # ----------------------------------------------------------------- data checks

    def _sync_backend_state(self) -> None:
        """Nothing to do: TensorFlow's variables always hold the current values."""
        return  # (a body beyond the docstring, which AutoGraph needs)

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
                    checks.extend(self._check_pair(values, features, objective))
            with tf.control_dependencies(checks):
                return step(data)

        return checked_step

    def _traced_data_checks(self, values, features, objective: bool) -> list:
        """`_check_values` in a `tf.function`: an assertion op whose message names the first
        broken rule (an `InvalidArgumentError` when the graph runs)."""
        if values.shape.is_fully_defined() and features.shape[:2].is_fully_defined():
            shapes_check = []  # `_check_data` compared the static shapes
        else:
            # Shapes known only when the graph runs (a dataset of variable-length instances):
            # compared before the element-wise rules, which would fail on them less clearly.
            shapes_check = [
                tf.debugging.Assert(
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
            ]
        with tf.control_dependencies(shapes_check):
            ok = self._data_rules_hold(values, features, objective)
            # The rules' masks and the message are computed only for a batch that fails.
            message = tf.cond(
                ok,
                lambda: tf.constant(""),
                lambda: self._graph_data_message(
                    values, features, self._data_rules(values, features, objective), objective
                ),
            )
            return [tf.debugging.Assert(ok, [message], name="check_data")]

    def _graph_data_message(self, values, features, rules, objective: bool) -> tf.Tensor:
        """`_describe_bad_data` as a string tensor, for the graph assertion."""
        limit = self._max_abs_value() if objective else math.inf

        def received(mask, tensor, name):
            index = tf.where(mask)[0]
            count = tf.strings.as_string(tf.math.count_nonzero(mask))
            position = tf.strings.reduce_join(tf.strings.as_string(index), separator=", ")
            value = tf.gather_nd(tensor, index[None])[0]
            text = tf.strings.as_string(value, shortest=True)
            return count, [f"Received: {name}[", position, "]=", text]

        def message(rule, mask, tensor, name):
            return lambda: tf.strings.join(
                self._data_error_parts(rule, *received(mask, tensor, name))
            )

        def short_rows():
            row = tf.where(rules.short)[0, 0]
            count = tf.strings.as_string(tf.math.count_nonzero(rules.short))
            length = tf.strings.as_string(tf.gather(rules.length, row))
            parts = self._data_error_parts("short", count, [tf.strings.as_string(row), length])
            return tf.strings.join(parts)

        infinite = tf.math.is_inf(values)
        cases = [(tf.reduce_any(infinite), message("infinite", infinite, values, "A"))]
        if objective:
            large = tf.abs(values) > limit
            cases.append((tf.reduce_any(large), message("large", large, values, "A")))
            if self.output_mode == "sorted":
                cases.append(
                    (
                        tf.reduce_any(rules.padding),
                        message("padded", rules.padding, values, "A"),
                    )
                )
        cases.append(
            (
                tf.reduce_any(rules.bad_features),
                message("features", rules.bad_features, features, "B"),
            )
        )
        return tf.case(cases, default=short_rows, exclusive=False)
