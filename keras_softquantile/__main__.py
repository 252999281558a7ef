"""Command-line demo: `python -m keras_softquantile demo`.

It runs the seed problem end to end on generated data: values `A` (instances x n), features
`B` (instances x n x M), a planted `theta*`, scores `C = B @ theta` and the objective
`mean(A_low) - mean(A_high)` over the lower and upper quartiles of `C` (minimised: the
long-short quartile spread). It shows that the hard selection's gradient is exactly zero,
then minimises the soft objective with Adam and compares hard objectives.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _hard_objective(tf, A, scores, quantile: float):
    n = A.shape[-1]
    k = int(quantile * n)
    order = tf.argsort(scores, axis=-1)
    ordered = tf.gather(A, order, batch_dims=1)
    return tf.reduce_mean(tf.reduce_mean(ordered[:, :k], -1) - tf.reduce_mean(ordered[:, -k:], -1))


def demo(args: argparse.Namespace) -> int:
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_softquantile import ops

    rng = np.random.default_rng(args.seed)
    B = rng.standard_normal((args.instances, args.n, args.features))
    theta_star = rng.standard_normal(args.features)
    A = B @ theta_star + args.noise * rng.standard_normal((args.instances, args.n))
    A, B = tf.constant(A, tf.float32), tf.constant(B, tf.float32)
    theta = tf.Variable(rng.standard_normal(args.features), dtype=tf.float32, name="theta")
    theta_start = tf.constant(theta)

    def scores_of(t):
        return tf.linalg.matvec(B, t)

    with tf.GradientTape() as tape:
        hard = _hard_objective(tf, A, scores_of(theta), args.quantile)
    hard_gradient = tape.gradient(hard, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    print(
        f"hard quartile selection: objective {float(hard):+.4f}, "
        f"gradient norm {float(tf.norm(hard_gradient)):.1f} (argsort is piecewise constant)"
    )

    optimizer = keras.optimizers.Adam(learning_rate=args.learning_rate)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            low, high = ops.soft_quantile_split(
                A, scores_of(theta), args.quantile, epsilon=args.epsilon, output="mean"
            )
            loss = tf.reduce_mean(low - high)
        gradient = tape.gradient(loss, theta)
        optimizer.apply_gradients([(gradient, theta)])
        return loss, tf.norm(gradient)

    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        loss, norm = step()
        if epoch == 1 or epoch % max(1, args.epochs // 10) == 0 or epoch == args.epochs:
            print(
                f"step {epoch:4d}  soft objective {float(loss):+.4f}  "
                f"gradient norm {float(norm):.3f}"
            )
    elapsed = time.perf_counter() - start

    least_squares = np.linalg.lstsq(
        B.numpy().reshape(-1, args.features), A.numpy().reshape(-1), rcond=None
    )[0]
    rows = [
        ("start", theta_start),
        ("after training", theta),
        ("planted theta*", tf.constant(theta_star, tf.float32)),
        ("least squares", tf.constant(least_squares, tf.float32)),
    ]
    print(f"\ntrained {args.epochs} steps in {elapsed:.1f} s\n")
    print("| theta | hard objective (lower is better) |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {float(_hard_objective(tf, A, scores_of(value), args.quantile)):+.4f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keras-softquantile", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="minimise a quartile-spread objective on generated data")
    run.add_argument("--n", type=int, default=200, help="entries per instance")
    run.add_argument("--features", type=int, default=20, help="number of features M")
    run.add_argument("--instances", type=int, default=64, help="number of instances")
    run.add_argument("--epochs", type=int, default=200, help="optimisation steps")
    run.add_argument("--epsilon", type=float, default=1e-2, help="selection temperature")
    run.add_argument("--quantile", type=float, default=0.25, help="quantile level in (0, 0.5]")
    run.add_argument("--noise", type=float, default=1.0, help="noise added to A")
    run.add_argument("--learning-rate", type=float, default=0.05)
    run.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("n", "features", "instances", "epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer. Received: {getattr(args, name)}")
    if not 0 < args.quantile <= 0.5:
        parser.error(f"--quantile must lie in (0, 0.5]. Received: {args.quantile}")
    if not args.epsilon > 0:
        parser.error(f"--epsilon must be > 0. Received: {args.epsilon}")
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
