"""Inputs shared by the layer tests."""

import numpy as np


def distinct_scores(rng, shape, gap: float = 0.3):
    """Scores whose entries along the last axis are well apart (stable under float16)."""
    n = shape[-1]
    base = np.arange(n, dtype="float64") * gap
    rows = np.stack([rng.permutation(base) for _ in range(int(np.prod(shape[:-1])))])
    return rows.reshape(shape).astype("float32")
