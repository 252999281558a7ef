"""The training steps of `QuantileObjectiveModel`, once per Keras backend, chosen at import.

`QuantileObjectiveModel` computes its loss and metrics once, on `keras.ops` (`_forward`,
`_update_metrics`, `_predict_outputs`); `BackendSteps` is the mixin that differentiates the
loss and applies the optimizer the way the active backend does it, following Keras's guides
"Customizing what happens in fit()":

* TensorFlow (`tensorflow.py`): a `tf.GradientTape`; the data checks run in Keras's
  per-batch wrapper, outside the XLA function.
* JAX (`jax.py`): `train_step(state, data)`, stateless, with `jax.value_and_grad`.
* PyTorch (`torch.py`): `loss.backward()` and the optimizer's `apply`.

Each also runs the model's data checks on every batch before the (possibly compiled) step,
and says how the checks are made inside a traced function (`_traced_data_checks`).
"""

from __future__ import annotations

from keras_softquantile.ops import _backend

if _backend.NAME == "tensorflow":
    from keras_softquantile.models._steps.tensorflow import BackendSteps
elif _backend.NAME == "jax":
    from keras_softquantile.models._steps.jax import BackendSteps
else:  # "torch" (`_backend` refuses every other backend)
    from keras_softquantile.models._steps.torch import BackendSteps

__all__ = ["BackendSteps"]
