"""Hypothesis generators of score rows for the property suite (`test_properties.py`).

Every generator builds rows of *finite* scores from one of a few families meant to break a
soft selection: ties, constant rows, heavy tails, outliers, near-overflow and denormal
magnitudes, mixed signs. Rows are drawn element by element from hypothesis primitives (floats,
integers, sampled values), so a failure shrinks to a short row of simple numbers.

A drawn batch is a `Scores`: a `[rows, n]` numpy array in float32 or float64, each row from its
own family. Its repr is valid Python that rebuilds the exact array, so a falsifying example
printed by hypothesis can be pasted into a regression test.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

__all__ = [
    "DTYPES",
    "EPSILONS",
    "FAMILIES",
    "Scores",
    "bulk_with_outliers",
    "epsilons",
    "flush_subnormals",
    "has_subnormals",
    "lengths",
    "levels",
    "scores",
    "split_quantiles",
    "topk_sizes",
]

DTYPES = ("float32", "float64")
EPSILONS = {
    "float32": (1e-1, 1e-2, 1e-3, 1e-4, 1e-5),
    "float64": (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6),
}
SHORT_LENGTHS = (1, 2, 3, 5, 7)
MEDIUM_MAX = 64

# Near-overflow magnitudes: the 3e38 and 1e300, and the largest finite number.
HUGE = {
    "float32": (3e38, float(np.finfo(np.float32).max)),
    "float64": (1e300, float(np.finfo(np.float64).max)),
}
# A subnormal unit: integer multiples of it (up to 50) stay subnormal and distinct.
DENORMAL = {"float32": 1e-40, "float64": 1e-310}
OUTLIERS = (1e30, -1e30, 1e9, -1e9)


class Scores:
    """A `[rows, n]` batch of finite scores, each row drawn from the named family.

    (A plain class, not a dataclass, so that hypothesis prints it with `__repr__`, exactly.)
    """

    def __init__(self, values: np.ndarray, dtype: str, families: tuple[str, ...]):
        self.values = np.asarray(values, dtype)
        self.dtype = dtype
        self.families = tuple(families)

    @property
    def n(self) -> int:
        return self.values.shape[-1]

    @property
    def rows(self) -> int:
        return self.values.shape[0]

    @property
    def seen(self) -> np.ndarray:
        """The values as TensorFlow computes with them: subnormals flushed to zero."""
        return flush_subnormals(self.values)

    def with_values(self, values: np.ndarray) -> Scores:
        return Scores(values, self.dtype, self.families)

    def __repr__(self) -> str:
        # tolist() gives Python floats that convert back to the same float32/float64 values.
        return (
            f"Scores(np.array({self.values.tolist()!r}, np.{self.dtype}), "
            f"{self.dtype!r}, {self.families!r})"
        )


def flush_subnormals(values: np.ndarray) -> np.ndarray:
    """`values` with subnormal entries replaced by zero.

    TensorFlow runs its CPU kernels (eager, graph and XLA, float32 and float64) with the
    flush-to-zero and denormals-are-zero modes on: `1e-40 * 1.0` is 0 and `tf.sort` treats
    1e-40, 0 and -1e-40 as equal. The ops cannot tell subnormal scores from zero, so the tests'
    expectations are computed on the scores as TensorFlow sees them.
    """
    values = np.asarray(values)
    tiny = np.finfo(values.dtype).tiny
    return np.where(np.abs(values) < tiny, np.zeros_like(values), values)


def has_subnormals(values: np.ndarray) -> bool:
    values = np.asarray(values)
    return bool(np.any((values != 0) & (np.abs(values) < np.finfo(values.dtype).tiny)))


def _floats(low: float, high: float, dtype: str) -> st.SearchStrategy[float]:
    return st.floats(
        low,
        high,
        width=32 if dtype == "float32" else 64,
        allow_nan=False,
        allow_infinity=False,
        allow_subnormal=False,
    )


def _row(elements: st.SearchStrategy, n: int, unique: bool) -> st.SearchStrategy[list]:
    return st.lists(elements, min_size=n, max_size=n, unique=unique)


# ---------------------------------------------------------------------------------------------
# Families. Each takes (n, dtype, unique) and returns a strategy of 1-D float64 arrays of
# length n whose values are exactly representable in `dtype` (cast by `scores`).
# ---------------------------------------------------------------------------------------------


def bulk(n: int, dtype: str, unique: bool = False):
    """Ordinary scores in [-10, 10]."""
    return _row(_floats(-10, 10, dtype), n, unique).map(np.array)


def ties(n: int, dtype: str, unique: bool = False):
    """Rows drawn from a pool of one to three values: many ties, across every boundary."""
    assert not unique, "ties cannot be distinct"

    @st.composite
    def build(draw):
        pool = draw(st.lists(_floats(-10, 10, dtype), min_size=1, max_size=3, unique=True))
        return np.array(draw(_row(st.sampled_from(pool), n, False)))

    return build()


def constant(n: int, dtype: str, unique: bool = False):
    """One value repeated: ordinary, outlier, near-overflow or denormal."""
    assert not unique, "a constant row cannot be distinct"
    special = st.sampled_from((0.0, *OUTLIERS, *HUGE[dtype], DENORMAL[dtype], -DENORMAL[dtype]))
    value = st.one_of(_floats(-10, 10, dtype), special)
    return value.map(lambda v: np.full(n, v))


def heavy_tails(n: int, dtype: str, unique: bool = False):
    """Cauchy, cubed Cauchy and Pareto samples, by inverse CDF of drawn uniforms."""

    @st.composite
    def build(draw):
        kind = draw(st.sampled_from(("cauchy", "cubed_cauchy", "pareto")))
        u = np.array(draw(_row(st.floats(1e-6, 1 - 1e-6), n, unique)))
        if kind == "pareto":
            alpha = draw(st.sampled_from((0.5, 1.0, 2.0)))
            return (1 - u) ** (-1 / alpha)
        cauchy = np.tan(math.pi * (u - 0.5))
        return cauchy**3 if kind == "cubed_cauchy" else cauchy

    return build()


def outliers(n: int, dtype: str, unique: bool = False):
    """A bulk in [0, 10] with one or two outliers of +-1e30 or +-1e9 at drawn positions."""

    @st.composite
    def build(draw):
        row = np.array(draw(_row(_floats(0, 10, dtype), n, unique)))
        count = draw(st.integers(1, min(2, n)))
        positions = draw(
            st.lists(st.integers(0, n - 1), min_size=count, max_size=count, unique=True)
        )
        values = draw(
            st.lists(st.sampled_from(OUTLIERS), min_size=count, max_size=count, unique=unique)
        )
        row[positions] = values
        return row

    return build()


def near_overflow(n: int, dtype: str, unique: bool = False):
    """Entries of magnitude 3e38 (float32) or 1e300 (float64), up to the largest finite
    number, mixed with ordinary scores; at least one huge entry per row."""
    huge = HUGE[dtype]
    big = st.sampled_from((*tuple(s * h for h in huge for s in (1, -1)), huge[0] / 3, -huge[0] / 2))

    @st.composite
    def build(draw):
        row = np.array(draw(_row(st.one_of(big, _floats(-10, 10, dtype)), n, unique)))
        if not np.any(np.abs(row) >= 1e30):
            position = draw(st.integers(0, n - 1))
            candidates = [v for v in (huge[0], -huge[0], huge[1], -huge[1]) if v not in row]
            row[position] = draw(st.sampled_from(candidates))
        return row

    return build()


def denormals(n: int, dtype: str, unique: bool = False):
    """Subnormal numbers (multiples of 1e-40 in float32, 1e-310 in float64) and zeros."""
    unit = DENORMAL[dtype]
    return _row(st.integers(-50, 50), n, unique).map(lambda k: np.array(k, np.float64) * unit)


def mixed_signs(n: int, dtype: str, unique: bool = False):
    """Both signs over many orders of magnitude: +-m * 10**e."""
    reach = 20 if dtype == "float32" else 100
    element = st.builds(
        lambda sign, mantissa, exponent: sign * mantissa * 10.0**exponent,
        st.sampled_from((1.0, -1.0)),
        st.floats(1, 10),
        st.integers(-reach, reach),
    )
    return _row(element, n, unique).map(np.array)


def grid(n: int, dtype: str, unique: bool = False):
    """Integers in [-2048, 2048] times 2**e: shifts and power-of-two scalings by numbers on
    the same grid are exact in both dtypes (used for the exact invariance tests)."""

    @st.composite
    def build(draw):
        exponent = draw(st.integers(-60, 60))
        k = np.array(draw(_row(st.integers(-2048, 2048), n, unique)), np.float64)
        return k * 2.0**exponent

    return build()


FAMILIES = {
    "bulk": bulk,
    "ties": ties,
    "constant": constant,
    "heavy_tails": heavy_tails,
    "outliers": outliers,
    "near_overflow": near_overflow,
    "denormals": denormals,
    "mixed_signs": mixed_signs,
    "grid": grid,
}
ALL_FAMILIES = tuple(FAMILIES)
# Denormal rows are not distinct as TensorFlow sees them (see `flush_subnormals`).
DISTINCT_FAMILIES = tuple(f for f in FAMILIES if f not in ("ties", "constant", "denormals"))
TIED_FAMILIES = ("ties", "constant", "denormals", "grid")


def lengths(max_length: int = MEDIUM_MAX) -> st.SearchStrategy[int]:
    """Short rows (n = 1, 2, 3, 5, 7) first, then medium ones up to `max_length`."""
    short = st.sampled_from([n for n in SHORT_LENGTHS if n <= max_length])
    if max_length < 8:
        return short
    return st.one_of(short, st.integers(8, max_length))


@st.composite
def scores(
    draw,
    *,
    dtypes: tuple[str, ...] = DTYPES,
    families: tuple[str, ...] = ALL_FAMILIES,
    n: int | st.SearchStrategy[int] | None = None,
    min_length: int = 1,
    max_length: int = MEDIUM_MAX,
    min_rows: int = 1,
    max_rows: int = 3,
    distinct: bool = False,
) -> Scores:
    """A batch of `min_rows` to `max_rows` rows of the same length, each from a drawn family.

    With `distinct=True` every row holds distinct values, subnormals counted as zero
    (families with ties, and denormals, excluded).
    """
    dtype = draw(st.sampled_from(dtypes))
    if n is None:
        n = draw(lengths(max_length).filter(lambda m: m >= min_length))
    elif not isinstance(n, int):
        n = draw(n)
    if distinct:
        families = tuple(f for f in families if f in DISTINCT_FAMILIES)
    count = draw(st.integers(min_rows, max_rows))
    rows, names = [], []
    for _ in range(count):
        family = draw(st.sampled_from(families))
        row = draw(FAMILIES[family](n, dtype, distinct))
        with np.errstate(over="ignore"):
            row = row.astype(dtype)
        if distinct and len(np.unique(flush_subnormals(row))) < n:  # the cast merged values
            row = draw(FAMILIES["bulk"](n, dtype, True)).astype(dtype)
            family = "bulk"
        assert np.all(np.isfinite(row)), (family, row)
        rows.append(row)
        names.append(family)
    return Scores(np.stack(rows), dtype, tuple(names))


@st.composite
def bulk_with_outliers(draw, *, dtypes: tuple[str, ...] = DTYPES) -> Scores:
    """One row: a majority of distinct integers in [0, 20] (at least 3 next to one outlier, 5
    next to two) and one or two distinct outliers of +-1e9, +-1e30 or the dtype's near-overflow
    magnitude (3e38, 1e300), shuffled."""
    dtype = draw(st.sampled_from(dtypes))
    count = draw(st.integers(1, 2))
    size = draw(st.integers(2 * count + 1, 20))
    bulk = draw(st.lists(st.integers(0, 20), min_size=size, max_size=size, unique=True))
    magnitudes = (1e9, 1e30, HUGE[dtype][0])
    signed = tuple(sign * m for m in magnitudes for sign in (1.0, -1.0))
    far = draw(st.lists(st.sampled_from(signed), min_size=count, max_size=count, unique=True))
    order = draw(st.permutations(range(size + count)))
    values = np.array([float(v) for v in bulk] + far)[list(order)]
    return Scores(values[None, :], dtype, ("bulk_with_outliers",))


def epsilons(dtype: str, *, below: float | None = None) -> st.SearchStrategy[float]:
    """An epsilon of the dtype's set ({1e-1 .. 1e-5}, plus 1e-6 in float64), optionally only
    those at most `below`."""
    choices = [e for e in EPSILONS[dtype] if below is None or e <= below * (1 + 1e-9)]
    return st.sampled_from(choices)


def levels() -> st.SearchStrategy[tuple[float, ...]]:
    """Strictly increasing quantile levels in (0, 1): the quartiles, or 1 to 4 drawn levels."""
    drawn = st.lists(st.integers(1, 999), min_size=1, max_size=4, unique=True).map(
        lambda ks: tuple(k / 1000 for k in sorted(ks))
    )
    return st.one_of(st.just((0.25, 0.75)), drawn)


def topk_sizes(n: int) -> st.SearchStrategy[float]:
    """k in [0, n]: whole numbers or fractional."""
    return st.one_of(st.integers(0, n).map(float), st.floats(0, n))


def split_quantiles() -> st.SearchStrategy[float]:
    """The level q of `soft_quantile_split`, in (0, 0.5]."""
    return st.one_of(st.sampled_from((0.25, 0.5, 0.1)), st.floats(0.01, 0.5))
