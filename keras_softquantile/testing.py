"""Test helpers for the layers of this package: one call runs the standard layer checks.

`run_layer_test` builds a layer, calls it symbolically and eagerly, round-trips its config,
trains one `fit` step through it, saves and reloads it as a `.keras` file and runs it under
the mixed-precision policies, asserting at each step (with plain `AssertionError`s, so it
works under any test runner). It relies only on public Keras APIs, and runs under every Keras
backend (TensorFlow, JAX, PyTorch): only the input gradients (`_input_gradients`) are taken
with the backend's own autodiff.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

__all__ = ["LayerTestResult", "run_layer_test"]

_MIXED_POLICIES = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}


class LayerTestResult(dict):
    """The outputs gathered by `run_layer_test`, for further assertions.

    Keys: "layer" (the eagerly called layer), "output" (its eager output, as numpy),
    "config", "model" (the trained functional model) and "mixed" (policy name -> numpy output).
    """


def _as_list(data) -> list:
    return list(data) if isinstance(data, list | tuple) else [data]


def _numpy(tensor) -> np.ndarray:
    """A tensor as numpy, half precision included (PyTorch's bfloat16 has no numpy twin)."""
    if keras.backend.standardize_dtype(tensor.dtype) == "bfloat16":
        tensor = keras.ops.cast(tensor, "float32")
    return np.asarray(keras.ops.convert_to_numpy(tensor))


def _to_numpy(structure):
    return keras.tree.map_structure(_numpy, structure)


def _flat(structure) -> list:
    return keras.tree.flatten(structure)


def _is_float(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating)


def _input_gradients(function, arrays: list[np.ndarray]) -> list[np.ndarray | None]:
    """Gradients of the scalar `function(*tensors)` with respect to the floating-point inputs.

    The only backend-specific code of this module: each backend's own autodiff. Non-float
    inputs (and inputs the value does not depend on) get None.

    Args:
        function: maps one backend tensor per array to a scalar tensor.
        arrays: the inputs, as numpy arrays.

    Returns:
        One numpy gradient (or None) per array.
    """
    backend = keras.backend.backend()
    differentiable = [i for i, a in enumerate(arrays) if _is_float(a)]
    if not differentiable:
        return [None] * len(arrays)
    if backend == "tensorflow":
        import tensorflow as tf

        tensors = [tf.constant(a) for a in arrays]
        with tf.GradientTape() as tape:
            tape.watch([tensors[i] for i in differentiable])
            value = function(*tensors)
        found = tape.gradient(value, [tensors[i] for i in differentiable])
    elif backend == "jax":
        import jax

        tensors = [keras.ops.convert_to_tensor(a) for a in arrays]

        def of_floats(*floats):
            inputs = list(tensors)
            for i, t in zip(differentiable, floats, strict=True):
                inputs[i] = t
            return function(*inputs)

        found = jax.grad(of_floats, argnums=tuple(range(len(differentiable))))(
            *[tensors[i] for i in differentiable]
        )
    elif backend == "torch":
        import torch

        tensors = [keras.ops.convert_to_tensor(a) for a in arrays]
        for i in differentiable:
            tensors[i] = tensors[i].detach().requires_grad_(True)
        value = function(*tensors)
        found = torch.autograd.grad(value, [tensors[i] for i in differentiable], allow_unused=True)
    else:
        raise NotImplementedError(f"No gradient code for the Keras backend {backend!r}.")
    grads: list[np.ndarray | None] = [None] * len(arrays)
    for i, g in zip(differentiable, found, strict=True):
        grads[i] = None if g is None else _numpy(g)
    return grads


def _assert_shapes(actual, expected, what: str) -> None:
    actual_flat = [tuple(a) for a in _shape_list(actual)]
    expected_flat = [tuple(e) for e in _shape_list(expected)]
    if actual_flat != expected_flat:
        raise AssertionError(f"{what}: shapes {actual_flat} != expected {expected_flat}")


def _shape_list(shapes) -> list:
    """A shape or a (nested) tuple/list of shapes, flattened to a list of shapes."""
    if isinstance(shapes, list | tuple) and (
        not shapes or all(isinstance(d, int | type(None)) for d in shapes)
    ):
        return [shapes]
    out = []
    for s in shapes:
        out.extend(_shape_list(s))
    return out


def _assert_close(actual, expected, what: str, rtol: float, atol: float) -> None:
    actual_flat, expected_flat = _flat(actual), _flat(expected)
    if len(actual_flat) != len(expected_flat):
        raise AssertionError(f"{what}: {len(actual_flat)} outputs != {len(expected_flat)}")
    for a, e in zip(actual_flat, expected_flat, strict=True):
        np.testing.assert_allclose(
            np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=atol, err_msg=what
        )


def _assert_finite(structure, what: str) -> None:
    for t in _flat(structure):
        if not np.all(np.isfinite(np.asarray(t, np.float64))):
            raise AssertionError(f"{what}: non-finite values in {np.asarray(t)}")


def _call(layer, data, **kwargs):
    return layer(list(data) if isinstance(data, list | tuple) else data, **kwargs)


def _functional_model(layer_cls, init_kwargs, arrays, multi: bool, dtype=None) -> keras.Model:
    """Inputs -> identity-initialised Dense (a trainable, shape-preserving stage) -> layer."""
    inputs = [keras.Input(a.shape[1:], dtype=str(a.dtype)) for a in arrays]
    mixed = [
        keras.layers.Dense(
            a.shape[-1], kernel_initializer="identity", bias_initializer="zeros", dtype=dtype
        )(x)
        for a, x in zip(arrays, inputs, strict=True)
    ]
    kwargs = dict(init_kwargs)
    if dtype is not None:
        kwargs["dtype"] = dtype
    outputs = layer_cls(**kwargs)(mixed if multi else mixed[0])
    outputs = list(outputs) if isinstance(outputs, tuple) else outputs
    return keras.Model(inputs if multi else inputs[0], outputs)


def run_layer_test(
    layer_cls: type[keras.layers.Layer],
    init_kwargs: dict[str, Any],
    input_data: np.ndarray | Sequence[np.ndarray],
    expected_output_shape: tuple | Sequence[tuple],
    *,
    expected_output: Any = None,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    run_fit: bool = True,
    run_saving: bool = True,
    mixed_precision_policies: Sequence[str] = ("mixed_float16", "mixed_bfloat16"),
    mixed_precision_atol: float = 5e-2,
    temp_dir: str | None = None,
) -> LayerTestResult:
    """Runs the standard checks on one layer configuration and returns what it computed.

    Args:
        layer_cls: the layer class.
        init_kwargs: constructor arguments.
        input_data: a numpy array, or a list of arrays for multi-input layers (batch first).
        expected_output_shape: the output shape for `input_data`, or a tuple of shapes for a
            layer with several outputs.
        expected_output: optional reference output (same structure) to compare with.
        rtol, atol: tolerances for `expected_output`.
        run_fit: train one `fit` step through the layer (behind an identity-initialised
            Dense per input) and check that gradients reached the Dense kernels.
        run_saving: save the trained model to a `.keras` file, reload it (safe mode, no
            custom objects) and compare outputs.
        mixed_precision_policies: policies under which the layer must return its compute
            dtype, finite values close to the float32 output (within `mixed_precision_atol`
            times the output's scale).
        temp_dir: directory for the `.keras` file (a temporary one by default).

    Returns:
        A `LayerTestResult`.
    """
    multi = isinstance(input_data, list | tuple)
    arrays = [np.asarray(a) for a in _as_list(input_data)]
    data = arrays if multi else arrays[0]
    shapes = [a.shape for a in arrays]
    result = LayerTestResult()

    # 1. Construction and build: only the epsilon weight, with the constructor's value.
    layer = layer_cls(**init_kwargs)
    if layer.built or layer.weights:
        raise AssertionError("a layer must not create weights before `build`")
    layer.build([tuple(s) for s in shapes] if multi else tuple(shapes[0]))
    if not layer.built:
        raise AssertionError("`build` did not mark the layer built")
    trainable_eps = init_kwargs.get("trainable_epsilon", False)
    if len(layer.weights) != 1 or len(layer.trainable_weights) != int(trainable_eps):
        raise AssertionError(f"unexpected weights after build: {layer.weights}")
    np.testing.assert_allclose(float(_numpy(layer.get_epsilon())), layer.epsilon, rtol=1e-6)

    # 2. Symbolic call (batch dimension unknown).
    symbolic_layer = layer_cls(**init_kwargs)
    symbolic_inputs = [
        keras.Input(s[1:], dtype=str(a.dtype)) for s, a in zip(shapes, arrays, strict=True)
    ]
    symbolic = symbolic_layer(symbolic_inputs if multi else symbolic_inputs[0])
    expected_symbolic = [(None, *tuple(s)[1:]) for s in _shape_list(expected_output_shape)]
    _assert_shapes([t.shape for t in _flat(symbolic)], expected_symbolic, "symbolic call")
    for t in _flat(symbolic):
        if keras.backend.standardize_dtype(t.dtype) != layer.compute_dtype:
            raise AssertionError(f"symbolic output dtype {t.dtype} != {layer.compute_dtype}")

    # 3. Eager call.
    output = _to_numpy(_call(layer, data))
    _assert_shapes([o.shape for o in _flat(output)], expected_output_shape, "eager call")
    _assert_finite(output, "eager call")
    if expected_output is not None:
        _assert_close(output, _to_numpy(expected_output), "eager call vs expected", rtol, atol)
    symbolic_model = keras.Model(
        symbolic_inputs if multi else symbolic_inputs[0],
        list(symbolic) if isinstance(symbolic, tuple) else symbolic,
    )
    _assert_close(_to_numpy(symbolic_model(data)), output, "functional vs eager", 1e-6, 1e-6)
    result["layer"], result["output"] = layer, output

    # Gradients reach the float inputs and are finite.
    def weighted_sum(*tensors):
        y = _flat(_call(layer, list(tensors) if multi else tensors[0]))
        terms = [
            keras.ops.sum(
                t
                * keras.ops.reshape(
                    keras.ops.convert_to_tensor(
                        np.linspace(-1, 1, o.size).astype(keras.backend.standardize_dtype(t.dtype))
                    ),
                    o.shape,
                )
            )
            for t, o in zip(y, _flat(output), strict=True)
        ]
        return sum(terms[1:], terms[0])

    grads = [g for g in _input_gradients(weighted_sum, arrays) if g is not None]
    if not grads or not any(np.any(g != 0) for g in grads):
        raise AssertionError("no gradient reaches the inputs")
    for g in grads:
        _assert_finite(g, "input gradient")

    # 4. Config round trip: every constructor argument listed, same outputs.
    config = layer.get_config()
    parameters = [
        name
        for name, p in inspect.signature(layer_cls.__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    missing = [name for name in parameters if name not in config]
    if missing:
        raise AssertionError(f"`get_config` misses constructor arguments {missing}")
    for name, value in init_kwargs.items():
        stored = config[name]
        if isinstance(value, tuple):
            value = list(value)
        if stored != value:
            raise AssertionError(f"config[{name!r}] = {stored!r} != constructor {value!r}")
    clone = layer_cls.from_config(config)
    _assert_close(_to_numpy(_call(clone, data)), output, "from_config", 1e-6, 1e-6)
    result["config"] = config

    # 5. One fit step through the layer.
    model = None
    if run_fit:
        model = _functional_model(layer_cls, init_kwargs, arrays, multi)
        _assert_close(_to_numpy(model(data)), output, "identity-Dense model", 1e-5, 1e-5)
        rng = np.random.default_rng(0)
        targets = [rng.uniform(size=o.shape).astype("float32") for o in _flat(output)]
        model.compile(
            optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=False, run_eagerly=False
        )
        kernels = [_numpy(w).copy() for w in model.trainable_weights if "kernel" in w.path]
        history = model.fit(
            data,
            targets if len(targets) > 1 else targets[0],
            batch_size=len(arrays[0]),
            epochs=1,
            verbose=0,
        )
        if not np.isfinite(history.history["loss"][-1]):
            raise AssertionError(f"fit gave a non-finite loss: {history.history}")
        after = [_numpy(w) for w in model.trainable_weights if "kernel" in w.path]
        if all(np.array_equal(a, b) for a, b in zip(kernels, after, strict=True)):
            raise AssertionError("fit did not change any Dense kernel: no gradient flowed")
        result["model"] = model

    # 6. .keras round trip, with a non-default epsilon to check the weight is saved.
    if run_saving:
        if model is None:
            model = _functional_model(layer_cls, init_kwargs, arrays, multi)
        soft_layer = next(lay for lay in model.layers if isinstance(lay, layer_cls))
        soft_layer.set_epsilon(layer.epsilon * 2)
        before = _to_numpy(model(data))
        with tempfile.TemporaryDirectory(dir=temp_dir) as directory:
            path = os.path.join(directory, "model.keras")
            model.save(path)
            loaded = keras.models.load_model(path)
        _assert_close(_to_numpy(loaded(data)), before, ".keras round trip", 0.0, 0.0)
        loaded_layer = next(lay for lay in loaded.layers if isinstance(lay, layer_cls))
        np.testing.assert_allclose(
            float(_numpy(loaded_layer.get_epsilon())), layer.epsilon * 2, 1e-6
        )
        if loaded_layer.get_config() != soft_layer.get_config():
            raise AssertionError("the reloaded layer's config differs")

    # 7. Mixed precision: compute dtype out, finite, close to float32.
    result["mixed"] = {}
    for policy in mixed_precision_policies:
        mixed_layer = layer_cls(**init_kwargs, dtype=policy)
        y = _call(mixed_layer, data)  # eagerly, so the layer is built outside any gradient
        for t in _flat(y):
            dtype = keras.backend.standardize_dtype(t.dtype)
            if dtype != _MIXED_POLICIES[policy]:
                raise AssertionError(f"{policy}: output dtype {dtype}")
        y = keras.tree.map_structure(lambda t: _numpy(t).astype(np.float32), y)
        _assert_finite(y, policy)

        def total(*tensors, mixed_layer=mixed_layer):
            outputs = _flat(_call(mixed_layer, list(tensors) if multi else tensors[0]))
            terms = [keras.ops.sum(keras.ops.cast(t, "float32")) for t in outputs]
            return sum(terms[1:], terms[0])

        for g in _input_gradients(total, arrays):
            if g is not None:
                _assert_finite(g, f"{policy} gradient")
        for a, e in zip(_flat(y), _flat(output), strict=True):
            scale = max(1.0, float(np.max(np.abs(e))) if e.size else 1.0)
            np.testing.assert_allclose(
                a, e, rtol=0, atol=mixed_precision_atol * scale, err_msg=policy
            )
        result["mixed"][policy] = y
    return result
