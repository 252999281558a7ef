"""Generated problems with a planted theta* (A = B @ theta* + noise), for tests/models and
tests/backends: on keras and numpy only, so they serve every backend."""

import keras
import numpy as np


def planted_problem(instances=32, n=100, features=5, noise=1.0, seed=0):
    """Values A [instances, n], features B [instances, n, features] and theta*."""
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((instances, n, features)).astype("float32")
    theta_star = rng.standard_normal(features).astype("float32")
    A = (B @ theta_star + noise * rng.standard_normal((instances, n))).astype("float32")
    return A, B, theta_star


def hard_spread(A, B, theta, quantile=0.25):
    """mean(A_low) - mean(A_high) over the hard quantiles of B @ theta, averaged over rows."""
    scores = B @ theta
    k = int(np.floor(quantile * A.shape[-1] + 1e-9))
    ordered = np.take_along_axis(A, np.argsort(scores, axis=-1, kind="stable"), axis=-1)
    return float(np.mean(ordered[:, :k].mean(-1) - ordered[:, -k:].mean(-1)))


class Interrupt(keras.callbacks.Callback):
    """Stops `fit` at the start of epoch `epoch` by raising, as a lost worker would."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("interrupted")
