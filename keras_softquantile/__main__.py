"""Command-line demo: `python -m keras_softquantile demo` (or `keras-softquantile demo`).

It runs the seed problem end to end on generated data: values `A` (instances x n), features
`B` (instances x n x M), a planted `theta*` with `A = B @ theta* + noise`, scores
`C = B @ theta`, and an objective of the values in the lower and upper quartiles of `C`
(by default the spread `mean(A_low) - mean(A_high)`, minimised: a long-short quartile
portfolio). It shows that the hard selection's gradient is exactly zero, trains
`QuantileObjectiveModel` with `fit` (progress bar, TensorBoard logs, epsilon annealing) and
compares the hard objective at the start, after training, for `theta*` and for least squares.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

OBJECTIVES = ("spread", "rank_weighted_spread")


def _hard_gradient_norms(tf, A, B, theta, quantile: float) -> dict[str, float]:
    """Gradient norms of the hard-selection spread with respect to theta (both are zero)."""
    n = A.shape[-1]
    k = int(quantile * n)
    theta = tf.Variable(theta)
    norms = {}
    with tf.GradientTape(persistent=True) as tape:
        scores = tf.linalg.matvec(B, theta)
        order = tf.argsort(scores, axis=-1)
        by_argsort = tf.gather(A, order, batch_dims=1)
        argsort_spread = tf.reduce_mean(by_argsort[:, :k]) - tf.reduce_mean(by_argsort[:, -k:])
        top = tf.math.top_k(scores, k).indices
        bottom = tf.math.top_k(-scores, k).indices
        top_k_spread = tf.reduce_mean(tf.gather(A, bottom, batch_dims=1)) - tf.reduce_mean(
            tf.gather(A, top, batch_dims=1)
        )
    for name, value in (("tf.argsort", argsort_spread), ("tf.math.top_k", top_k_spread)):
        gradient = tape.gradient(value, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        norms[name] = float(tf.norm(gradient))
    return norms


def demo(args: argparse.Namespace) -> int:
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_softquantile as ksq

    rng = np.random.default_rng(args.seed)
    B = rng.standard_normal((args.instances, args.n, args.features)).astype("float32")
    theta_star = rng.standard_normal(args.features).astype("float32")
    noise = args.noise * rng.standard_normal((args.instances, args.n))
    A = (B @ theta_star + noise).astype("float32")
    theta_start = rng.standard_normal(args.features).astype("float32")

    norms = _hard_gradient_norms(tf, A, B, theta_start, args.quantile)
    print("Hard quartile selection: gradient of the spread with respect to theta")
    for name, norm in norms.items():
        print(f"  through {name:<14} norm {norm:.1f}  (the selection is piecewise constant)")

    output = "sorted" if args.objective == "rank_weighted_spread" else "weights"
    model = ksq.QuantileObjectiveModel(
        args.objective,
        num_features=args.features,
        quantile=args.quantile,
        epsilon=args.epsilon,
        output=output,
        gradient_estimator=args.estimator,
        seed=args.seed,
    )
    model.compile(optimizer=keras.optimizers.Adam(args.learning_rate))
    model.build((None, args.n, args.features))
    model.theta.assign(theta_start)

    def hard_objective(theta) -> float:
        model.theta.assign(theta)
        metrics = model.evaluate(x=(A, B), batch_size=len(A), verbose=0, return_dict=True)
        return metrics["hard_objective"]

    logdir = args.logdir or os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    callbacks = [
        ksq.callbacks.EpsilonAnnealing(start=10 * args.epsilon, end=args.epsilon),
        keras.callbacks.TensorBoard(logdir),
        ksq.callbacks.SelectionMonitor(
            logdir, (A[:4], B[:4]), every_n_epochs=max(1, args.epochs // 5)
        ),
    ]
    print(
        f"\nTraining QuantileObjectiveModel({args.objective!r}, output={output!r}, "
        f"gradient_estimator={args.estimator!r}) on {args.instances} instances of "
        f"n={args.n}, M={args.features}; epsilon annealed {10 * args.epsilon:g} -> "
        f"{args.epsilon:g}.\nTensorBoard logs: {logdir}  (view: tensorboard --logdir {logdir})\n"
    )
    start = time.perf_counter()
    model.fit(
        x=(A, B),
        batch_size=args.batch_size,
        epochs=args.epochs,
        callbacks=callbacks,
        verbose=1 if sys.stdout.isatty() else 2,
    )
    elapsed = time.perf_counter() - start

    trained = keras.ops.convert_to_numpy(model.theta).copy()
    least_squares = np.linalg.lstsq(B.reshape(-1, args.features), A.reshape(-1), rcond=None)[
        0
    ].astype("float32")
    rows = [
        ("start", theta_start),
        ("after training", trained),
        ("planted theta*", theta_star),
        ("least squares", least_squares),
    ]
    print(f"\nTrained {args.epochs} epochs in {elapsed:.1f} s.\n")
    print(f"| theta | hard {args.objective} (lower is better) |\n|---|---|")
    for name, theta in rows:
        print(f"| {name} | {hard_objective(theta):+.4f} |")
    model.theta.assign(trained)
    print(f"\nTensorBoard logs: {logdir}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer. Received: {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0. Received: {text}")
    return value


def _quantile(text: str) -> float:
    value = float(text)
    if not 0 < value <= 0.5:
        raise argparse.ArgumentTypeError(f"must lie in (0, 0.5]. Received: {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keras-softquantile", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "demo", help="learn theta so that the quartiles of B @ theta minimise f(A_low, A_high)"
    )
    run.add_argument("--n", type=_positive_int, default=200, help="entries per instance")
    run.add_argument("--features", type=_positive_int, default=20, help="number of features M")
    run.add_argument("--instances", type=_positive_int, default=64, help="number of instances")
    run.add_argument("--epochs", type=_positive_int, default=25, help="training epochs")
    run.add_argument("--batch-size", type=_positive_int, default=8, help="instances per step")
    run.add_argument(
        "--epsilon", type=_positive_float, default=1e-2, help="final selection temperature"
    )
    run.add_argument("--objective", choices=OBJECTIVES, default="spread")
    run.add_argument("--estimator", choices=("ot", "perturbed"), default="ot")
    run.add_argument("--quantile", type=_quantile, default=0.25, help="level q in (0, 0.5]")
    run.add_argument("--noise", type=float, default=1.0, help="noise standard deviation in A")
    run.add_argument("--learning-rate", type=_positive_float, default=0.05)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--logdir", default=None, help="TensorBoard directory (./runs/<timestamp>)")
    args = parser.parse_args(argv)
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
