"""Ranking losses (`SpearmanLoss`, `SoftNDCGLoss`) and metrics (`SpearmanCorrelation`, `NDCG`)
under the active Keras backend: numpy references, the hard limit, finite differences, padding
exactness, training, saving and argument errors."""

import doctest
import itertools

import keras
import numpy as np
import pytest
from harness import backend, float64_available, grad, jit, needs_float64, tensor, to_numpy

import keras_softquantile
from keras_softquantile.losses import SoftNDCGLoss, SpearmanLoss
from keras_softquantile.losses import ranking as ranking_losses
from keras_softquantile.metrics import NDCG, SpearmanCorrelation
from keras_softquantile.metrics import ranking as ranking_metrics

WIDEST = "float64" if float64_available() else "float32"
# Under XLA every training step through the transport's backward pass is slow on 2 CPU cores
# (TensorFlow's default `jit_compile="auto"` means XLA): train in a graph there.
COMPILE = {"jit_compile": False} if backend() == "tensorflow" else {}
# Tracing the transport's compiled stages in a TensorFlow graph costs more than a few small
# eager steps; JAX runs a jitted step faster than an eager one.
FEW_STEPS = {"run_eagerly": True} if backend() == "tensorflow" else {}
LIST = 8
LOSSES = {
    "spearman": lambda **kw: SpearmanLoss(**kw),
    "ndcg": lambda **kw: SoftNDCGLoss(**kw),
    "ndcg@3": lambda **kw: SoftNDCGLoss(k=3, **kw),
}


# --------------------------------------------------------------------------------------------
# Numpy references of the hard metrics, list by list (valid items only)
# --------------------------------------------------------------------------------------------


def np_average_ranks(values):
    return np.array([np.sum(values < v) + 0.5 * (np.sum(values == v) - 1) for v in values])


def np_spearman(labels, scores):
    a, b = np_average_ranks(labels), np_average_ranks(scores)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def np_ndcg(labels, scores, k=None):
    """NDCG@k of one list with distinct scores, or None with no relevant item."""
    count = len(labels) if k is None else min(k, len(labels))
    order = np.argsort(-scores, kind="stable")[:count]
    gains = 2.0**labels - 1
    discounts = 1 / np.log2(2 + np.arange(count))
    ideal = np.sort(gains)[::-1][:count] @ discounts
    return None if ideal == 0 else float(gains[order] @ discounts / ideal)


def per_list(reference, labels, scores, mask, **options):
    return [
        reference(labels[row][mask[row]], scores[row][mask[row]], **options)
        for row in range(labels.shape[0])
    ]


def ranking_lists(rng, batch=6, size=LIST, grades=4, counts=None):
    """Graded labels (ties), well separated distinct scores (a permutation plus jitter), and a
    mask with 2 to `size` valid items per list (or as many as `counts` allows) at random
    places."""
    labels = rng.integers(0, grades, (batch, size)).astype("float64")
    scores = np.argsort(rng.random((batch, size)), axis=-1) + rng.uniform(-0.2, 0.2, (batch, size))
    mask = np.ones((batch, size), bool)
    for row in range(batch):
        count = rng.integers(2, size + 1) if counts is None else rng.choice(counts)
        mask[row, rng.choice(size, size - count, replace=False)] = False
    return labels, scores, mask


def with_padding(labels, mask):
    return np.where(mask, labels, -1.0)


# --------------------------------------------------------------------------------------------
# Metrics against numpy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [None, 1, 3, 20])
def test_ndcg_metric_matches_numpy(rng, k):
    labels, scores, mask = ranking_lists(rng, batch=12)
    labels[0] = 0  # a list with no relevant item: left out of the mean
    weights = rng.uniform(0.5, 2.0, labels.shape[0])
    expected = per_list(np_ndcg, labels, scores, mask, k=k)
    counted = np.array([e is not None for e in expected])
    values = np.array([e for e in expected if e is not None])
    metric = NDCG(k=k)
    # Two batches, one as a dict with a boolean mask: a streaming weighted mean.
    metric.update_state(with_padding(labels[:5], mask[:5]), scores[:5], weights[:5])
    metric.update_state({"labels": labels[5:], "mask": mask[5:]}, scores[5:], weights[5:, None])
    reference = np.average(values, weights=weights[counted])
    np.testing.assert_allclose(float(to_numpy(metric.result())), reference, rtol=1e-5)
    metric.reset_state()
    assert float(to_numpy(metric.result())) == 0
    metric.update_state(with_padding(labels, mask), scores)
    np.testing.assert_allclose(float(to_numpy(metric.result())), values.mean(), rtol=1e-5)


def test_spearman_metric_matches_numpy_with_ties(rng):
    labels, scores, mask = ranking_lists(rng, batch=12)
    scores = np.round(scores / 3)  # ties in the scores too
    labels[1] = 2.0  # constant labels: correlation 0
    weights = rng.uniform(0.5, 2.0, labels.shape[0])
    expected = per_list(np_spearman, labels, scores, mask)
    metric = SpearmanCorrelation()
    metric.update_state(with_padding(labels, mask), scores.astype("float32"), weights)
    reference = np.average(expected, weights=weights)
    np.testing.assert_allclose(float(to_numpy(metric.result())), reference, rtol=1e-5)


def test_metrics_ignore_nan_in_padding(rng):
    labels, scores, mask = ranking_lists(rng, batch=12)
    for metric in (NDCG(k=3), SpearmanCorrelation()):
        clean = type(metric).from_config(metric.get_config())
        clean.update_state(with_padding(labels, mask), scores)
        metric.update_state(with_padding(labels, mask), np.where(mask, scores, np.nan))
        assert float(to_numpy(metric.result())) == float(to_numpy(clean.result()))


# --------------------------------------------------------------------------------------------
# Soft losses: the hard limit
# --------------------------------------------------------------------------------------------


def list_losses(loss, labels, scores, dtype=WIDEST):
    return to_numpy(loss.call(tensor(labels), tensor(scores, dtype)))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_tend_to_one_minus_the_hard_metric(rng, name):
    labels, scores, mask = ranking_lists(rng)
    k = 3 if name == "ndcg@3" else None
    if name == "spearman":
        hard = 1 - np.array(per_list(np_spearman, labels, scores, mask))
    else:
        hard = per_list(np_ndcg, labels, scores, mask, k=k)
        hard = np.array([0.0 if h is None else 1 - h for h in hard])
    errors = []
    for epsilon in (0.3, 0.1, 0.03, 1e-3):
        loss = LOSSES[name](epsilon=epsilon, dtype=WIDEST)
        errors.append(np.abs(list_losses(loss, with_padding(labels, mask), scores) - hard).max())
    assert errors[0] > 1e-2  # soft at a large epsilon
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-5


def test_soft_ndcg_reference_values():
    # Labels 1 and 2 swapped: DCG = 1 + 3 / log2(3) against IDCG = 3 + 1 / log2(3).
    loss = SoftNDCGLoss(epsilon=1e-3, dtype=WIDEST)
    value = list_losses(loss, [[0.0, 1.0, 2.0]], [[0.1, 0.9, 0.5]])
    ideal = 3 + 1 / np.log2(3)
    np.testing.assert_allclose(value, [1 - (1 + 3 / np.log2(3)) / ideal], rtol=1e-6)
    # At the cutoff k = 1 only the top item counts: gain 1 of an ideal 3.
    value = list_losses(
        SoftNDCGLoss(k=1, epsilon=1e-3, dtype=WIDEST), [[0.0, 1.0, 2.0]], [[0.1, 0.9, 0.5]]
    )
    np.testing.assert_allclose(value, [1 - 1 / 3], rtol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_degenerate_lists_have_zero_gradient(rng, name):
    # Lists of the shared shape [6, LIST] (one JAX compilation), padded with label -1, NaN.
    labels, scores, _ = ranking_lists(rng)
    degenerate = [
        ([0.0, 0.0, 0.0], [0.3, 0.1, 0.2]),  # no relevant item: NDCG loss 0
        ([2.0, 2.0, 2.0, 2.0], [0.5, 0.1, 0.9, 0.4]),  # constant labels: Spearman loss 1
        ([1.0], [0.2]),  # a single item
        ([], []),  # nothing at all
    ]
    for row, (row_labels, row_scores) in enumerate(degenerate):
        labels[row], scores[row] = -1.0, np.nan
        labels[row, : len(row_labels)], scores[row, : len(row_scores)] = row_labels, row_scores
    loss = LOSSES[name](epsilon=0.1, dtype=WIDEST)
    values = list_losses(loss, labels, scores)
    if name == "spearman":
        np.testing.assert_array_equal(values[:4], 1)  # no correlation
    else:
        np.testing.assert_array_equal(values[[0, 2, 3]], 0)  # no relevant item, or perfect
    gradient = grad(lambda p: loss.call(tensor(labels), p), scores.astype(WIDEST))
    assert np.isfinite(gradient).all()
    np.testing.assert_array_equal(gradient[[0, 2, 3]], 0)
    if name == "spearman":
        np.testing.assert_array_equal(gradient[:4], 0)
    assert np.abs(gradient[4:]).max() > 1e-3  # the ordinary lists


# --------------------------------------------------------------------------------------------
# Gradients and padding
# --------------------------------------------------------------------------------------------


@needs_float64
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_match_finite_differences(rng, name):
    labels, _, mask = ranking_lists(rng)
    scores = rng.standard_normal(labels.shape)
    loss = LOSSES[name](epsilon=0.2, dtype="float64")
    y_true = tensor(with_padding(labels, mask))

    def total(p):
        return float(to_numpy(keras.ops.sum(loss.call(y_true, tensor(p)))))

    analytic = grad(lambda p: loss.call(y_true, p), scores)
    assert np.abs(analytic).max() > 1e-3
    np.testing.assert_array_equal(analytic[~mask], 0)
    h = 1e-6
    for _ in range(3):
        direction = rng.standard_normal(scores.shape)
        numeric = (total(scores + h * direction) - total(scores - h * direction)) / (2 * h)
        assert np.sum(analytic * direction) == pytest.approx(numeric, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_padding_changes_neither_losses_nor_gradients(rng, name):
    # Two list lengths only: JAX compiles the solver once per shape.
    labels, _, mask = ranking_lists(rng, counts=(5, LIST))
    scores = rng.standard_normal(labels.shape)
    poisoned = np.where(mask, scores, np.nan).astype(WIDEST)
    loss = LOSSES[name](epsilon=0.1, dtype=WIDEST)
    y_true = {"labels": tensor(labels), "mask": tensor(mask)}
    values = to_numpy(loss.call(y_true, tensor(poisoned)))
    gradient = grad(lambda p: loss.call(y_true, p), poisoned)
    assert np.isfinite(values).all() and np.isfinite(gradient).all()
    np.testing.assert_array_equal(gradient[~mask], 0)
    atol = 1e-11 if WIDEST == "float64" else 1e-5
    for row in range(labels.shape[0]):
        valid = mask[row]
        alone_true = tensor(labels[row][valid][None])
        alone = scores[row][valid][None].astype(WIDEST)
        np.testing.assert_allclose(
            values[row], to_numpy(loss.call(alone_true, tensor(alone)))[0], rtol=0, atol=atol
        )
        alone_gradient = grad(lambda p, t=alone_true: loss.call(t, p), alone)
        np.testing.assert_allclose(gradient[row][valid], alone_gradient[0], rtol=0, atol=atol)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_sample_weights_and_dict_labels(rng, name):
    labels, scores, mask = ranking_lists(rng)
    loss = LOSSES[name](epsilon=0.1)
    y_true, y_pred = with_padding(labels, mask), scores.astype("float32")
    per_list_losses = to_numpy(loss.call(tensor(y_true), tensor(y_pred)))
    weights = rng.uniform(0, 2, 6).astype("float32")
    weighted = float(to_numpy(loss(y_true, y_pred, sample_weight=weights)))
    np.testing.assert_allclose(weighted, np.sum(weights * per_list_losses) / 6, rtol=1e-5)
    # The mask given in a dict: the same losses.
    as_dict = {"labels": labels, "mask": mask}
    np.testing.assert_allclose(float(to_numpy(loss(as_dict, y_pred))), per_list_losses.mean())


def test_compiled_losses_match_eager(rng):
    labels, scores, mask = ranking_lists(rng)
    y_true, y_pred = tensor(with_padding(labels, mask), "float32"), tensor(scores, "float32")
    losses = [LOSSES[name](epsilon=0.1) for name in sorted(LOSSES)]

    def all_losses(t, p):  # one compilation for the three
        return keras.ops.stack([loss(t, p) for loss in losses])

    np.testing.assert_allclose(
        to_numpy(jit(all_losses)(y_true, y_pred)), to_numpy(all_losses(y_true, y_pred)), rtol=1e-5
    )


# --------------------------------------------------------------------------------------------
# Training and saving
# --------------------------------------------------------------------------------------------


def graded_lists(rng, batch=128, size=LIST, features=5):
    """Items with features whose linear score (plus noise) sets a graded relevance 0..3;
    lists hold 3 to `size` items (the rest padded with label -1)."""
    x = rng.standard_normal((batch, size, features)).astype("float32")
    utility = x @ rng.standard_normal(features) + 0.3 * rng.standard_normal((batch, size))
    labels = np.digitize(utility, [-1.0, 0.0, 1.0]).astype("float32")
    counts = rng.integers(3, size + 1, batch)
    labels[np.arange(size)[None, :] >= counts[:, None]] = -1
    return x, labels


def scorer(size=LIST, features=5):
    """Scores each item of a list `[batch, size, features]` -> `[batch, size]`."""
    return keras.Sequential(
        [
            keras.Input((size, features)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(1),
            keras.layers.Reshape((size,)),
        ]
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_fit_decreases_the_loss_and_raises_ndcg(rng, name):
    x, labels = graded_lists(rng)
    model = scorer()
    model.compile(
        keras.optimizers.Adam(0.05),
        loss=LOSSES[name](epsilon=0.1),
        metrics=[NDCG(), NDCG(k=3), SpearmanCorrelation()],
        **COMPILE,
    )
    history = model.fit(x, labels, epochs=4, batch_size=32, verbose=0).history
    assert history["loss"][-1] < 0.8 * history["loss"][0]
    assert history["ndcg"][-1] > history["ndcg"][0] + 0.05
    assert history["spearman_correlation"][-1] > history["spearman_correlation"][0] + 0.2


def test_fit_and_a_keras_round_trip(rng, tmp_path):
    x, labels = graded_lists(rng, batch=64)
    model = scorer()
    model.compile(
        keras.optimizers.Adam(0.05),
        loss=SoftNDCGLoss(k=3, epsilon=0.1),
        metrics=[NDCG(k=3), SpearmanCorrelation()],
        **FEW_STEPS,
    )
    history = model.fit(x, labels, epochs=3, batch_size=32, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    assert history["ndcg_at_3"][-1] > history["ndcg_at_3"][0]
    path = tmp_path / "ranker.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored.loss, SoftNDCGLoss) and restored.loss.get_config() == (
        model.loss.get_config()
    )
    predictions = to_numpy(model(x))
    np.testing.assert_allclose(to_numpy(restored(x)), predictions, rtol=1e-6, atol=1e-6)
    # The compiled loss and metrics come back too.
    again = restored.evaluate(x, labels, batch_size=32, verbose=0, return_dict=True)
    np.testing.assert_allclose(
        again["loss"], float(to_numpy(model.loss(labels, predictions))), rtol=1e-5
    )
    reference = NDCG(k=3)
    reference.update_state(labels, predictions)
    np.testing.assert_allclose(again["ndcg_at_3"], float(to_numpy(reference.result())), rtol=1e-5)
    assert "spearman_correlation" in again


@pytest.mark.parametrize(
    "item",
    [
        SpearmanLoss(epsilon=0.05, reduction="sum", name="s", dtype="float64"),
        SoftNDCGLoss(k=5, epsilon=0.2),
        SoftNDCGLoss(),
        SpearmanCorrelation(name="rho"),
        NDCG(k=4),
        NDCG(),
    ],
    ids=lambda item: type(item).__name__,
)
def test_config_round_trip(item):
    config = item.get_config()
    copy = type(item).from_config(config)
    assert copy.get_config() == config
    serialized = keras.saving.serialize_keras_object(item)
    assert serialized["registered_name"].startswith("keras_softquantile>")
    assert keras.saving.deserialize_keras_object(serialized).get_config() == config


def test_defaults_and_names():
    assert SpearmanLoss().epsilon == SoftNDCGLoss().epsilon == 0.1
    assert SoftNDCGLoss().k is None and NDCG(k=5).name == "ndcg_at_5" and NDCG().name == "ndcg"


@pytest.mark.parametrize("module", [ranking_losses, ranking_metrics], ids=["losses", "metrics"])
def test_docstring_examples(module):
    globs = {"np": np, "keras": keras, "keras_softquantile": keras_softquantile}
    result = doctest.testmod(module, extraglobs=globs, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 4 and result.failed == 0, result


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SpearmanLoss, SoftNDCGLoss])
@pytest.mark.parametrize(
    ("epsilon", "error"), [(0.0, ValueError), (-1.0, ValueError), ("0.1", TypeError)]
)
def test_bad_epsilon(cls, epsilon, error):
    with pytest.raises(error, match=r"`epsilon`.*Received: epsilon="):
        cls(epsilon=epsilon)


@pytest.mark.parametrize("cls", [SoftNDCGLoss, NDCG])
@pytest.mark.parametrize(
    ("k", "error"), [(0, ValueError), (-2, ValueError), (2.5, TypeError), (True, TypeError)]
)
def test_bad_k(cls, k, error):
    with pytest.raises(error, match=rf"`k` must be a positive integer or None. Received: k={k}"):
        cls(k=k)


CALLS = {
    "SpearmanLoss": lambda t, p: SpearmanLoss()(t, p),
    "SoftNDCGLoss": lambda t, p: SoftNDCGLoss(k=2)(t, p),
    "SpearmanCorrelation": lambda t, p: SpearmanCorrelation().update_state(t, p),
    "NDCG": lambda t, p: NDCG().update_state(t, p),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_bad_inputs(name):
    call = CALLS[name]
    labels = np.zeros((2, 3), "float32")
    with pytest.raises(TypeError, match=r"`y_pred` must be a floating-point.*y_pred.dtype=int32"):
        call(labels, np.zeros((2, 3), "int32"))
    with pytest.raises(TypeError, match=r"`y_true\['mask'\]` must be a boolean"):
        call({"labels": labels, "mask": np.ones((2, 3), "float32")}, np.zeros((2, 3), "float32"))
    with pytest.raises(ValueError, match=r"same shape.*Received: y_true.shape"):
        call(np.zeros((2, 4)), np.zeros((2, 3), "float32"))
    with pytest.raises(ValueError, match=r"\[batch, list_size\].*Received: y_pred.shape"):
        call(np.zeros((2, 3, 1)), np.zeros((2, 3, 1), "float32"))
    with pytest.raises(ValueError, match=r"at least one item"):
        call(np.zeros((2, 0)), np.zeros((2, 0), "float32"))
