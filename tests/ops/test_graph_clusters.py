"""TensorFlow graphs without XLA run each selection op as one XLA cluster (`compiled_op`), with
its run-time checks hoisted out of the cluster: same values and gradients as op by op, the same
errors, whatever the shapes the graphs were traced with."""

import numpy as np
import pytest
import tensorflow as tf

from keras_softquantile import ops
from keras_softquantile.ops._backend import _tensorflow

pytestmark = pytest.mark.skipif(ops._backend.NAME != "tensorflow", reason="TensorFlow graphs only")


def _split(x, epsilon):
    return ops.soft_quantile_split(x, x, 0.25, epsilon=epsilon, output="weights")


def _value_and_gradient(function, x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        low, high = function(x, tf.constant(0.02))
        loss = tf.reduce_sum(high * x) - tf.reduce_sum(low * x)
    return high, tape.gradient(loss, x)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.fixture
def op_by_op():
    _tensorflow.COMPILE_WHOLE_OPS = False
    yield
    _tensorflow.COMPILE_WHOLE_OPS = True


def test_the_cluster_gives_the_values_and_gradients_of_the_stages(rng, op_by_op):
    x = tf.constant(rng.standard_normal((4, 60)), tf.float64)
    stages = tf.function(lambda x: _value_and_gradient(_split, x))(x)
    _tensorflow.COMPILE_WHOLE_OPS = True
    whole = tf.function(lambda x: _value_and_gradient(_split, x))(x)
    for a, b in zip(stages, whole, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-9)


def test_graphs_traced_with_other_shapes_reuse_the_right_trace(rng):
    """A relaxed (dynamic batch) trace has more checks than a static one; a later graph with
    the static shape must pair its own trace's outputs with its own messages."""
    epsilon = tf.constant(0.01)
    relaxed = tf.function(_split, reduce_retracing=True)
    for rows in (6, 7, 5):
        relaxed(tf.constant(rng.standard_normal((rows, 50)), tf.float32), epsilon)
    for rows in (6, 7):
        x = tf.constant(rng.standard_normal((rows, 50)), tf.float32)
        graph = tf.function(_split)(x, epsilon)
        np.testing.assert_allclose(graph[1].numpy(), _split(x, epsilon)[1].numpy(), atol=1e-5)


@pytest.mark.parametrize("batch", [None, 3])
def test_a_broken_promise_still_raises_in_the_graph(batch):
    function = tf.function(
        lambda x: ops.soft_topk_mask(x, 2), input_signature=[tf.TensorSpec([batch, 8])]
    )
    x = np.ones((3, 8), "float32")
    x[1, 4] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be finite"):
        function(tf.constant(x))
    clean = function(tf.constant(np.arange(24, dtype="float32").reshape(3, 8)))
    np.testing.assert_allclose(clean.numpy().sum(-1), 2.0, rtol=1e-5)


def test_inside_xla_with_a_dynamic_batch_the_gradient_compiles(rng):
    """Under `jit_compile=True` (as in `fit`) the op is compiled with the caller, not as a
    cluster of its own behind a run-time branch (whose gradient XLA cannot compile)."""

    @tf.function(jit_compile=True, input_signature=[tf.TensorSpec([None, 40], tf.float32)])
    def compiled(x):
        return _value_and_gradient(_split, x)

    x = tf.constant(rng.standard_normal((3, 40)), tf.float32)
    high, gradient = compiled(x)
    eager_high, eager_gradient = _value_and_gradient(_split, x)
    np.testing.assert_allclose(high.numpy(), eager_high.numpy(), atol=1e-5)
    np.testing.assert_allclose(gradient.numpy(), eager_gradient.numpy(), rtol=1e-3, atol=1e-3)


def test_each_op_keeps_a_bounded_number_of_compiled_clusters(rng):
    """One cluster per input shape, the least recently used dropped beyond the capacity: a
    process that meets many shapes does not keep every compilation alive."""
    from keras_softquantile.ops import selection

    cache = selection.soft_quantile_split.compiled_cache
    capacity = cache.capacity
    cache.capacity = 2
    try:
        keys = []
        for n in (20, 21, 22, 20):
            x = tf.constant(rng.standard_normal((3, n)), tf.float32)
            graph = tf.function(_split)(x, tf.constant(0.05))
            np.testing.assert_allclose(graph[1].numpy(), _split(x, tf.constant(0.05))[1], atol=1e-5)
            keys.append(list(cache._entries))
        assert len(cache) == 2
        # n = 20 was dropped by n = 22 and compiled again; 21 is now the oldest.
        assert [k[-1][0].shape[1] for k in keys[-1]] == [22, 20]
    finally:
        cache.capacity = capacity


@pytest.mark.parametrize("capacity", [1, 3])
def test_compiled_cache_builds_once_per_key_and_evicts_the_least_recently_used(capacity):
    from keras_softquantile.ops._backend._common import CompiledCache

    cache, built = CompiledCache(capacity), []

    def build(key):
        built.append(key)
        return key * 10

    for key in [1, 2, 1, 3, 1, 4, 2]:
        assert cache.get(key, lambda key=key: build(key)) == key * 10
    assert len(cache) == capacity
    # Capacity 3: 1, 2, 3 built; 1 reused; 4 drops 2 (least recently used); 2 is rebuilt.
    expected = [1, 2, 1, 3, 1, 4, 2] if capacity == 1 else [1, 2, 3, 4, 2]
    assert built == expected, built
    with pytest.raises(ValueError, match="`capacity` must be at least 1, got 0"):
        CompiledCache(0)


def test_xla_stages_are_skipped_where_the_dense_solve_would_dominate_on_cpus():
    pays = _tensorflow._xla_solve_pays
    limit = _tensorflow.XLA_SOLVE_MAX_BOUNDARIES
    per_target = _tensorflow.XLA_SOLVE_MIN_ENTRIES_PER_TARGET
    assert pays(None, limit + 1) and pays(10, 3)  # few boundaries: always compiled
    if tf.config.list_logical_devices("GPU"):
        assert pays(100, 100)
        return
    assert not pays(100, 100) and not pays(None, limit + 2)  # soft_rank of 100: op by op
    assert pays(per_target * 64, 64) and not pays(per_target * 64 - 1, 64)


def test_soft_rank_asks_whether_its_solver_stages_pay_as_clusters(rng, monkeypatch):
    asked = []
    rule = _tensorflow._xla_solve_pays

    def recorded(n, m):
        asked.append((n, m, rule(n, m)))
        return asked[-1][-1]

    monkeypatch.setattr(_tensorflow, "_xla_solve_pays", recorded)
    x = tf.constant(rng.standard_normal((3, 40)), tf.float64)
    w = tf.constant(rng.standard_normal((3, 40)), tf.float64)  # sum(ranks) is constant
    with tf.GradientTape() as tape:
        tape.watch(x)
        ranks = tf.function(lambda x: ops.soft_rank(x, epsilon=0.05))(x)
        loss = tf.reduce_sum(w * ranks)
    gradient = tape.gradient(loss, x)
    # The Newton loop and the implicit step, both for 40 targets over 40 entries.
    assert [(n, m) for n, m, _ in asked] == [(40, 40), (40, 40)]
    assert {pays for *_, pays in asked} == {bool(tf.config.list_logical_devices("GPU"))}
    np.testing.assert_allclose(ranks, ops.soft_rank(x, epsilon=0.05), rtol=1e-9)
    with tf.GradientTape() as tape:
        tape.watch(x)
        eager = tf.reduce_sum(w * ops.soft_rank(x, epsilon=0.05))
    np.testing.assert_allclose(gradient, tape.gradient(eager, x), rtol=1e-7)


def _xla_calls(graph_def) -> list[str]:
    """The calls of functions marked for XLA compilation of their own, in a graph and the
    functions of its library (the gradient's included)."""
    bodies = [graph_def.node, *(function.node_def for function in graph_def.library.function)]
    return [
        node.name
        for body in bodies
        for node in body
        if "_XlaMustCompile" in node.attr and node.attr["_XlaMustCompile"].b
    ]


@pytest.mark.parametrize("op", ["split", "topk"])
def test_inside_xla_no_stage_is_compiled_as_its_own_function(op):
    """Under `jit_compile=True` the solver's stages are inlined. A nested XLA function made
    TensorFlow take the gradient's inputs as compile-time constants: the whole function was
    compiled again for every new input value (0.6 s per call on [16, 64], in `fit`)."""
    function = (
        _split if op == "split" else lambda x, eps: (x, ops.soft_topk_mask(x, 4, epsilon=eps))
    )
    compiled = tf.function(lambda x: _value_and_gradient(function, x), jit_compile=True)
    graph = compiled.get_concrete_function(tf.TensorSpec([4, 40], tf.float32)).graph
    assert _xla_calls(graph.as_graph_def()) == []
    # Outside XLA the stages are clusters of their own, and the test sees them.
    graph = tf.function(lambda x: _value_and_gradient(function, x)).get_concrete_function(
        tf.TensorSpec([4, 40], tf.float32)
    )
    assert _xla_calls(graph.graph.as_graph_def())
