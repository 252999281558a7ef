"""Tests for the soft sorting ops: soft_sort, soft_rank, soft_quantile and soft_sort_with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import tensorflow as tf

from keras_softquantile import soft_quantile, soft_rank, soft_sort, soft_sort_with

LEVELS = [0.0, 0.13, 0.5, 0.77, 1.0]
SCALAR_LEVEL = 0.37

# Unit roundoff-ish resolution of each dtype, for comparing low-precision outputs.
RESOLUTION = {
    tf.float16: 2.0**-10,
    tf.bfloat16: 2.0**-7,
    tf.float32: 2.0**-23,
    tf.float64: 2.0**-52,
}


# --------------------------------------------------------------------------------------------
# The ops under test, with their hard (numpy) counterparts along the last axis.
# --------------------------------------------------------------------------------------------


def _hard_sort(x, v):
    return np.sort(x, axis=-1)


def _hard_sort_descending(x, v):
    return np.flip(np.sort(x, axis=-1), axis=-1)


def _hard_rank(x, v):
    return np.argsort(np.argsort(x, axis=-1, kind="stable"), axis=-1, kind="stable").astype(
        np.float64
    )


def _hard_rank_descending(x, v):
    return x.shape[-1] - 1 - _hard_rank(x, v)


def _hard_quantiles(x, v):
    return np.moveaxis(np.quantile(x, LEVELS, axis=-1), 0, -1)


def _hard_scalar_quantile(x, v):
    return np.quantile(x, SCALAR_LEVEL, axis=-1)


def _hard_sort_with(x, v):
    return np.take_along_axis(v, np.argsort(x, axis=-1, kind="stable"), axis=-1)


def _hard_sort_with_descending(x, v):
    return np.flip(_hard_sort_with(x, v), axis=-1)


@dataclass(frozen=True)
class Op:
    """`soft(x, v, **kwargs)` with `x` the scores and `v` the values (used by sort_with)."""

    name: str
    soft: Callable
    hard: Callable
    # "keep": output like x; "replace": axis replaced by len(LEVELS); "reduce": axis removed.
    layout: str = "keep"
    uses_values: bool = False

    def __repr__(self) -> str:
        return self.name


OPS = [
    Op("sort", lambda x, v, **kw: soft_sort(x, **kw), _hard_sort),
    Op(
        "sort_descending",
        lambda x, v, **kw: soft_sort(x, descending=True, **kw),
        _hard_sort_descending,
    ),
    Op("rank", lambda x, v, **kw: soft_rank(x, **kw), _hard_rank),
    Op(
        "rank_descending",
        lambda x, v, **kw: soft_rank(x, descending=True, **kw),
        _hard_rank_descending,
    ),
    Op(
        "quantiles",
        lambda x, v, **kw: soft_quantile(x, LEVELS, **kw),
        _hard_quantiles,
        layout="replace",
    ),
    Op(
        "scalar_quantile",
        lambda x, v, **kw: soft_quantile(x, SCALAR_LEVEL, **kw),
        _hard_scalar_quantile,
        layout="reduce",
    ),
    Op(
        "sort_with",
        lambda x, v, **kw: soft_sort_with(v, x, **kw),
        _hard_sort_with,
        uses_values=True,
    ),
    Op(
        "sort_with_descending",
        lambda x, v, **kw: soft_sort_with(v, x, descending=True, **kw),
        _hard_sort_with_descending,
        uses_values=True,
    ),
]
OP_BY_NAME = {op.name: op for op in OPS}
# One of each public op (the solvers do not care about `descending`).
BASE_OPS = [OP_BY_NAME[name] for name in ("sort", "rank", "quantiles", "sort_with")]
# The distinct code paths (descending is a reversal of the ascending output).
CORE_OPS = [*BASE_OPS, OP_BY_NAME["scalar_quantile"]]


def separated(rng: np.random.Generator, shape, scale: float = 1.0, shift: float = 0.0):
    """Distinct, well-separated float64 entries along the last axis (gaps >= 0.6 * scale).

    Each row is a random permutation of 0..n-1 plus jitter in [-0.2, 0.2].
    """
    permutations = np.argsort(rng.random(shape), axis=-1).astype(np.float64)
    return shift + scale * (permutations + rng.uniform(-0.2, 0.2, shape))


def run(op: Op, x, v=None, **kwargs) -> np.ndarray:
    x = tf.convert_to_tensor(x)
    v = x if v is None else tf.convert_to_tensor(v)
    return op.soft(x, v, **kwargs).numpy()


def max_error(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --------------------------------------------------------------------------------------------
# Shapes, dtypes, batching and axes.
# --------------------------------------------------------------------------------------------


class TestShapesAndDtypes:
    @pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32, tf.float64])
    @pytest.mark.parametrize("op", CORE_OPS, ids=repr)
    def test_dtype_is_preserved_and_values_are_right(self, op, dtype):
        rng = np.random.default_rng(1)
        n = 9
        # Integers plus multiples of 1/8: exactly representable in float16 and bfloat16.
        x = np.argsort(rng.random((2, n)), axis=-1) + rng.integers(-1, 2, (2, n)) / 8
        v = rng.integers(-40, 40, (2, n)) / 4
        # epsilon = 1e-3 is already hard for gaps >= 0.75.
        got = op.soft(tf.constant(x, dtype), tf.constant(v, dtype), epsilon=1e-3)
        assert got.dtype == dtype
        expected = op.hard(x, v)
        assert tuple(got.shape) == expected.shape
        tolerance = 2 * RESOLUTION[dtype] * max(1.0, float(np.max(np.abs(expected))))
        tolerance = max(tolerance, 1e-9)
        assert max_error(tf.cast(got, tf.float64).numpy(), expected) <= tolerance

    @pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32])
    def test_low_precision_quantile_at_small_epsilon(self, dtype):
        q = 0.37
        x = np.array([4.0, 1.0, 3.0, 2.0, 0.0, 8.0, 6.0, 5.0, 7.0])
        # The same call in float64 is exact (checked here so that only the dtype differs).
        exact = soft_quantile(tf.constant(x), q, epsilon=1e-4).numpy()
        np.testing.assert_allclose(exact, np.quantile(x, q), rtol=0, atol=1e-9)
        got = soft_quantile(tf.constant(x, dtype), q, epsilon=1e-4)
        assert got.dtype == dtype
        tolerance = 2 * RESOLUTION[dtype] * 8
        assert abs(float(tf.cast(got, tf.float64)) - np.quantile(x, q)) <= tolerance

    def test_sort_with_returns_the_dtype_of_values(self):
        scores = tf.constant([3.0, 1.0, 2.0], tf.float64)
        values = tf.constant([30.0, 10.0, 20.0], tf.float16)
        got = soft_sort_with(values, scores, epsilon=1e-4)
        assert got.dtype == tf.float16
        np.testing.assert_array_equal(got.numpy(), np.array([10.0, 20.0, 30.0], np.float16))

    @pytest.mark.parametrize("op", CORE_OPS, ids=repr)
    def test_leading_dimensions_are_batched_row_by_row(self, op):
        rng = np.random.default_rng(2)
        x = rng.normal(size=(2, 2, 6))
        v = rng.normal(size=(2, 2, 6))
        batched = run(op, x, v, epsilon=1e-2)
        expected_shape = {"keep": (2, 2, 6), "replace": (2, 2, len(LEVELS)), "reduce": (2, 2)}
        assert batched.shape == expected_shape[op.layout]
        for i in range(2):
            for j in range(2):
                row = run(op, x[i, j], v[i, j], epsilon=1e-2)
                np.testing.assert_allclose(batched[i, j], row, rtol=1e-10, atol=1e-10)

    @pytest.mark.parametrize("axis", [0, -2])
    @pytest.mark.parametrize("op", CORE_OPS, ids=repr)
    def test_non_last_axis_matches_moving_the_axis(self, op, axis):
        rng = np.random.default_rng(3)
        x = rng.normal(size=(3, 5, 2))
        v = rng.normal(size=(3, 5, 2))
        got = run(op, x, v, epsilon=1e-2, axis=axis)
        last = run(op, np.moveaxis(x, axis, -1), np.moveaxis(v, axis, -1), epsilon=1e-2)
        expected = last if op.layout == "reduce" else np.moveaxis(last, -1, axis)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
        # And the result is the hard op along that axis, not along another one.
        sharp = run(op, x, v, epsilon=1e-4, axis=axis)
        hard = op.hard(np.moveaxis(x, axis, -1), np.moveaxis(v, axis, -1))
        hard = hard if op.layout == "reduce" else np.moveaxis(hard, -1, axis)
        assert max_error(sharp, hard) < 1e-6

    @pytest.mark.parametrize(
        ("q", "expected_shape"),
        [(0.5, (2, 3)), ([0.5], (2, 1, 3)), ([0.1, 0.9, 0.5, 0.5], (2, 4, 3)), ((0, 1), (2, 2, 3))],
    )
    def test_quantile_shapes_follow_numpy(self, q, expected_shape):
        rng = np.random.default_rng(4)
        x = separated(rng, (2, 3, 7))
        x = np.moveaxis(x, -1, 1)  # [2, 7, 3], quantiles along axis 1
        got = soft_quantile(tf.constant(x), q, epsilon=1e-4, axis=1).numpy()
        expected = np.quantile(x, q, axis=1)
        if np.ndim(q):
            expected = np.moveaxis(expected, 0, 1)
        assert got.shape == expected_shape == expected.shape
        assert max_error(got, expected) < 1e-6

    @pytest.mark.parametrize("make_q", [np.array, tf.constant], ids=["ndarray", "tensor"])
    def test_zero_dimensional_q_is_a_scalar_level(self, make_q):
        x = np.array([[4.0, 1.0, 3.0, 2.0], [0.0, 5.0, 1.0, 2.0]])
        got = soft_quantile(tf.constant(x), make_q(0.5), epsilon=1e-4).numpy()
        expected = np.quantile(x, np.array(0.5), axis=-1)
        assert got.shape == expected.shape == (2,)
        assert max_error(got, expected) < 1e-6

    def test_empty_batch(self):
        got = soft_sort(tf.zeros([0, 4], tf.float64))
        assert tuple(got.shape) == (0, 4)
        assert got.dtype == tf.float64

    @pytest.mark.parametrize("op", BASE_OPS, ids=repr)
    def test_zero_length_axis(self, op):
        x = tf.zeros([3, 0], tf.float64)
        with pytest.raises(ValueError, match="at least one entry"):
            op.soft(x, x, epsilon=1e-2)


# --------------------------------------------------------------------------------------------
# Convergence to the hard ops.
# --------------------------------------------------------------------------------------------


class TestHardLimit:
    @pytest.mark.parametrize("op", OPS, ids=repr)
    def test_error_shrinks_monotonically_with_epsilon(self, op):
        rng = np.random.default_rng(5)
        x = separated(rng, (3, 10))
        v = rng.normal(size=(3, 10))
        hard = op.hard(x, v)
        errors = [max_error(run(op, x, v, epsilon=eps), hard) for eps in (1e-1, 1e-2, 1e-4)]
        assert errors[0] > 1e-2, errors  # genuinely soft at epsilon = 0.1
        assert errors[0] > errors[1] > errors[2], errors
        assert errors[2] < 1e-6, errors

    @pytest.mark.parametrize("n", [1, 2, 3, 4])
    @pytest.mark.parametrize("op", OPS, ids=repr)
    def test_tiny_rows(self, op, n):
        # n = 2 and n = 3 take the closed-form two- and three-target transport paths.
        rng = np.random.default_rng(6 + n)
        x = separated(rng, (2, n), scale=3.0, shift=-1.0)
        v = rng.normal(size=(2, n))
        got = run(op, x, v, epsilon=1e-4)
        hard = op.hard(x, v)
        assert got.shape == hard.shape
        assert max_error(got, hard) < 1e-6

    # Three of five scores tie at the median, so the squashing's scale is their mean absolute
    # deviation and 2 and 3 land 0.096 apart: nearly hard from epsilon 3e-3 (e^-16).
    @pytest.mark.parametrize("epsilon", [3e-3, 1e-4])
    def test_ties(self, epsilon):
        x = tf.constant([2.0, 1.0, 1.0, 1.0, 3.0], tf.float64)
        atol = 1e-4 if epsilon > 1e-3 else 1e-9
        s = soft_sort(x, epsilon=epsilon).numpy()
        np.testing.assert_allclose(s, [1, 1, 1, 2, 3], rtol=0, atol=atol)
        # Ties share the average of the ranks they span, exactly at any epsilon.
        r = soft_rank(x, epsilon=epsilon).numpy()
        np.testing.assert_allclose(r, [3, 1, 1, 1, 4], rtol=0, atol=atol)
        assert np.ptp(r[1:4]) < 1e-12
        levels = [0.1, 0.5, 0.6, 0.9]
        q = soft_quantile(x, levels, epsilon=epsilon).numpy()
        np.testing.assert_allclose(q, np.quantile(x.numpy(), levels), rtol=0, atol=atol)

    @pytest.mark.parametrize("op", OPS, ids=repr)
    def test_constant_row(self, op):
        x = np.full((6,), 3.5)
        v = np.arange(6.0)
        got = run(op, x, v, epsilon=1e-2)
        if op.name.startswith("rank"):
            expected = np.full(6, 2.5)  # everyone shares the average rank
        elif op.name.startswith("sort_with"):
            expected = np.full(6, v.mean())  # no order: every slot averages all values
        else:
            expected = op.hard(x, v)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)

    def test_descending_is_the_reversed_ascending(self):
        rng = np.random.default_rng(7)
        x = tf.constant(rng.normal(size=(3, 8)))
        for eps in (1e-1, 1e-2):
            np.testing.assert_allclose(
                soft_sort(x, epsilon=eps, descending=True).numpy(),
                soft_sort(x, epsilon=eps).numpy()[:, ::-1],
                rtol=0,
                atol=1e-12,
            )
            np.testing.assert_allclose(
                soft_rank(x, epsilon=eps, descending=True).numpy(),
                7 - soft_rank(x, epsilon=eps).numpy(),
                rtol=0,
                atol=1e-12,
            )

    def test_sort_with_itself_is_soft_sort(self):
        rng = np.random.default_rng(8)
        x = tf.constant(rng.normal(size=(3, 8)))
        np.testing.assert_allclose(
            soft_sort_with(x, x, epsilon=3e-2).numpy(),
            soft_sort(x, epsilon=3e-2).numpy(),
            rtol=0,
            atol=1e-12,
        )

    @pytest.mark.parametrize("epsilon", [3e-1, 1e-1, 1e-2])
    def test_soft_outputs_are_ordered(self, epsilon):
        rng = np.random.default_rng(9)
        x = rng.normal(size=(4, 9))
        s = soft_sort(tf.constant(x), epsilon=epsilon).numpy()
        r = soft_rank(tf.constant(x), epsilon=epsilon).numpy()
        q = soft_quantile(tf.constant(x), [0.1, 0.3, 0.5, 0.9], epsilon=epsilon).numpy()
        assert np.all(np.diff(s, axis=-1) > 0)
        assert np.all(np.diff(q, axis=-1) > 0)
        # Ranks keep the order of x and stay inside [0, n - 1].
        assert np.all(np.diff(np.take_along_axis(r, np.argsort(x, -1), -1), axis=-1) > 0)
        assert np.all((r >= 0) & (r <= 9 - 1))
        # Soft sorted entries are convex combinations of x.
        assert np.all(s >= x.min(-1, keepdims=True)) and np.all(s <= x.max(-1, keepdims=True))


# --------------------------------------------------------------------------------------------
# Conservation and scale/shift equivariance.
# --------------------------------------------------------------------------------------------


SCALE_SHIFTS = [(0.5, 0.0), (3.0, -2.0), (1e3, 50.0), (1e-3, 1e-2)]


class TestInvariances:
    @pytest.mark.parametrize("epsilon", [3e-1, 1e-2, 1e-4])
    def test_sums_are_preserved(self, epsilon):
        rng = np.random.default_rng(10)
        x = rng.normal(size=(3, 8)) * 5 + 2
        v = rng.normal(size=(3, 8))
        s = soft_sort(tf.constant(x), epsilon=epsilon).numpy()
        np.testing.assert_allclose(s.sum(-1), x.sum(-1), rtol=1e-12, atol=1e-12)
        r = soft_rank(tf.constant(x), epsilon=epsilon).numpy()
        np.testing.assert_allclose(r.sum(-1), 8 * 7 / 2, rtol=1e-12)
        w = soft_sort_with(tf.constant(v), tf.constant(x), epsilon=epsilon).numpy()
        np.testing.assert_allclose(w.sum(-1), v.sum(-1), rtol=1e-12, atol=1e-12)
        # And the soft op is not the identity or the hard sort in disguise at large epsilon.
        if epsilon > 0.1:
            assert max_error(s, np.sort(x, -1)) > 1e-2

    @pytest.mark.parametrize("op", CORE_OPS, ids=repr)
    def test_scale_and_shift_of_scores(self, op):
        rng = np.random.default_rng(11)
        x = rng.normal(size=(2, 7))
        v = rng.normal(size=(2, 7))
        base = run(op, x, v, epsilon=1e-2)
        assert max_error(base, op.hard(x, v)) > 1e-3  # soft enough to be a real test
        for scale, shift in SCALE_SHIFTS:
            moved = run(op, scale * x + shift, v, epsilon=1e-2)
            # Ranks and orderings are invariant (only the order of the scores matters);
            # sorted values and quantiles are equivariant.
            invariant = op.name.startswith(("rank", "sort_with"))
            expected = base if invariant else scale * base + shift
            atol = 1e-9 * max(1.0, scale * np.abs(x).max() + abs(shift))
            np.testing.assert_allclose(
                moved, expected, rtol=1e-9, atol=atol, err_msg=f"{scale=}, {shift=}"
            )

    @pytest.mark.parametrize(("scale", "shift"), [(-2.0, 1.0), (10.0, -3.0)])
    def test_sort_with_is_affine_in_values(self, scale, shift):
        rng = np.random.default_rng(12)
        x = rng.normal(size=(2, 7))
        v = rng.normal(size=(2, 7))
        base = soft_sort_with(tf.constant(v), tf.constant(x), epsilon=1e-2).numpy()
        moved = soft_sort_with(tf.constant(scale * v + shift), tf.constant(x), epsilon=1e-2)
        np.testing.assert_allclose(moved.numpy(), scale * base + shift, rtol=1e-10, atol=1e-10)

    def test_permuting_the_input_only_permutes_ranks(self):
        rng = np.random.default_rng(13)
        x = rng.normal(size=(9,))
        perm = rng.permutation(9)
        r = soft_rank(tf.constant(x), epsilon=1e-2).numpy()
        r_perm = soft_rank(tf.constant(x[perm]), epsilon=1e-2).numpy()
        np.testing.assert_allclose(r_perm, r[perm], rtol=0, atol=1e-10)
        s = soft_sort(tf.constant(x), epsilon=1e-2).numpy()
        s_perm = soft_sort(tf.constant(x[perm]), epsilon=1e-2).numpy()
        np.testing.assert_allclose(s_perm, s, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------------
# Gradients.
# --------------------------------------------------------------------------------------------


def _weighted_loss(op: Op, x: tf.Tensor, v: tf.Tensor, w: np.ndarray, epsilon: float):
    """`sum(w * op(x, v))` per row of `x` `[rows, n]`."""
    y = op.soft(x, v, epsilon=epsilon)
    if op.layout == "reduce":
        return y * w[0]
    return tf.reduce_sum(y * tf.constant(w, y.dtype), axis=-1)


def tape_gradients(op: Op, x: np.ndarray, v: np.ndarray, w: np.ndarray, epsilon: float):
    xt = tf.constant(x[None])
    vt = tf.constant(v[None])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([xt, vt])
        loss = tf.reduce_sum(_weighted_loss(op, xt, vt, w, epsilon))
    gx = tape.gradient(loss, xt)
    gv = tape.gradient(loss, vt)
    gx = np.zeros_like(x) if gx is None else gx.numpy()[0]
    gv = np.zeros_like(v) if gv is None else gv.numpy()[0]
    return gx, gv


def finite_difference_gradients(op, x, v, w, epsilon, h=1e-5):
    """Central differences in x and in v, all perturbations batched as rows of one call."""
    n = x.shape[-1]
    steps = h * np.eye(n)
    xs = np.concatenate([x + steps, x - steps, np.repeat(x[None], 2 * n, 0)])
    vs = np.concatenate([np.repeat(v[None], 2 * n, 0), v + steps, v - steps])
    f = _weighted_loss(op, tf.constant(xs), tf.constant(vs), w, epsilon).numpy()
    gx = (f[:n] - f[n : 2 * n]) / (2 * h)
    gv = (f[2 * n : 3 * n] - f[3 * n :]) / (2 * h)
    return gx, gv


GRADIENT_CASES = {
    "normal": lambda rng: rng.normal(size=6),
    # Tied scores away from the median and the median absolute deviation, where the
    # squashing is differentiable (at those two order statistics it has a kink).
    "ties": lambda rng: np.array([1.0, 2.0, 2.0, -0.5, 0.3, 0.0]),
    "spread": lambda rng: rng.normal(size=8) * 100 + 40,
}


class TestGradients:
    @pytest.mark.parametrize(
        ("case", "epsilon"), [("normal", 1e-1), ("normal", 1e-2), ("ties", 1e-2), ("spread", 1e-2)]
    )
    @pytest.mark.parametrize("op", CORE_OPS, ids=repr)
    def test_matches_finite_differences(self, op, case, epsilon):
        rng = np.random.default_rng(14)
        x = GRADIENT_CASES[case](rng)
        n = x.shape[0]
        v = rng.normal(size=n)
        width = {"keep": n, "replace": len(LEVELS), "reduce": 1}[op.layout]
        w = rng.normal(size=width)
        gx, gv = tape_gradients(op, x, v, w, epsilon)
        fx, fv = finite_difference_gradients(op, x, v, w, epsilon)
        assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gv))
        scale = np.linalg.norm(np.concatenate([fx, fv]))
        assert scale > 1e-3  # the loss does depend on the inputs
        error = np.linalg.norm(np.concatenate([gx - fx, gv - fv]))
        assert error / scale < 1e-4, (gx, fx, gv, fv)
        if not op.uses_values:
            np.testing.assert_array_equal(gv, 0.0)

    @pytest.mark.parametrize("op", OPS, ids=repr)
    def test_small_epsilon_gives_the_hard_gradient(self, op):
        # At epsilon = 1e-4 and well separated entries, memberships are locally constant, so
        # the gradient is that of the hard op: a permutation (or interpolation) of w.
        rng = np.random.default_rng(15)
        x = separated(rng, (7,))
        v = rng.normal(size=7)
        width = {"keep": 7, "replace": len(LEVELS), "reduce": 1}[op.layout]
        w = rng.normal(size=width)
        gx, gv = tape_gradients(op, x, v, w, 1e-4)
        # The hard ops are piecewise linear: central differences with a step far below the
        # gaps between entries are their exact gradient.
        step = 1e-3
        identity = np.eye(7)
        expected_x = np.array(
            [np.sum(w * (op.hard(x + step * e, v) - op.hard(x - step * e, v))) for e in identity]
        ) / (2 * step)
        expected_v = np.array(
            [np.sum(w * (op.hard(x, v + step * e) - op.hard(x, v - step * e))) for e in identity]
        ) / (2 * step)
        if op.name.startswith("rank"):
            np.testing.assert_array_equal(expected_x, 0.0)
        else:
            assert np.abs(expected_x).max() + np.abs(expected_v).max() > 1e-2
        np.testing.assert_allclose(gx, expected_x, rtol=0, atol=1e-6)
        np.testing.assert_allclose(gv, expected_v, rtol=0, atol=1e-6)

    @pytest.mark.parametrize("epsilon", [1e-2, 1e-4])
    @pytest.mark.parametrize("x", [[1.0, 1.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0]], ids=str)
    @pytest.mark.parametrize("op", CORE_OPS, ids=repr)
    def test_finite_at_ties(self, op, x, epsilon):
        x = np.array(x)
        v = np.array([0.5, -1.0, 2.0, 0.25])
        width = {"keep": 4, "replace": len(LEVELS), "reduce": 1}[op.layout]
        w = np.linspace(1.0, 2.0, width)
        gx, gv = tape_gradients(op, x, v, w, epsilon)
        assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gv)), (gx, gv)
        # Shift and scale invariance of the scores, differentiated: g . 1 = 0 and g . x = 0
        # for ranks and orderings; equivariance gives g . 1 = sum(w), g . x = loss for sorts.
        loss = _weighted_loss(op, tf.constant(x[None]), tf.constant(v[None]), w, epsilon)
        loss = float(loss.numpy()[0])
        if op.name.startswith(("rank", "sort_with")):
            expected_sum, expected_dot = 0.0, 0.0
        else:
            expected_sum, expected_dot = float(np.sum(w)), loss
        atol = 1e-8 / epsilon
        np.testing.assert_allclose(np.sum(gx), expected_sum, rtol=1e-8, atol=atol)
        np.testing.assert_allclose(np.dot(gx, x), expected_dot, rtol=1e-8, atol=atol)


# --------------------------------------------------------------------------------------------
# Graph and XLA compilation.
# --------------------------------------------------------------------------------------------


def graph(fn, **kwargs):
    """`tf.function` without AutoGraph: the ops build their loops with `tf.while_loop`, and
    converting the package source costs seconds per test. `TestCompilation.test_matches_eager`
    covers the default (AutoGraph) tracing."""
    return tf.function(fn, autograph=False, **kwargs)


# XLA compiles cost seconds per op: compile the two transport shapes (n equal buckets for
# sort, whose rank/sort_with variants differ only by the final contraction, and a few unequal
# buckets for quantiles) in one function.
COMPILED_OPS = {"function": BASE_OPS, "xla": [OP_BY_NAME["sort"], OP_BY_NAME["quantiles"]]}
# Every graph-mode test uses float64 rows of this shape, so that whatever the ops compile per
# signature inside a graph is compiled once for the whole module.
GRAPH_SHAPE = (3, 7)


def _apply(ops, x, v):
    return [op.soft(x, v, epsilon=1e-2) for op in ops]


@pytest.fixture(scope="module")
def compiled():
    # Default tf.function settings (AutoGraph on), as a user would write them.
    return {
        "function": tf.function(lambda x, v: _apply(COMPILED_OPS["function"], x, v)),
        "xla": tf.function(lambda x, v: _apply(COMPILED_OPS["xla"], x, v), jit_compile=True),
    }


class TestCompilation:
    @pytest.mark.parametrize("mode", ["function", "xla"])
    @pytest.mark.slow
    def test_matches_eager(self, compiled, mode):
        rng = np.random.default_rng(16)
        x = tf.constant(rng.normal(size=GRAPH_SHAPE))
        v = tf.constant(rng.normal(size=GRAPH_SHAPE))
        ops = COMPILED_OPS[mode]
        eager = _apply(ops, x, v)
        got = compiled[mode](x, v)
        for op, a, b in zip(ops, eager, got, strict=True):
            assert a.dtype == b.dtype == tf.float64, op
            assert a.shape == b.shape, op
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-6, err_msg=op.name)
            assert max_error(a.numpy(), op.hard(x.numpy(), v.numpy())) > 1e-3  # soft regime

    def test_xla_confines_nan_to_its_row(self, compiled):
        # Under XLA the finiteness check cannot raise; other rows must be unaffected.
        rng = np.random.default_rng(16)
        x = rng.normal(size=GRAPH_SHAPE)
        v = rng.normal(size=GRAPH_SHAPE)
        ops = COMPILED_OPS["xla"]
        eager = _apply(ops, tf.constant(x), tf.constant(v))
        x[1, 3] = np.nan
        got = compiled["xla"](tf.constant(x), tf.constant(v))
        for op, a, b in zip(ops, eager, got, strict=True):
            np.testing.assert_allclose(
                b.numpy()[[0, 2]], a.numpy()[[0, 2]], rtol=1e-6, atol=1e-6, err_msg=op.name
            )

    def test_dynamic_batch_dimension(self):
        op = OP_BY_NAME["sort"]
        rng = np.random.default_rng(17)
        x = rng.normal(size=GRAPH_SHAPE)
        v = rng.normal(size=GRAPH_SHAPE)
        spec = tf.TensorSpec([None, GRAPH_SHAPE[1]], tf.float64)
        fn = graph(lambda a, b: op.soft(a, b, epsilon=1e-2), input_signature=[spec, spec])
        out = fn.get_concrete_function().structured_outputs
        assert out.shape.as_list() == [None, GRAPH_SHAPE[1]]
        got = fn(tf.constant(x), tf.constant(v)).numpy()
        np.testing.assert_allclose(got, run(op, x, v, epsilon=1e-2), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# Solvers.
# --------------------------------------------------------------------------------------------


class TestSolvers:
    @pytest.mark.parametrize("op", BASE_OPS, ids=repr)
    def test_newton_and_sinkhorn_agree(self, op):
        rng = np.random.default_rng(18)
        x = rng.normal(size=(3, 8))
        v = rng.normal(size=(3, 8))
        newton = run(op, x, v, epsilon=1e-1, solver="newton")
        sinkhorn = run(op, x, v, epsilon=1e-1, solver="sinkhorn")
        auto = run(op, x, v, epsilon=1e-1, solver="auto")
        np.testing.assert_allclose(sinkhorn, newton, rtol=0, atol=1e-6)
        np.testing.assert_allclose(auto, newton, rtol=0, atol=1e-12)
        assert max_error(newton, op.hard(x, v)) > 1e-2  # a genuinely soft comparison

    def test_newton_and_sinkhorn_agree_at_small_epsilon(self):
        rng = np.random.default_rng(19)
        x = tf.constant(rng.normal(size=GRAPH_SHAPE))
        # Sinkhorn needs ~1000 iterations here: run it as a graph rather than step by step.
        sinkhorn = graph(lambda a: soft_sort(a, epsilon=1e-2, solver="sinkhorn"))(x)
        newton = soft_sort(x, epsilon=1e-2, solver="newton")
        np.testing.assert_allclose(sinkhorn.numpy(), newton.numpy(), rtol=0, atol=1e-6)
        assert max_error(newton.numpy(), np.sort(x.numpy(), -1)) > 1e-4

    @pytest.mark.parametrize("solver", ["newton", "sinkhorn"])
    def test_float32_solvers_agree_with_float64(self, solver):
        rng = np.random.default_rng(20)
        x = rng.normal(size=(2, 6)).astype(np.float32)
        got = soft_rank(tf.constant(x), epsilon=1e-1, solver=solver)
        assert got.dtype == tf.float32
        expected = soft_rank(tf.constant(x, tf.float64), epsilon=1e-1, solver="newton")
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Argument validation.
# --------------------------------------------------------------------------------------------


GOOD = np.array([[0.3, -1.0, 2.0, 0.5], [1.0, 2.0, 3.0, 4.0]])


class TestValidation:
    @pytest.mark.parametrize(
        "make_x",
        [
            lambda: tf.constant([[3, 1, 2]]),
            lambda: np.array([3, 1, 2]),
            lambda: [3, 1, 2],
            lambda: tf.constant([True, False]),
        ],
        ids=["tf_int32", "np_int64", "list_int", "bool"],
    )
    @pytest.mark.parametrize(
        "op",
        [soft_sort, soft_rank, lambda x: soft_quantile(x, 0.5)],
        ids=["soft_sort", "soft_rank", "soft_quantile"],
    )
    def test_integer_x_raises_type_error(self, op, make_x):
        with pytest.raises(TypeError, match="`x`"):
            op(make_x())

    def test_integer_values_or_scores_raise_type_error(self):
        floats = tf.constant([1.0, 2.0, 3.0])
        ints = tf.constant([1, 2, 3])
        with pytest.raises(TypeError, match="`values`"):
            soft_sort_with(ints, floats)
        with pytest.raises(TypeError, match="`scores`"):
            soft_sort_with(floats, ints)

    @pytest.mark.parametrize(
        "epsilon",
        [0.0, -1e-3, float("nan"), float("inf"), tf.constant(0.0), tf.constant(-1.0, tf.float64)],
        ids=["zero", "negative", "nan", "inf", "tensor_zero", "tensor_negative"],
    )
    @pytest.mark.parametrize("op", OPS, ids=repr)
    def test_bad_epsilon_raises_value_error(self, op, epsilon):
        with pytest.raises(ValueError, match="epsilon"):
            op.soft(tf.constant(GOOD), tf.constant(GOOD), epsilon=epsilon)

    @pytest.mark.parametrize(
        "q", [-0.1, 1.5, [0.5, 1.01], [-1e-9], float("nan")], ids=lambda q: repr(q)
    )
    def test_q_outside_unit_interval_raises(self, q):
        with pytest.raises(ValueError, match="`q`"):
            soft_quantile(tf.constant(GOOD), q)

    @pytest.mark.parametrize("op", OPS, ids=repr)
    def test_nan_raises_value_error_eagerly(self, op):
        bad = GOOD.copy()
        bad[1, 2] = np.nan
        name = "scores" if op.uses_values else "x"
        with pytest.raises(ValueError, match=f"`{name}` must be finite"):
            op.soft(tf.constant(bad), tf.constant(GOOD))

    def test_infinity_raises_value_error(self):
        with pytest.raises(ValueError, match="finite"):
            soft_sort(tf.constant([1.0, np.inf, 0.0]))

    @pytest.mark.parametrize("op", [OP_BY_NAME["sort"], OP_BY_NAME["sort_with"]], ids=repr)
    def test_nan_raises_invalid_argument_in_function(self, op):
        good = np.random.default_rng(21).normal(size=GRAPH_SHAPE)
        bad = good.copy()
        bad[0, 1] = np.nan
        fn = graph(lambda a, b: op.soft(a, b, epsilon=1e-2))
        np.testing.assert_allclose(fn(tf.constant(good), tf.constant(good)), run(op, good))
        with pytest.raises(tf.errors.InvalidArgumentError, match="must be finite"):
            fn(tf.constant(bad), tf.constant(good))

    @pytest.mark.parametrize(
        ("values_shape", "scores_shape"), [((2, 3), (2, 4)), ((3, 2), (2, 3)), ((3,), (2, 3))]
    )
    def test_sort_with_shape_mismatch(self, values_shape, scores_shape):
        with pytest.raises(ValueError, match="same shape"):
            soft_sort_with(tf.zeros(values_shape), tf.ones(scores_shape))

    @pytest.mark.parametrize("solver", ["foo", "Newton", ""])
    @pytest.mark.parametrize("op", BASE_OPS, ids=repr)
    def test_unknown_solver(self, op, solver):
        with pytest.raises(ValueError, match="solver"):
            op.soft(tf.constant(GOOD), tf.constant(GOOD), solver=solver)

    @pytest.mark.parametrize("axis", [2, -3, 10])
    @pytest.mark.parametrize("op", OPS, ids=repr)
    def test_axis_out_of_range(self, op, axis):
        with pytest.raises(ValueError, match="axis"):
            op.soft(tf.constant(GOOD), tf.constant(GOOD), axis=axis)

    def test_scalar_x_raises(self):
        with pytest.raises(ValueError, match="at least one dimension"):
            soft_sort(tf.constant(1.0))

    def test_dynamic_length_raises(self):
        fn = graph(lambda a: soft_sort(a), input_signature=[tf.TensorSpec([2, None], tf.float32)])
        with pytest.raises(ValueError, match="statically known length"):
            fn.get_concrete_function()


# --------------------------------------------------------------------------------------------
# Precision of soft_sort_with with mixed dtypes.
# --------------------------------------------------------------------------------------------


def test_sort_with_keeps_float64_values_exact_with_float32_scores():
    values = tf.constant([1.0 + 1e-10, 2.0, 3.0 - 1e-10], tf.float64)
    scores = tf.constant([0.0, 1.0, 2.0], tf.float32)
    got = soft_sort_with(values, scores, epsilon=1e-4)
    assert got.dtype == tf.float64
    np.testing.assert_allclose(got.numpy(), values.numpy(), rtol=0, atol=1e-13)
