import keras
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _float32_policy():
    """Every test starts and ends under the float32 policy, whatever it did."""
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def distinct_scores(rng, shape, gap: float = 0.3):
    """Scores whose entries along the last axis are well apart (stable under float16)."""
    n = shape[-1]
    base = np.arange(n, dtype="float64") * gap
    rows = np.stack([rng.permutation(base) for _ in range(int(np.prod(shape[:-1])))])
    return rows.reshape(shape).astype("float32")
