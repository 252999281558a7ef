"""The JAX steps of `QuantileObjectiveModel`: stateless, with `jax.value_and_grad`."""

from __future__ import annotations

import jax
import keras
from keras.src.backend.common.stateless_scope import in_stateless_scope

__all__ = ["BackendSteps"]


def _current_values(scope, variables, previous) -> list:
    """The values of `variables` at the end of a `keras.StatelessScope` (assigned or not)."""
    values = []
    for variable, value in zip(variables, previous, strict=True):
        current = scope.get_current_value(variable)
        values.append(value if current is None else current)
    return values


class BackendSteps:
    """`train_step`, `test_step` and `predict_step` of `QuantileObjectiveModel` on JAX.

    As in Keras's guide "Customizing what happens in fit() with JAX": each step takes the
    state (the trainable, non-trainable, optimizer and metric variables' values) and returns
    the new state; the loss is differentiated with `jax.value_and_grad` and the optimizer
    applied with `stateless_apply`. The model's forward pass reads and assigns its variables
    as usual (the epsilon weight, the perturbed estimator's seed state): it runs inside a
    `keras.StatelessScope` that maps them to the state's values, as `stateless_call` does.
    """

    def _stateless(self, function, trainable, non_trainable, extra=()):
        """`function()` with the model's variables mapped to `trainable` and `non_trainable`
        (and `extra`, pairs of variable and value); returns its result and the new
        non-trainable values."""
        mapping = [
            *zip(self.trainable_variables, trainable, strict=True),
            *zip(self.non_trainable_variables, non_trainable, strict=True),
            *extra,
        ]
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            result = function()
        return result, _current_values(scope, self.non_trainable_variables, non_trainable)

    def _stateless_metrics(self, trainable, non_trainable, metrics_variables, loss, forward):
        """`_update_metrics` on the state's metric variables: the logs and their new values."""
        mapping = [
            *zip(self.trainable_variables, trainable, strict=True),
            *zip(self.non_trainable_variables, non_trainable, strict=True),
            *zip(self.metrics_variables, metrics_variables, strict=True),
        ]
        with keras.StatelessScope(state_mapping=mapping) as scope:
            logs = self._update_metrics(loss, forward)
        return logs, _current_values(scope, self.metrics_variables, metrics_variables)

    def train_step(self, state, data):
        """One optimizer step on a batch `(A, B)`: the running metrics and the new state."""
        trainable, non_trainable, optimizer_variables, metrics_variables = state
        values, features = self._unpack(data)
        self._check_length(values)
        # The values of A and B were checked before this (possibly jitted) step, in the
        # wrapper of `_make_function`.

        def compute_loss(trainable):
            (loss, forward), new_non_trainable = self._stateless(
                lambda: self._forward(values, features, training=True), trainable, non_trainable
            )
            # Loss scaling (a `LossScaleOptimizer`) reads the optimizer's scale variable.
            mapping = list(zip(self.optimizer.variables, optimizer_variables, strict=True))
            with keras.StatelessScope(state_mapping=mapping):
                scaled = self.optimizer.scale_loss(loss)
            return scaled, (loss, forward, new_non_trainable)

        (_, (loss, forward, non_trainable)), gradients = jax.value_and_grad(
            compute_loss, has_aux=True
        )(trainable)
        trainable, optimizer_variables = self.optimizer.stateless_apply(
            optimizer_variables, gradients, trainable
        )
        logs, metrics_variables = self._stateless_metrics(
            trainable, non_trainable, metrics_variables, loss, forward
        )
        return logs, (trainable, non_trainable, optimizer_variables, metrics_variables)

    def test_step(self, state, data):
        """The metrics of a batch `(A, B)`, without an update, and the new state."""
        trainable, non_trainable, metrics_variables = state
        values, features = self._unpack(data)
        self._check_length(values)
        (loss, forward), non_trainable = self._stateless(
            lambda: self._forward(values, features, training=False), trainable, non_trainable
        )
        logs, metrics_variables = self._stateless_metrics(
            trainable, non_trainable, metrics_variables, loss, forward
        )
        return logs, (trainable, non_trainable, metrics_variables)

    def predict_step(self, state, data):
        """`{"scores", "lower_mask", "upper_mask"}` of a batch, and the non-trainable values."""
        trainable, non_trainable = state
        return self._stateless(lambda: self._predict_outputs(data), trainable, non_trainable)

    # ----------------------------------------------------------------- data checks

    def _make_function(self, step_function, concatenate_outputs=False):
        """Keras's JAX trainer builds each train/test/predict function from the (possibly
        jitted) one-batch step with this method: the batch is checked here, outside `jax.jit`,
        where a broken rule can raise (a `ValueError`) before the step runs."""
        objective = not self._predict_wrapping

        def checked_step(state, data):
            try:
                self._check_batch(data, objective)
                return step_function(state, data)
            except Exception:
                self._restore_state(state)
                raise

        return super()._make_function(checked_step, concatenate_outputs=concatenate_outputs)

    def _restore_state(self, state) -> None:
        """Puts the state back in the variables after a step failed (bad data, an error when
        the step is traced): Keras's JAX trainer has emptied them for the loop, and only
        puts the values back from a step's output, so the model would be left unusable."""
        groups = [self.trainable_variables, self.non_trainable_variables]
        if len(state) == 4:  # train: optimizer and metric variables too
            groups += [self.optimizer.variables, self.metrics_variables]
        elif len(state) == 3:  # test: metric variables
            groups.append(self.metrics_variables)
        for variables, values in zip(groups, state, strict=False):
            for variable, value in zip(variables, values, strict=False):
                deleted = getattr(value, "is_deleted", None)
                if variable._value is None and not (deleted is not None and deleted()):
                    variable.assign(value)

    def _traced_data_checks(self, values, features, objective: bool) -> list:
        """Inside `jax.jit` nothing can raise: the checks run outside it (`_make_function`)."""
        del values, features, objective
        return []

    def _sync_backend_state(self) -> None:
        """During `fit`, Keras's JAX trainer keeps the current values in its state, not in the
        variables (which it empties): put them back before reading or assigning a variable
        from a callback, so that the trainer then reads the assigned value."""
        if not in_stateless_scope() and getattr(self, "_jax_state", None):
            self.jax_state_sync()
