"""The PyTorch steps of `QuantileObjectiveModel`: `loss.backward()` and the optimizer's
`apply`."""

from __future__ import annotations

import functools

import torch

__all__ = ["BackendSteps"]


class BackendSteps:
    """`train_step`, `test_step` and `predict_step` of `QuantileObjectiveModel` on PyTorch.

    As in Keras's guide "Customizing what happens in fit() with PyTorch": `zero_grad()`, the
    forward pass, `loss.backward()`, then `optimizer.apply` on the gradients under
    `torch.no_grad()`.
    """

    def train_step(self, data):
        """One optimizer step on a batch `(A, B)`; returns the running metrics."""
        values, features = self._unpack(data)
        self._check_length(values)
        # The values of A and B were checked before this step (`_with_data_checks`).
        self.zero_grad()
        loss, forward = self._forward(values, features, training=True)
        variables = self.trainable_weights[:]
        if variables:
            self.optimizer.scale_loss(loss).backward()
            gradients = [variable.value.grad for variable in variables]
            with torch.no_grad():
                self.optimizer.apply(gradients, variables)
        with torch.no_grad():
            return self._update_metrics(loss.detach(), forward)

    def test_step(self, data):
        """The metrics of a batch `(A, B)`, without an update."""
        values, features = self._unpack(data)
        self._check_length(values)
        loss, forward = self._forward(values, features, training=False)
        return self._update_metrics(loss, forward)

    def predict_step(self, data):
        """`{"scores", "lower_mask", "upper_mask"}` of a batch `(A, B)` or of features `B`."""
        return self._predict_outputs(data)

    # ----------------------------------------------------------------- data checks

    def _with_data_checks(self, function, objective: bool):
        """Keras's one-batch function (`data` is `[batch]`), checking the batch first, outside
        `torch.compile`, so that a broken rule raises (a `ValueError`) before the step runs."""

        @functools.wraps(function)
        def checked(data):
            self._check_batch(data[0], objective)
            return function(data)

        return checked

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        super().make_train_function(force=force)
        self.train_function = self._with_data_checks(self.train_function, objective=True)
        return self.train_function

    def make_test_function(self, force=False):
        if self.test_function is not None and not force:
            return self.test_function
        super().make_test_function(force=force)
        self.test_function = self._with_data_checks(self.test_function, objective=True)
        return self.test_function

    def make_predict_function(self, force=False):
        if self.predict_function is not None and not force:
            return self.predict_function
        super().make_predict_function(force=force)
        self.predict_function = self._with_data_checks(self.predict_function, objective=False)
        return self.predict_function

    def __getattr__(self, name: str):
        # A property that raises AttributeError (`theta` without the linear scorer) falls back
        # to `torch.nn.Module.__getattr__`, whose "has no attribute" would replace its message.
        attribute = getattr(type(self), name, None)
        if isinstance(attribute, property):
            return attribute.fget(self)
        return super().__getattr__(name)

    def _traced_data_checks(self, values, features, objective: bool) -> list:
        """Inside `torch.compile` nothing can raise: the checks run outside it."""
        del values, features, objective
        return []

    def _sync_backend_state(self) -> None:
        """Nothing to do: PyTorch's variables always hold the current values."""
        return  # (a body beyond the docstring, which AutoGraph needs)
