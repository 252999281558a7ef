"""Cost and gradient variance of the two gradient estimators of the quantile split.

For the quartile spread `mean(A_low) - mean(A_high)` of a batch of instances, it measures the
gradient with respect to the scores by

  * the OT estimator, `soft_quantile_split(..., epsilon)`: entropic transport with exact
    implicit gradients (deterministic);
  * the perturbed estimator, `perturbed_quantile_split(..., sigma, num_samples)`: Monte-Carlo
    averages of hard selections of noisy scores (Berthet et al., 2020), for several
    `num_samples`.

For each, in one run: the median time of one forward+backward pass (`tf.function`, graph
mode, after a warm-up), the relative variance of the gradient over `--draws` seeds
(`E|g - E g|^2 / |E g|^2`, with `|E g|^2` estimated without the noise of the mean of the
draws; 0 for the deterministic OT estimator), and the cosine between
the gradient and a reference: the mean of the perturbed gradients at the largest
`num_samples`. `epsilon` and `sigma` are both in quantile-level units but smooth differently,
so by default `sigma` is calibrated to give the same sharpness as `epsilon` (the `sharpness`
column: the mean absolute difference of the soft upper-quartile mask from the hard one).

Usage:
    python benchmarks/bench_estimators.py
    python benchmarks/bench_estimators.py --sizes 32x200 --samples 10 100 --output out.md
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

from keras_softquantile import ops


def parse_size(text: str) -> tuple[int, int]:
    batch, n = text.lower().split("x")
    return int(batch), int(float(n))


def build(values, estimator: str, temperature: float, num_samples: int | None):
    @tf.function
    def gradient(scores, seed):
        with tf.GradientTape() as tape:
            tape.watch(scores)
            if estimator == "ot":
                low_w, high_w = ops.soft_quantile_split(values, scores, 0.25, epsilon=temperature)
            else:
                low_w, high_w = ops.perturbed_quantile_split(
                    values, scores, 0.25, sigma=temperature, num_samples=num_samples, seed=seed
                )
            # The spread of the weighted means (both selections hold n / 4 of mass).
            loss = tf.reduce_sum((low_w - high_w) * values) / (0.25 * values.shape[-1])
        return tape.gradient(loss, scores), tf.stop_gradient(high_w)

    return gradient


def median_time(function, *args, repeats: int) -> float:
    function(*args)  # warm-up and trace
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function(*args)
        tf.nest.map_structure(lambda t: t.numpy(), result)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def calibrate_sigma(values, scores, hard_high, epsilon: float) -> float:
    """The sigma whose perturbed mask is as sharp as the OT mask at `epsilon`.

    Sharpness (mean absolute difference from the hard mask) is close to linear in both
    temperatures, so two secant steps from sigma = epsilon suffice.
    """
    _, ot_high = ops.soft_quantile_split(values, scores, 0.25, epsilon=epsilon)
    target = float(tf.reduce_mean(tf.abs(ot_high - hard_high)))
    sigma = epsilon
    for _ in range(2):
        _, high = ops.perturbed_quantile_split(
            values, scores, 0.25, sigma=sigma, num_samples=2000, seed=(0, 1)
        )
        sigma *= target / float(tf.reduce_mean(tf.abs(high - hard_high)))
    return sigma


def measure(batch: int, n: int, args) -> list[dict]:
    rng = np.random.default_rng(0)
    scores = tf.constant(rng.standard_normal((batch, n)), tf.float32)
    values = tf.constant(rng.standard_normal((batch, n)), tf.float32)
    hard_high = tf.cast(
        scores >= tf.sort(scores, axis=-1)[:, n - n // 4 : n - n // 4 + 1], tf.float32
    )
    sigma = args.sigma or calibrate_sigma(values, scores, hard_high, args.epsilon)
    runs = [("ot", args.epsilon, None)] + [("perturbed", sigma, s) for s in args.samples]
    rows = []
    reference = None
    draws_by_run = {}
    for estimator, temperature, samples in reversed(runs):
        function = build(values, estimator, temperature, samples)
        seeds = [tf.constant([d, 17], tf.int32) for d in range(args.draws)]
        draws = [function(scores, seed) for seed in seeds[: 1 if estimator == "ot" else None]]
        gradients = np.stack([g.numpy().ravel() for g, _ in draws])
        mean = gradients.mean(0)
        if reference is None:
            reference = mean  # perturbed at the largest num_samples
        draws_count = len(gradients)
        spread = ((gradients - mean) ** 2).sum() / max(draws_count - 1, 1)  # E|g - E g|^2
        # |E g|^2, less the noise that the mean of a few draws still carries.
        signal = mean @ mean - spread / draws_count
        variance = float(spread / signal) if signal > 0 else float("inf")
        sharpness = float(tf.reduce_mean(tf.abs(draws[0][1] - hard_high)))
        seconds = median_time(function, scores, seeds[0], repeats=args.repeats)
        draws_by_run[(estimator, samples)] = gradients
        rows.append(
            {
                "size": f"{batch}x{n}",
                "estimator": estimator if samples is None else f"perturbed, S={samples}",
                "temperature": f"epsilon={temperature:g}"
                if samples is None
                else f"sigma={temperature:g}",
                "ms": 1e3 * seconds,
                "variance": 0.0 if estimator == "ot" else variance,
                "cosine": float(
                    mean @ reference / np.linalg.norm(mean) / np.linalg.norm(reference)
                ),
                "sharpness": sharpness,
            }
        )
    rows.reverse()
    base = rows[0]["ms"]
    for row in rows:
        row["cost"] = row["ms"] / base
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["32x200", "1x10000"])
    parser.add_argument("--samples", nargs="+", type=int, default=[10, 100, 1000])
    parser.add_argument("--epsilon", type=float, default=0.02)
    parser.add_argument(
        "--sigma", type=float, default=None, help="default: matched to epsilon's sharpness"
    )
    parser.add_argument("--draws", type=int, default=20, help="seeds for the variance")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    lines = [
        "| size | estimator | temperature | fwd+bwd ms | cost vs OT | relative gradient "
        "variance | cosine to reference | sharpness |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in args.sizes:
        for row in measure(*parse_size(size), args):
            lines.append(
                f"| {row['size']} | {row['estimator']} | {row['temperature']} | "
                f"{row['ms']:.2f} | {row['cost']:.1f}x | {row['variance']:.3g} | "
                f"{row['cosine']:.3f} | {row['sharpness']:.2e} |"
            )
            print(lines[-1], flush=True)
    machine = (
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, TensorFlow {tf.__version__}, "
        f"float32, graph mode. Times are medians of {args.repeats}; variance over "
        f"{args.draws} seeds; reference = mean perturbed gradient at S={max(args.samples)}."
    )
    table = "\n".join(lines) + "\n\n" + machine + "\n"
    print("\n" + table)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
