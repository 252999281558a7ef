"""Forward+backward cost of each loss in `keras_softquantile.losses` next to mean squared error.

One batch of 256 lists of 100 entries (float32), the same for every loss, on the Keras backend
chosen with `--backend` (tensorflow, jax or torch). For each loss it times the value and the
gradient with respect to `y_pred`: on TensorFlow as a `tf.function` with and without XLA
("graph", what Keras's `fit` runs on CPU and under `tf.distribute`, and "XLA"), on JAX under
`jax.jit` of `jax.value_and_grad`, on PyTorch eagerly with `torch.autograd.grad`. The
baseline, measured in the same run and the same mode, is `keras.losses.MeanSquaredError` on
the same `y_pred`; the ratio column divides by it. Times are medians over `--repeats` runs
after a warm-up. The machines are shared and noisy: compare the ratios, not the milliseconds
across runs.

What each loss gets (`y_true`, `y_pred`):
  * MeanSquaredError, TrimmedRegressionLoss(0.1), QuantileRegressionLoss(0.5): targets and
    predictions `[256, 100]` (the regression losses select across the 256 examples, each
    with the mean squared error of its 100 outputs);
  * QuantileObjective: values `A` and scores `[256, 100]` (quartile spread);
  * SpearmanLoss, SoftNDCGLoss(k=10): graded labels 0..4 and scores `[256, 100]`;
  * TopKCrossEntropy(k=5): class ids `[256]` and logits `[256, 100]` (100 classes).

Usage:
    python benchmarks/bench_losses.py                       # TensorFlow, table to stdout
    python benchmarks/bench_losses.py --backend jax --output benchmarks/results/bench_losses_jax.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

from _harness import BACKENDS, backend_versions, median_ms, publish, select_backend

select_backend()

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_softquantile import losses  # noqa: E402

BACKEND = keras.backend.backend()
BATCH, LIST_SIZE = 256, 100


def cases(seed: int = 0) -> dict:
    """`{name: (loss, y_true, y_pred)}`, numpy inputs, the same `y_pred` for every loss."""
    rng = np.random.default_rng(seed)
    y_pred = rng.standard_normal((BATCH, LIST_SIZE)).astype("float32")
    targets = (y_pred + rng.standard_normal((BATCH, LIST_SIZE))).astype("float32")
    grades = rng.integers(0, 5, (BATCH, LIST_SIZE)).astype("float32")
    classes = rng.integers(0, LIST_SIZE, BATCH).astype("int32")
    return {
        "MeanSquaredError (baseline)": (keras.losses.MeanSquaredError(), targets, y_pred),
        "QuantileObjective('spread', 0.25)": (losses.QuantileObjective(), targets, y_pred),
        "SpearmanLoss": (losses.SpearmanLoss(), grades, y_pred),
        "SoftNDCGLoss(k=10)": (losses.SoftNDCGLoss(k=10), grades, y_pred),
        "TopKCrossEntropy(k=5)": (losses.TopKCrossEntropy(k=5), classes, y_pred),
        "TrimmedRegressionLoss(0.1)": (losses.TrimmedRegressionLoss(0.1), targets, y_pred),
        "QuantileRegressionLoss(0.5)": (losses.QuantileRegressionLoss(0.5), targets, y_pred),
    }


def value_and_gradient(loss) -> dict:
    """`{mode: fn(y_true, y_pred) -> (loss, d loss / d y_pred)}` for the active backend."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        def step(y_true, y_pred):
            with tf.GradientTape() as tape:
                tape.watch(y_pred)
                value = loss(y_true, y_pred)
            return value, tape.gradient(value, y_pred)

        return {"graph": tf.function(step), "XLA": tf.function(step, jit_compile=True)}
    if BACKEND == "jax":
        import jax

        grad = jax.value_and_grad(lambda y_pred, y_true: loss(y_true, y_pred))
        return {"jit": jax.jit(lambda y_true, y_pred: grad(y_pred, y_true))}
    import torch

    def torch_step(y_true, y_pred):
        y_pred = y_pred.detach().requires_grad_(True)
        value = loss(y_true, y_pred)
        return value.detach(), torch.autograd.grad(value, y_pred)[0]

    return {"eager": torch_step}


def measure(repeats: int) -> list[dict]:
    """One row per loss: its median milliseconds per mode and the ratio to the baseline."""
    rows = []
    baseline = None
    for name, (loss, y_true, y_pred) in cases().items():
        y_true = keras.ops.convert_to_tensor(y_true)
        y_pred = keras.ops.convert_to_tensor(y_pred)
        functions = value_and_gradient(loss)
        value, gradient = functions[next(iter(functions))](y_true, y_pred)
        finite = bool(np.isfinite(keras.ops.convert_to_numpy(gradient)).all())
        times = {
            mode: median_ms(fn, y_true, y_pred, repeats=repeats) for mode, fn in functions.items()
        }
        if baseline is None:
            baseline = times
        rows.append(
            {
                "loss": name,
                "ms": times,
                "ratio": {mode: times[mode] / baseline[mode] for mode in times},
                "value": float(keras.ops.convert_to_numpy(value)),
                "finite": finite,
            }
        )
        print(f"measured {name}", file=sys.stderr, flush=True)
    return rows


def format_table(rows: list[dict]) -> str:
    modes = list(rows[0]["ms"])
    header = (
        "| loss | "
        + " | ".join(f"{mode} fwd+bwd (ms)" for mode in modes)
        + " | "
        + " | ".join(f"{mode} / MSE" for mode in modes)
        + " | loss value | gradient finite |\n"
        + "|---" * (2 * len(modes) + 3)
        + "|"
    )
    lines = [header]
    for r in rows:
        ms = " | ".join(f"{r['ms'][mode]:.3f}" for mode in modes)
        ratio = " | ".join(f"{r['ratio'][mode]:.1f}x" for mode in modes)
        lines.append(f"| {r['loss']} | {ms} | {ratio} | {r['value']:.4f} | {r['finite']} |")
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Keras backend {BACKEND} ({backend_versions()}), float32, batch {BATCH} x {LIST_SIZE}"
    )
    return "\n".join(lines) + f"\n\nMachine: {machine}. Times are medians.\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=BACKEND,
        help="Keras backend (default: KERAS_BACKEND, else tensorflow)",
    )
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--output", help="also write the table (markdown) to this file")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1. Received: {args.repeats}")
    table = format_table(measure(args.repeats))
    publish(table, args.output)


if __name__ == "__main__":
    main()
