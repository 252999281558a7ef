"""What the benchmark scripts share: the backend chosen on the command line, and timing.

`select_backend()` must run before Keras is imported (Keras reads `KERAS_BACKEND` once); the
timing helpers import Keras when first called.
"""

from __future__ import annotations

import os
import sys
import time

BACKENDS = ("tensorflow", "jax", "torch")


def select_backend() -> str:
    """Sets `KERAS_BACKEND` from `--backend` (else keeps it, else "tensorflow"), and holds
    TensorFlow's C++ logs to errors unless `TF_CPP_MIN_LOG_LEVEL` is set; returns the name."""
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    for i, argument in enumerate(sys.argv):
        if argument == "--backend" and i + 1 < len(sys.argv):
            backend = sys.argv[i + 1]
        elif argument.startswith("--backend="):
            backend = argument.split("=", 1)[1]
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return backend


def block(structure) -> None:
    """Waits for every result (JAX dispatches asynchronously) by reading it back."""
    import keras
    import numpy as np

    for value in keras.tree.flatten(structure):
        np.asarray(keras.ops.convert_to_numpy(value))


def median_ms(fn, *args, repeats: int) -> float:
    """Median milliseconds of `fn(*args)` over `repeats` runs, after one warm-up call (which
    traces and compiles)."""
    import numpy as np

    block(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def backend_versions() -> str:
    """The active Keras backend's framework and version, e.g. "TensorFlow 2.21.0"."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return f"TensorFlow {tf.__version__}"
    if backend == "jax":
        import jax

        return f"JAX {jax.__version__}"
    import torch

    return f"PyTorch {torch.__version__}"


def epoch_timer():
    """A Keras callback that records each epoch's seconds in `.seconds` (from the start of
    `fit`); `.steady_state(instances)` is instances per second over the median epoch after
    the first, which traces and compiles."""
    import keras
    import numpy as np

    class EpochTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._start)

        def steady_state(self, instances: int) -> float:
            return instances / float(np.median(self.seconds[1:]))

    return EpochTimer()


def publish(table: str, output: str | None) -> None:
    """Prints a benchmark's table and, where `output` names a file, writes it there too."""
    print(table)
    if output:
        os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
        with open(output, "w") as handle:
            handle.write(table)
