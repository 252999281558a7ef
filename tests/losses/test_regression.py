"""`TrimmedRegressionLoss` and `QuantileRegressionLoss` under the active Keras backend.

Values against numpy at small epsilon, gradients against finite differences, training with
`fit`, `.keras` round trips, argument errors, and the robustness to corrupted targets.
"""

import doctest

import keras
import numpy as np
import pytest
from harness import backend, float64_available, grad, needs_float64, tensor, to_numpy

import keras_softquantile.losses
import keras_softquantile.metrics
from keras_softquantile.losses import QuantileRegressionLoss, TrimmedRegressionLoss, regression

WIDEST = "float64" if float64_available() else "float32"
# Small-epsilon agreement with the hard statistic: float64 resolves epsilon 1e-6.
SHARP = {"float64": (1e-6, 1e-7), "float32": (1e-4, 1e-4)}  # (epsilon, rtol)
# Under XLA each training step through the transport's backward pass takes about 0.6 s on
# 2 CPU cores (TensorFlow's default `jit_compile="auto"` means XLA): train in a graph there.
COMPILE = {"jit_compile": False} if backend() == "tensorflow" else {}


def distinct_errors(rng, batch):
    """Targets and predictions `[batch, 1]` whose squared errors are distinct and spread."""
    errors = np.sqrt(np.arange(1, batch + 1) + rng.uniform(-0.3, 0.3, batch))
    y_pred = rng.normal(size=(batch, 1))
    y_true = y_pred - rng.permutation(errors)[:, None]
    return y_true, y_pred


def value(loss, y_true, y_pred, dtype=WIDEST) -> float:
    """The loss, as the mean of `call` (Keras 3.15's reduction returns float32 on PyTorch)."""
    return float(np.mean(to_numpy(loss.call(tensor(y_true, dtype), tensor(y_pred, dtype)))))


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("trim", "batch"), [(0.1, 20), (0.25, 12), (0.5, 8)])
def test_trimmed_loss_is_the_mean_of_the_smallest_losses(rng, trim, batch):
    y_true, y_pred = distinct_errors(rng, batch)
    losses = ((y_true - y_pred) ** 2)[:, 0]
    kept = round((1 - trim) * batch)
    expected = np.sort(losses)[:kept].mean()
    epsilon, rtol = SHARP[WIDEST]
    loss = TrimmedRegressionLoss(trim, epsilon=epsilon, dtype=WIDEST)
    assert value(loss, y_true, y_pred) == pytest.approx(expected, rel=rtol)
    # `call` gives per-example contributions: zero for the trimmed ones, mean = the loss.
    parts = to_numpy(loss.call(tensor(y_true, WIDEST), tensor(y_pred, WIDEST)))
    assert parts.shape == (batch,)
    np.testing.assert_allclose(parts[losses > np.sort(losses)[kept - 1]], 0, atol=1e-6)
    assert parts.mean() == pytest.approx(expected, rel=rtol)


def test_trim_zero_is_mean_squared_error_exactly(rng):
    y_true, y_pred = rng.normal(size=(2, 16, 3)).astype("float32")
    mse = keras.losses.MeanSquaredError()(tensor(y_true), tensor(y_pred))
    trimmed = TrimmedRegressionLoss(trim=0.0)(tensor(y_true), tensor(y_pred))
    np.testing.assert_array_equal(to_numpy(trimmed), to_numpy(mse))


def test_one_example_gives_its_own_loss():
    for loss in (TrimmedRegressionLoss(0.3), QuantileRegressionLoss(0.5)):
        assert value(loss, [[1.0]], [[3.5]]) == pytest.approx(6.25, rel=1e-6)


@pytest.mark.parametrize("q", [0.1, 0.25, 0.5, 0.9, 1.0])
def test_quantile_loss_is_numpy_quantile_of_the_losses(rng, q):
    y_true, y_pred = distinct_errors(rng, 9)
    losses = ((y_true - y_pred) ** 2)[:, 0]
    epsilon, rtol = SHARP[WIDEST]
    loss = QuantileRegressionLoss(q, epsilon=epsilon, dtype=WIDEST)
    assert value(loss, y_true, y_pred) == pytest.approx(np.quantile(losses, q), rel=rtol)


@pytest.mark.parametrize(
    ("wrapped", "per_example"),
    [
        ("mae", lambda e: np.abs(e).mean(-1)),
        (
            keras.losses.Huber(delta=1.0),
            lambda e: np.where(abs(e) < 1, e**2 / 2, abs(e) - 0.5)[:, 0],
        ),
        (keras.losses.LogCosh(), lambda e: np.log(np.cosh(e))[:, 0]),
    ],
    ids=["name", "instance", "instance-logcosh"],
)
def test_wrapped_losses(rng, wrapped, per_example):
    y_true, y_pred = distinct_errors(rng, 10)
    losses = per_example(y_pred - y_true)
    epsilon, rtol = SHARP[WIDEST]
    trimmed = TrimmedRegressionLoss(0.2, loss=wrapped, epsilon=epsilon, dtype=WIDEST)
    assert value(trimmed, y_true, y_pred) == pytest.approx(np.sort(losses)[:8].mean(), rel=rtol)
    restored = TrimmedRegressionLoss.from_config(trimmed.get_config())
    assert value(restored, y_true, y_pred) == value(trimmed, y_true, y_pred)
    assert restored.get_config() == trimmed.get_config()


def test_callable_loss_and_scalar_targets(rng):
    y_true, y_pred = rng.normal(size=(2, 8))  # [batch] targets: one value per example
    loss = TrimmedRegressionLoss(0.0, loss=lambda t, p: keras.ops.abs(t - p)[:, 0])
    assert value(loss, y_true, y_pred) == pytest.approx(np.abs(y_true - y_pred).mean(), rel=1e-6)
    # [batch] targets against [batch, 1] predictions, as a Dense(1) model gives them.
    mse = TrimmedRegressionLoss(0.0)
    assert value(mse, y_true, y_pred[:, None]) == pytest.approx(((y_true - y_pred) ** 2).mean())


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


def squared_error(y_true, y_pred):
    # Not Keras's MSE here: its `ops.mean` rounds float64 to float32 on PyTorch (Keras 3.15).
    return keras.ops.sum((y_true - y_pred) ** 2, axis=-1)


@needs_float64
@pytest.mark.parametrize("make_loss", [TrimmedRegressionLoss, QuantileRegressionLoss])
def test_gradient_matches_finite_differences(rng, make_loss):
    loss = make_loss(0.25, loss=squared_error, epsilon=0.05, dtype="float64")
    y_true, y_pred = distinct_errors(rng, 8)
    target = tensor(y_true, "float64")
    g = grad(lambda p: keras.ops.sum(loss.call(target, p)) / len(y_pred), y_pred)
    h = 1e-6
    numeric = np.zeros_like(y_pred)
    for i in range(len(y_pred)):
        step = np.zeros_like(y_pred)
        step[i] = h
        numeric[i] = (value(loss, y_true, y_pred + step) - value(loss, y_true, y_pred - step)) / (
            2 * h
        )
    np.testing.assert_allclose(g, numeric, rtol=1e-5, atol=1e-7)
    assert np.count_nonzero(np.abs(g) > 1e-3) >= 2  # smooth: more than one example gets gradient


# --------------------------------------------------------------------------------------------
# Training and saving
# --------------------------------------------------------------------------------------------


def line_data(rng, n=200, corrupted=0.0):
    """x `[n, 1]`, y = 2 x + noise, with a fraction of targets replaced by -3 x + 5."""
    x = rng.normal(size=(n, 1)).astype("float32")
    y = (2.0 * x + 0.1 * rng.normal(size=(n, 1))).astype("float32")
    bad = rng.choice(n, int(corrupted * n), replace=False)
    y[bad] = -3.0 * x[bad] + 5.0
    return x, y


def linear_model(batch_size=None):
    return keras.Sequential([keras.Input((1,), batch_size=batch_size), keras.layers.Dense(1)])


@pytest.mark.slow
@pytest.mark.parametrize(
    "make_loss",
    [lambda: TrimmedRegressionLoss(0.2, loss="mae"), lambda: QuantileRegressionLoss(0.5)],
    ids=["trimmed", "quantile"],
)
def test_fit_decreases_the_loss_and_the_model_round_trips(rng, tmp_path, make_loss):
    x, y = line_data(rng, n=100)
    # The quantile needs a static batch size under TensorFlow (see its docstring).
    model = linear_model(batch_size=25)
    model.compile(keras.optimizers.Adam(0.1), loss=make_loss(), **COMPILE)
    history = model.fit(x, y, batch_size=25, epochs=4, verbose=0, shuffle=False)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.loss) is type(model.loss)
    assert loaded.loss.get_config() == model.loss.get_config()
    y_pred = tensor(x[:25])
    np.testing.assert_allclose(
        to_numpy(loaded.loss(tensor(y[:25]), loaded(y_pred))),
        to_numpy(model.loss(tensor(y[:25]), model(y_pred))),
        rtol=1e-6,
    )


@pytest.mark.slow
def test_trimmed_loss_ignores_corrupted_targets(rng):
    x, y = line_data(rng, corrupted=0.1)
    slopes = {}
    for name, loss in [("mse", "mse"), ("trimmed", TrimmedRegressionLoss(0.2))]:
        keras.utils.set_random_seed(0)
        model = linear_model()
        model.compile(keras.optimizers.Adam(0.1), loss=loss, **COMPILE)
        model.fit(x, y, batch_size=50, epochs=30, verbose=0)
        slopes[name] = float(model.layers[0].get_weights()[0][0, 0])
    # Measured (TensorFlow): MSE 1.497, trimmed 1.990 against the clean slope 2.
    assert abs(slopes["trimmed"] - 2.0) < 0.05
    assert abs(slopes["mse"] - 2.0) > 10 * abs(slopes["trimmed"] - 2.0)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"trim": -0.1}, ValueError, r"`trim` must lie in \[0, 1\). Received: trim=-0.1"),
        ({"trim": 1.0}, ValueError, "Received: trim=1.0"),
        ({"trim": "0.1"}, TypeError, "Received: trim='0.1'"),
        ({"trim": True}, TypeError, "Received: trim=True"),
        ({"epsilon": 0.0}, ValueError, "Received: epsilon=0.0"),
        ({"epsilon": "small"}, TypeError, "Received: epsilon='small'"),
        ({"loss": 3}, TypeError, "Received: loss=3"),
        ({"loss": "no_such_loss"}, ValueError, "no_such_loss"),
    ],
)
def test_trimmed_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        TrimmedRegressionLoss(**kwargs)


@pytest.mark.parametrize(
    ("q", "error"),
    [
        (0.0, ValueError),
        (1.5, ValueError),
        (-0.5, ValueError),
        ("0.5", TypeError),
        (None, TypeError),
    ],
)
def test_quantile_argument_errors(q, error):
    with pytest.raises(error, match=f"Received: q={q!r}"):
        QuantileRegressionLoss(q)


@pytest.mark.parametrize("make_loss", [TrimmedRegressionLoss, QuantileRegressionLoss])
def test_call_errors(make_loss):
    loss = make_loss()
    y = np.zeros((4, 1), "float32")
    with pytest.raises(
        TypeError, match=r"`y_pred` must be a floating-point tensor\. Received: y_pred\.dtype=int"
    ):
        loss(y, np.zeros((4, 1), "int32"))
    with pytest.raises(ValueError, match=r"Received: y_true.shape=\(4, 1\), y_pred.shape=\(4, 2\)"):
        loss(y, np.zeros((4, 2), "float32"))
    with pytest.raises(
        ValueError, match=r"sample weights.*Received: sample_weight of shape \(4,\)"
    ):
        loss(y, y, sample_weight=np.ones(4, "float32"))
    reduced = make_loss(loss=keras.losses.mean_squared_error)  # [batch, 1] -> [batch]: fine
    assert np.isfinite(value(reduced, y, y + 1))
    scalar = make_loss(loss=lambda t, p: keras.ops.mean((t - p) ** 2))
    with pytest.raises(ValueError, match="one value per example"):
        scalar(y, y)


@pytest.mark.skipif(backend() != "tensorflow", reason="only TensorFlow traces an unknown batch")
def test_quantile_loss_needs_a_static_batch_size():
    import tensorflow as tf

    loss = QuantileRegressionLoss()
    spec = tf.TensorSpec((None, 1), "float32")
    traced = tf.function(lambda t, p: loss(t, p), input_signature=[spec, spec])
    with pytest.raises(ValueError, match="drop_remainder=True"):
        traced.get_concrete_function()


def test_docstring_examples():
    globs = {"np": np, "keras": keras, "keras_softquantile": keras_softquantile}
    for module in [regression]:
        result = doctest.testmod(module, extraglobs=globs, optionflags=doctest.ELLIPSIS)
        assert result.attempted >= 3 and result.failed == 0, (module.__name__, result)
