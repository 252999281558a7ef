"""Command-line demo: `python -m keras_softquantile demo` (or `keras-softquantile demo`).

It runs the seed problem end to end on generated data: values `A` (instances x n), features
`B` (instances x n x M), a planted `theta*` with `A = B @ theta* + noise`, scores
`C = B @ theta`, and an objective of the values in the lower and upper quartiles of `C`
(by default the spread `mean(A_low) - mean(A_high)`, minimised: a long-short quartile
portfolio). It shows that the hard selection's gradient is exactly zero, trains
`QuantileObjectiveModel` with `fit` (progress bar, TensorBoard logs, epsilon annealing) and
compares the hard objective at the start, after training, for `theta*` and for least squares.

`--backend` chooses the Keras backend (tensorflow, jax or torch; by default `KERAS_BACKEND`, or
tensorflow): the demo sets `KERAS_BACKEND` before it imports Keras.

The options are checked before anything is imported beyond the standard library (and NumPy,
to generate the data), so `--help` and a bad option answer at once; Keras and TensorFlow are
imported only to run the demo (TensorFlow also under the other backends: the TensorBoard logs
are written with it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from keras_softquantile import _tensorflow_logs

if TYPE_CHECKING:
    import numpy as np

OBJECTIVES = ("spread", "rank_weighted_spread")
ESTIMATORS = ("ot", "perturbed")
BACKENDS = ("tensorflow", "jax", "torch")

# The demo computes in float32. Its smallest epsilon is the package's minimum for float32
# scores, 8 machine epsilons (`keras_softquantile.ops._validation.epsilon_minimum`).
_EPSILON_MINIMUM = 8 * 2.0**-23
# Annealing starts at 10 x epsilon; the transport divides by it, and 1 / (10 x epsilon) must
# stay a normal float32 number (>= 2**-126), or the solver does not converge.
_EPSILON_MAXIMUM = 2.0**126 / 10
# `keras.utils.set_random_seed` seeds NumPy's global generator, which takes 32-bit seeds.
_SEED_MAXIMUM = 2**32 - 1
# Adam moves each parameter by at most `learning_rate * (1 - beta_1) / sqrt(1 - beta_2)` per
# step (Kingma and Ba, 2015, section 2.1); with Keras's defaults that is 3.17 x the rate.
_ADAM_STEP_BOUND = (1 - 0.9) / math.sqrt(1 - 0.999)


class _Problem(NamedTuple):
    """The demo's generated data (float32 NumPy arrays)."""

    values: np.ndarray
    """A `[instances, n]`."""
    features: np.ndarray
    """B `[instances, n, M]`."""
    theta_star: np.ndarray
    """The planted theta* `[M]`, with `A = B @ theta* + noise`."""
    theta_start: np.ndarray
    """The initial theta `[M]`."""


def _make_problem(args: argparse.Namespace) -> _Problem:
    """Generates the demo's data from `args.seed` (NumPy only).

    Args:
        args: the parsed `demo` options.

    Returns:
        The values, features, planted theta* and initial theta.
    """
    import numpy as np

    rng = np.random.default_rng(args.seed)
    B = rng.standard_normal((args.instances, args.n, args.features)).astype("float32")
    theta_star = rng.standard_normal(args.features).astype("float32")
    noise = args.noise * rng.standard_normal((args.instances, args.n))
    A = (B @ theta_star + noise).astype("float32")
    theta_start = rng.standard_normal(args.features).astype("float32")
    return _Problem(A, B, theta_star, theta_start)


# ----------------------------------------------------------------- TensorFlow's log lines


def _import_tensorflow_quietly() -> None:
    """Imports TensorFlow and Keras without TensorFlow's C++ log lines on a CPU machine.

    Sets TF_CPP_MIN_LOG_LEVEL to 3 (errors included: TensorFlow's real failures raise Python
    exceptions) unless the environment sets it, and hides the lines that TensorFlow writes on
    import regardless of it (`_tensorflow_logs.import_tensorflow`).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    _tensorflow_logs.import_tensorflow()
    if "tensorflow" not in sys.modules:
        # Keras on JAX or PyTorch: TensorFlow still writes the TensorBoard logs.
        with _tensorflow_logs.native_log_lines_hidden(_tensorflow_logs.min_log_level()):
            import tensorflow  # noqa: F401


# ----------------------------------------------------------------- the Keras backend


def _imported_backend() -> str | None:
    """The backend of the Keras already imported in this process, or None."""
    keras = sys.modules.get("keras")
    backend = getattr(getattr(keras, "backend", None), "backend", None)
    return backend() if callable(backend) else None


def _use_backend(backend: str) -> None:
    """Makes `backend` Keras's backend: sets KERAS_BACKEND before Keras is imported.

    Raises:
        RuntimeError: Keras is already imported with another backend (it cannot change).
    """
    imported = _imported_backend()
    if imported is not None and imported != backend:
        raise RuntimeError(
            f"Keras is already imported with the backend {imported!r}, and a process cannot "
            f"change it: run the demo in a new process. Received: backend={backend!r}"
        )
    os.environ["KERAS_BACKEND"] = backend


# ----------------------------------------------------------------- the demo


def _split_size(quantile: float, n: int) -> int:
    """The number of entries in each of the lower and upper buckets, `floor(quantile * n)`."""
    return math.floor(quantile * n + 1e-9)


def _smallest_n(quantile: float) -> int:
    """The smallest n whose lower and upper buckets hold at least one entry each."""
    n = max(1, math.ceil(1 / quantile) - 1)
    while _split_size(quantile, n) < 1:
        n += 1
    return n


def _hard_gradient_norms(backend: str, A, B, theta, quantile: float) -> dict[str, float]:
    """Gradient norms of the hard-selection spread with respect to theta (both are zero),
    through the backend's own argsort and top-k, differentiated by the backend."""
    k = _split_size(quantile, A.shape[-1])
    if backend == "jax":
        return _jax_hard_gradient_norms(A, B, theta, k)
    if backend == "torch":
        return _torch_hard_gradient_norms(A, B, theta, k)
    return _tensorflow_hard_gradient_norms(A, B, theta, k)


def _tensorflow_hard_gradient_norms(A, B, theta, k: int) -> dict[str, float]:
    import tensorflow as tf

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


def _jax_hard_gradient_norms(A, B, theta, k: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    def argsort_spread(theta):
        order = jnp.argsort(B @ theta, axis=-1)
        ordered = jnp.take_along_axis(A, order, axis=-1)
        return jnp.mean(ordered[:, :k]) - jnp.mean(ordered[:, -k:])

    def top_k_spread(theta):
        scores = B @ theta
        top = jax.lax.top_k(scores, k)[1]
        bottom = jax.lax.top_k(-scores, k)[1]
        return jnp.mean(jnp.take_along_axis(A, bottom, axis=-1)) - jnp.mean(
            jnp.take_along_axis(A, top, axis=-1)
        )

    theta = jnp.asarray(theta)
    return {
        name: float(jnp.linalg.norm(jax.grad(spread)(theta)))
        for name, spread in (("jnp.argsort", argsort_spread), ("jax.lax.top_k", top_k_spread))
    }


def _torch_hard_gradient_norms(A, B, theta, k: int) -> dict[str, float]:
    import torch

    A, B = torch.as_tensor(A), torch.as_tensor(B)
    theta = torch.tensor(theta, requires_grad=True)
    scores = B @ theta
    by_argsort = torch.gather(A, -1, torch.argsort(scores, dim=-1))
    argsort_spread = by_argsort[:, :k].mean() - by_argsort[:, -k:].mean()
    top = torch.topk(scores, k).indices
    bottom = torch.topk(-scores, k).indices
    top_k_spread = torch.gather(A, -1, bottom).mean() - torch.gather(A, -1, top).mean()
    norms = {}
    for name, value in (("torch.argsort", argsort_spread), ("torch.topk", top_k_spread)):
        # The spread does not depend on theta through any differentiable operation: autograd
        # then has no graph to follow (`requires_grad` is False), the gradient is zero.
        gradient = (
            torch.autograd.grad(value, theta, allow_unused=True)[0] if value.requires_grad else None
        )
        norms[name] = 0.0 if gradient is None else float(torch.linalg.norm(gradient))
    return norms


def demo(args: argparse.Namespace, problem: _Problem | None = None) -> int:
    """Runs the demo: the hard gradient, training with `fit`, and the table of results.

    Args:
        args: the parsed `demo` options (see `main`).
        problem: the data, or None to generate it from `args.seed` (`_make_problem`).

    Returns:
        The exit status, 0.
    """
    backend = getattr(args, "backend", None) or os.environ.get("KERAS_BACKEND") or "tensorflow"
    _use_backend(backend)
    _import_tensorflow_quietly()
    if backend != "tensorflow":
        _keep_tensorflow_off_accelerators()
    import keras
    import numpy as np

    import keras_softquantile as ksq

    # Python's, NumPy's and the backend's global seeds: fit's shuffle draws from them.
    keras.utils.set_random_seed(args.seed)
    A, B, theta_star, theta_start = _make_problem(args) if problem is None else problem

    norms = _hard_gradient_norms(backend, A, B, theta_start, args.quantile)
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

    logdir = args.logdir or _default_logdir()
    callbacks = [
        ksq.callbacks.EpsilonAnnealing(start=10 * args.epsilon, end=args.epsilon),
        keras.callbacks.TensorBoard(logdir),
        ksq.callbacks.SelectionMonitor(
            logdir, (A[:4], B[:4]), every_n_epochs=max(1, args.epochs // 5)
        ),
    ]
    print(
        f"\nTraining QuantileObjectiveModel({args.objective!r}, output={output!r}, "
        f"gradient_estimator={args.estimator!r}) with the {backend} backend on "
        f"{args.instances} instances of "
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


def _keep_tensorflow_off_accelerators() -> None:
    """Under JAX or PyTorch, TensorFlow only writes the TensorBoard logs: it must not take the
    GPU memory (it reserves all of it when it first runs on a GPU)."""
    import tensorflow as tf

    # RuntimeError: TensorFlow's devices are already initialized (it then keeps them).
    with contextlib.suppress(RuntimeError, ValueError):
        tf.config.set_visible_devices([], "GPU")


def _default_logdir() -> str:
    return os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


# ----------------------------------------------------------------- options


def _integer(text: str, requirement: str, minimum: int, maximum: int | None = None) -> int:
    """`text` as an int in [minimum, maximum], or an `ArgumentTypeError` saying `requirement`."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum or (maximum is not None and value > maximum):
        raise argparse.ArgumentTypeError(f"must be {requirement}. Received: {text}")
    return value


def _number(text: str, requirement: str, accept: Callable[[float], bool]) -> float:
    """`text` as a finite float that `accept`s, or an `ArgumentTypeError` saying `requirement`."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and accept(value)):
        raise argparse.ArgumentTypeError(f"must be {requirement}. Received: {text}")
    return value


def _positive_int(text: str) -> int:
    """An integer >= 1."""
    return _integer(text, "a positive integer", 1)


def _seed(text: str) -> int:
    """An integer in [0, 2**32 - 1]."""
    return _integer(text, f"an integer in [0, {_SEED_MAXIMUM}]", 0, _SEED_MAXIMUM)


def _positive_number(text: str) -> float:
    """A finite float > 0."""
    return _number(text, "a finite number > 0", lambda value: value > 0)


def _non_negative_number(text: str) -> float:
    """A finite float >= 0."""
    return _number(text, "a finite number >= 0", lambda value: value >= 0)


def _quantile(text: str) -> float:
    """A float in (0, 0.5]."""
    return _number(text, "a number in (0, 0.5]", lambda value: 0 < value <= 0.5)


def _epsilon(text: str) -> float:
    """A float in [_EPSILON_MINIMUM, _EPSILON_MAXIMUM]."""
    value = _positive_number(text)
    if value < _EPSILON_MINIMUM:
        raise argparse.ArgumentTypeError(
            f"must be >= {_EPSILON_MINIMUM:.4g} (8 x the float32 machine epsilon: below it the "
            f"soft memberships underflow to NaN). Received: {text}"
        )
    if value > _EPSILON_MAXIMUM:
        raise argparse.ArgumentTypeError(
            f"must be <= {_EPSILON_MAXIMUM:.4g} (annealing starts at 10 x epsilon, whose inverse "
            f"must stay a normal float32 number). Received: {text}"
        )
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none (None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The command line's parser, and the parser of its `demo` command (for its errors)."""
    parser = argparse.ArgumentParser(prog="keras-softquantile", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "demo",
        help="learn theta so that the quartiles of B @ theta minimise f(A_low, A_high)",
        formatter_class=_HelpFormatter,
    )
    run.add_argument("--n", type=_positive_int, default=200, help="entries per instance")
    run.add_argument("--features", type=_positive_int, default=20, help="number of features M")
    run.add_argument("--instances", type=_positive_int, default=64, help="number of instances")
    run.add_argument("--epochs", type=_positive_int, default=25, help="training epochs")
    run.add_argument(
        "--batch-size",
        type=_positive_int,
        default=8,
        help="instances per step (all of them when there are fewer)",
    )
    run.add_argument(
        "--epsilon",
        type=_epsilon,
        default=1e-2,
        help=f"final selection temperature, annealed from 10 x it; >= {_EPSILON_MINIMUM:.3g}",
    )
    run.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="spread",
        help="spread: mean(A_low) - mean(A_high); rank_weighted_spread: weighted by score "
        "rank, which needs the selected values in score order (a transport to 2 * floor(q * n) "
        "+ 1 buckets instead of 3): with the defaults it trains about 4x slower",
    )
    run.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        default="ot",
        help="ot: implicit gradient of the entropic transport; perturbed: Monte Carlo over "
        "noisy hard selections",
    )
    run.add_argument(
        "--quantile",
        type=_quantile,
        default=0.25,
        help="level q in (0, 0.5]; each bucket holds floor(q * n) >= 1 entries",
    )
    run.add_argument(
        "--noise", type=_non_negative_number, default=1.0, help="noise standard deviation in A"
    )
    run.add_argument(
        "--learning-rate", type=_positive_number, default=0.05, help="Adam's learning rate"
    )
    run.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="fixes the data, the initial theta and the training shuffle: the same seed "
        "gives the same numbers",
    )
    run.add_argument(
        "--logdir", default=None, help="TensorBoard directory (default: ./runs/<timestamp>)"
    )
    run.add_argument(
        "--backend",
        choices=BACKENDS,
        default=os.environ.get("KERAS_BACKEND") or "tensorflow",
        help="Keras backend (sets KERAS_BACKEND; default: KERAS_BACKEND, or tensorflow)",
    )
    return parser, run


def _check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The rules between options, checked before any work (`parser.error` exits with 2).

    Args:
        parser: the parser, which reports an error.
        args: the parsed `demo` options.
    """
    if _split_size(args.quantile, args.n) < 1:
        parser.error(
            f"argument --n: must be >= {_smallest_n(args.quantile)} at --quantile "
            f"{args.quantile:g} (the lower and upper buckets hold floor(quantile * n) entries "
            f"each, at least 1). Received: {args.n}"
        )
    if args.logdir is not None and os.path.exists(args.logdir) and not os.path.isdir(args.logdir):
        parser.error(f"argument --logdir: must be a directory, not a file. Received: {args.logdir}")
    if args.backend not in BACKENDS:  # the default, from KERAS_BACKEND, is not checked by choices
        parser.error(
            f"argument --backend: must be one of {', '.join(BACKENDS)} (the default comes from "
            f"KERAS_BACKEND). Received: {args.backend}"
        )
    imported = _imported_backend()
    if imported is not None and imported != args.backend:
        parser.error(
            f"argument --backend: Keras is already imported in this process with the backend "
            f"{imported!r}, which cannot change: run the demo in a new process. "
            f"Received: {args.backend}"
        )


def _check_problem(
    parser: argparse.ArgumentParser, args: argparse.Namespace, problem: _Problem
) -> None:
    """The rules on the generated data, checked before training (`parser.error` exits with 2).

    * `|A|` must not exceed the model's limit for float32 values, the fourth root of the
      largest float32 (about 4.3e9): a large `--noise` can exceed it.
    * The scores `B @ theta` must stay finite in float32, with a factor 2 to spare, whatever
      the gradients: each Adam step moves each entry of theta by at most `_ADAM_STEP_BOUND`
      times the learning rate, so `|B @ theta|` is at most the largest row sum of `|B|` times
      `max |theta_start| + _ADAM_STEP_BOUND * learning_rate * steps`.

    Args:
        parser: the parser, which reports an error.
        args: the parsed `demo` options.
        problem: the generated data.
    """
    import numpy as np

    largest = float(np.finfo(np.float32).max)
    limit = largest**0.25
    reached = float(np.max(np.abs(problem.values)))
    if not reached <= limit:
        parser.error(
            f"argument --noise: too large: the values A = B @ theta* + noise reach "
            f"|A| = {reached:.3g}, above the model's float32 limit {limit:.3g}. "
            f"Received: {args.noise:g}"
        )
    steps = args.epochs * math.ceil(args.instances / args.batch_size)
    row_sum = float(np.max(np.sum(np.abs(problem.features), axis=-1)))
    start = float(np.max(np.abs(problem.theta_start)))
    bound = (largest / 2 / row_sum - start) / (_ADAM_STEP_BOUND * steps)
    if args.learning_rate > bound:
        parser.error(
            f"argument --learning-rate: too large for {steps} Adam steps: theta could grow "
            f"until the scores B @ theta overflow float32; use at most {bound:.3g}. "
            f"Received: {args.learning_rate:g}"
        )


def _make_logdir(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Creates `args.logdir` (by default `./runs/<timestamp>`), or reports why it cannot."""
    args.logdir = args.logdir or _default_logdir()
    try:
        os.makedirs(args.logdir, exist_ok=True)
    except OSError as error:
        parser.error(
            f"argument --logdir: cannot create the directory ({error.strerror}). "
            f"Received: {args.logdir}"
        )


def main(argv: list[str] | None = None) -> int:
    """Runs the command line.

    Args:
        argv: the arguments (without the program's name), or None for `sys.argv[1:]`.

    Returns:
        The exit status (a bad option exits with 2 through `SystemExit`).
    """
    parser, demo_parser = _build_parser()
    args = parser.parse_args(argv)
    _check_options(demo_parser, args)
    problem = _make_problem(args)
    _check_problem(demo_parser, args, problem)
    _make_logdir(demo_parser, args)
    _use_backend(args.backend)  # before anything imports Keras
    return demo(args, problem)


if __name__ == "__main__":
    sys.exit(main())
