"""`TopKCrossEntropy` under the active Keras backend: the hard limit, label forms, the k
distribution, gradients, training (scikit-learn's digits), saving and argument errors."""

import doctest

import keras
import numpy as np
import pytest
from harness import backend, float64_available, grad, needs_float64, tensor, to_numpy

import keras_softquantile.losses
import keras_softquantile.metrics
from keras_softquantile.losses import TopKCrossEntropy, classification
from keras_softquantile.losses.classification import MEMBERSHIP_FLOOR

WIDEST = "float64" if float64_available() else "float32"
# See tests/losses/test_regression.py: no XLA for training under TensorFlow.
COMPILE = {"jit_compile": False} if backend() == "tensorflow" else {}
CLASSES = 8


def separated_logits(rng, batch=6):
    """Logits `[batch, CLASSES]` whose entries are a permutation of 0..7 plus small jitter."""
    ranks = np.argsort(rng.random((batch, CLASSES)), axis=-1).astype(np.float64)
    return ranks + rng.uniform(-0.2, 0.2, ranks.shape)


def hard_in_topk(logits, labels, k):
    top = np.argsort(-logits, axis=-1)[:, :k]
    return np.any(top == labels[:, None], axis=-1)


def losses(loss, labels, logits, dtype=WIDEST):
    return to_numpy(loss.call(tensor(labels), tensor(logits, dtype)))


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 5])
def test_small_epsilon_gives_minus_log_of_the_hard_membership(rng, k):
    logits = separated_logits(rng, 16)
    labels = rng.integers(0, CLASSES, 16)
    inside = hard_in_topk(logits, labels, k)
    assert inside.any() and not inside.all()
    values = losses(TopKCrossEntropy(k, epsilon=1e-4, dtype=WIDEST), labels, logits)
    # -log of the hard membership: 0 inside the top k, -log(floor) outside.
    expected = np.where(inside, 0.0, -np.log(MEMBERSHIP_FLOOR))
    np.testing.assert_allclose(values, expected, atol=1e-4)


def test_label_forms_and_probabilities_agree(rng):
    logits = separated_logits(rng)
    labels = rng.integers(0, CLASSES, len(logits))
    loss = TopKCrossEntropy(3, dtype=WIDEST)
    by_id = losses(loss, labels, logits)
    np.testing.assert_allclose(losses(loss, labels[:, None], logits), by_id)
    np.testing.assert_allclose(losses(loss, np.eye(CLASSES)[labels], logits), by_id)
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    from_probabilities = TopKCrossEntropy(3, from_logits=False, dtype=WIDEST)
    # log-probabilities are the logits shifted: the same top-3 memberships.
    np.testing.assert_allclose(losses(from_probabilities, labels, probabilities), by_id, rtol=1e-5)
    assert np.all(by_id > 0) and np.all(np.isfinite(by_id))


def test_k_distribution_averages_the_losses_of_each_k(rng):
    logits = separated_logits(rng)
    labels = rng.integers(0, CLASSES, len(logits))
    mixed = TopKCrossEntropy(5, k_distribution=[0.5, 0, 0, 0, 0.5], dtype=WIDEST)
    top1 = losses(TopKCrossEntropy(1, dtype=WIDEST), labels, logits)
    top5 = losses(TopKCrossEntropy(5, dtype=WIDEST), labels, logits)
    np.testing.assert_allclose(losses(mixed, labels, logits), 0.5 * top1 + 0.5 * top5, rtol=1e-6)


def test_sample_weights_and_reduction(rng):
    logits = separated_logits(rng)
    labels = rng.integers(0, CLASSES, len(logits))
    per_example = losses(TopKCrossEntropy(2), labels, logits, "float32")
    weights = rng.random(len(logits)).astype("float32")
    weighted = TopKCrossEntropy(2)(labels, tensor(logits, "float32"), sample_weight=weights)
    assert float(to_numpy(weighted)) == pytest.approx(np.mean(weights * per_example), rel=1e-5)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


@needs_float64
@pytest.mark.parametrize("k_distribution", [None, [0.25, 0.0, 0.75]])
def test_gradient_matches_finite_differences(rng, k_distribution):
    logits = rng.normal(size=(2, CLASSES))
    labels = tensor(rng.integers(0, CLASSES, 2))
    loss = TopKCrossEntropy(3, epsilon=0.1, k_distribution=k_distribution, dtype="float64")

    def total(x):
        return float(np.sum(to_numpy(loss.call(labels, tensor(x, "float64")))))

    g = grad(lambda x: loss.call(labels, x), logits)
    numeric = np.zeros_like(logits)
    h = 1e-6
    for index in np.ndindex(logits.shape):
        step = np.zeros_like(logits)
        step[index] = h
        numeric[index] = (total(logits + step) - total(logits - step)) / (2 * h)
    np.testing.assert_allclose(g, numeric, rtol=1e-5, atol=1e-7)
    assert np.abs(g).max() > 1e-2


def test_far_below_the_cut_the_gradient_does_not_vanish():
    # The true class is the smallest logit: its membership is tiny, its log's slope is not.
    logits = np.array([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0]], WIDEST)
    loss = TopKCrossEntropy(2, epsilon=0.05, dtype=WIDEST)
    g = grad(lambda x: loss.call(tensor([7]), x), logits)
    assert float(losses(loss, [7], logits)[0]) < -np.log(MEMBERSHIP_FLOOR)
    assert g[0, 7] < -1.0


# --------------------------------------------------------------------------------------------
# Training and saving
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fit_decreases_the_loss_and_the_model_round_trips(rng, tmp_path):
    centres = rng.normal(size=(CLASSES, 4)) * 2
    labels = rng.integers(0, CLASSES, 128)
    x = (centres[labels] + rng.normal(size=(128, 4))).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(CLASSES)])
    loss = TopKCrossEntropy(2, k_distribution=[0.5, 0.5])
    model.compile(keras.optimizers.Adam(0.05), loss=loss, **COMPILE)
    history = model.fit(x, labels, batch_size=32, epochs=4, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.loss, TopKCrossEntropy)
    assert loaded.loss.get_config() == model.loss.get_config()
    assert loaded.loss.k_distribution == (0.5, 0.5)
    np.testing.assert_allclose(
        to_numpy(loaded.loss(labels[:32], loaded(x[:32]))),
        to_numpy(model.loss(labels[:32], model(x[:32]))),
        rtol=1e-6,
    )


def test_config_round_trip():
    loss = TopKCrossEntropy(3, epsilon=0.2, from_logits=False, k_distribution=[0.2, 0.3, 0.5])
    config = loss.get_config()
    assert {"k", "epsilon", "from_logits", "k_distribution", "reduction", "name"} <= set(config)
    assert TopKCrossEntropy.from_config(config).get_config() == config


@pytest.mark.slow
def test_trains_a_digits_classifier_to_high_top5_accuracy():
    datasets = pytest.importorskip(
        "sklearn.datasets", reason="scikit-learn is not installed (it ships the digits data)"
    )
    digits = datasets.load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    x = (digits.data[order] / 16.0).astype("float32")
    y = digits.target[order].astype("int32")
    train, test = slice(0, 1200), slice(1200, None)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    model.compile(keras.optimizers.Adam(0.01), loss=TopKCrossEntropy(5), **COMPILE)
    before = hard_in_topk(to_numpy(model(x[test])), y[test], 5).mean()
    model.fit(x[train], y[train], batch_size=100, epochs=3, verbose=0)
    after = hard_in_topk(to_numpy(model(x[test])), y[test], 5).mean()
    print(f"digits top-5 accuracy: {before:.3f} before, {after:.3f} after training")
    # Measured before/after: TensorFlow 0.456/0.982, JAX 0.539/0.992, PyTorch 0.534/0.990.
    assert after > 0.95 and before < 0.6


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": 0}, ValueError, "`k` must be a positive integer. Received: k=0"),
        ({"k": -2}, ValueError, "Received: k=-2"),
        ({"k": 2.5}, ValueError, "Received: k=2.5"),
        ({"k": True}, ValueError, "Received: k=True"),
        ({"k": "5"}, ValueError, "Received: k='5'"),
        ({"epsilon": -1.0}, ValueError, "Received: epsilon=-1.0"),
        ({"epsilon": None}, TypeError, "Received: epsilon=None"),
        ({"from_logits": 1}, TypeError, "Received: from_logits=1"),
        ({"k": 2, "k_distribution": [1.0]}, ValueError, "must have k=2 entries"),
        ({"k": 2, "k_distribution": [0.6, 0.6]}, ValueError, "summing to 1"),
        ({"k": 2, "k_distribution": [-0.5, 1.5]}, ValueError, "non-negative"),
        ({"k": 2, "k_distribution": ["a", 1]}, TypeError, "real probabilities"),
        ({"k": 2, "k_distribution": 0.5}, TypeError, "Received: k_distribution=0.5"),
    ],
)
def test_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        TopKCrossEntropy(**kwargs)


def test_call_errors(rng):
    logits = separated_logits(rng).astype("float32")
    labels = np.arange(len(logits)) % CLASSES
    with pytest.raises(
        ValueError, match=r"smaller than the number of classes \(8\). Received: k=8"
    ):
        TopKCrossEntropy(8)(labels, logits)
    with pytest.raises(TypeError, match=r"Received: y_pred\.dtype=int"):
        TopKCrossEntropy(2)(labels, logits.astype("int32"))
    with pytest.raises(ValueError, match=r"Received: y_pred\.shape=\(8,\)"):
        TopKCrossEntropy(2)(labels[:1], logits[0])
    with pytest.raises(ValueError, match=r"Received: y_true\.shape=\(6, 3\)"):
        TopKCrossEntropy(2)(np.zeros((6, 3)), logits)


def test_docstring_examples():
    globs = {"np": np, "keras": keras, "keras_softquantile": keras_softquantile}
    for module in [classification]:
        result = doctest.testmod(module, extraglobs=globs, optionflags=doctest.ELLIPSIS)
        assert result.attempted >= 3 and result.failed == 0, (module.__name__, result)
