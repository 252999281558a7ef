"""Generates every figure of the documentation into `docs/assets/`.

Run from the repository root (about two minutes on 2 CPU cores):

    python docs/scripts/make_figures.py            # all figures
    python docs/scripts/make_figures.py masks line  # some of them

Every figure is computed with the package itself on generated data with fixed seeds, so a
rerun reproduces the committed images up to floating-point noise. Numbers quoted on the pages
are printed here as the figures are made.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf

import keras_softquantile as ksq
from keras_softquantile.ops import transport

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "docs" / "assets"
COLORS = {"low": "#3b6fb6", "middle": "#b9b9b9", "high": "#e07b39"}
DPI = 110


def _save(fig: plt.Figure, name: str) -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    path = ASSETS / name
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size / 1024:.0f} KB)")


def _seed_problem(seed: int = 0, n: int = 10, features: int = 20):
    """The user's setup: values A (n), features B (n x M), parameters theta (M)."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(n)
    features_matrix = rng.standard_normal((n, features))
    theta = rng.standard_normal(features)
    return values, features_matrix, theta


def _hard_objective(values, scores, k: int):
    """`mean(A_low) - mean(A_high)` with the hard selection of k entries each side."""
    order = tf.argsort(scores, axis=-1)
    ordered = tf.gather(values, order, batch_dims=len(scores.shape) - 1)
    return tf.reduce_mean(ordered[..., :k], -1) - tf.reduce_mean(ordered[..., -k:], -1)


def _soft_objective(values, scores, quantile: float, epsilon: float):
    low, high = ksq.soft_quantile_split(values, scores, quantile, epsilon=epsilon, output="mean")
    return low - high


# --------------------------------------------------------------------------------------------
# Home page: hard and soft quartile memberships.
# --------------------------------------------------------------------------------------------


def figure_masks() -> None:
    rng = np.random.default_rng(3)
    n = 24
    scores = np.sort(rng.standard_normal(n))
    x = tf.constant(scores[None, :], tf.float64)
    panels = [
        ("hard (argsort)", None),
        ("soft, epsilon = 0.03", 0.03),
        ("soft, epsilon = 0.1", 0.1),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(11, 2.9), sharey=True)
    for ax, (title, epsilon) in zip(axes, panels, strict=True):
        if epsilon is None:
            masks = np.zeros((n, 3))
            masks[: n // 4, 0] = 1
            masks[n // 4 : 3 * n // 4, 1] = 1
            masks[3 * n // 4 :, 2] = 1
        else:
            masks = ksq.soft_quantile_masks(x, (0.25, 0.75), epsilon=epsilon).numpy()[0]
        bottom = np.zeros(n)
        for j, key in enumerate(("low", "middle", "high")):
            ax.bar(np.arange(n), masks[:, j], bottom=bottom, color=COLORS[key], width=0.85)
            bottom += masks[:, j]
        sums = masks.sum(0)
        ax.set_title(f"{title}\nbucket masses {sums[0]:.2f} / {sums[1]:.2f} / {sums[2]:.2f}")
        ax.set_xlabel("entries, by increasing score")
        ax.set_xticks([])
    axes[0].set_ylabel("membership")
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[k]) for k in ("low", "middle", "high")]
    fig.legend(
        handles,
        ["lower quartile", "middle half", "upper quartile"],
        loc="lower center",
        ncol=3,
        bbox_to_anchor=(0.5, -0.1),
        frameon=False,
    )
    _save(fig, "quartile_masks.png")


# --------------------------------------------------------------------------------------------
# Why is the gradient zero: the objective and its derivative along a line in theta.
# --------------------------------------------------------------------------------------------


def _perturbed(values, features, theta, k: int, sigma: float, samples: int, seed: int):
    """Perturbed-optimizer estimate (Berthet et al. 2020) of the objective and its gradient.

    The hard objective is evaluated at the squashed scores z plus `sigma` times Gaussian noise
    (so `sigma` is in quantile-level units, like `epsilon`); the gradient with respect to z is
    the Monte-Carlo average of `(f(z + sigma Z) - f(z)) Z / sigma` (subtracting f(z) leaves
    the mean unchanged and lowers the variance), chained to theta by autodiff.
    """
    noise = tf.random.stateless_normal([samples, values.shape[-1]], [seed, 0], dtype=tf.float64)
    theta = tf.Variable(theta)
    with tf.GradientTape() as tape:
        z = ksq.ops.squash_scores(tf.linalg.matvec(features, theta))
        base = _hard_objective(values, z, k)
        noisy = tf.stop_gradient(z)[None] + sigma * noise
        perturbed = _hard_objective(tf.broadcast_to(values, tf.shape(noisy)), noisy, k)
        weights = tf.reduce_mean((perturbed - base)[:, None] * noise, axis=0) / sigma
        surrogate = tf.reduce_sum(tf.stop_gradient(weights) * z)
    return float(tf.reduce_mean(perturbed)), tape.gradient(surrogate, theta)


def figure_line() -> None:
    values_np, features_np, theta0 = _seed_problem()
    values = tf.constant(values_np)
    features = tf.constant(features_np)
    k, quantile = 2, 0.2  # the 2 lowest and 2 highest of 10: quantile 0.2 holds exactly 2
    rng = np.random.default_rng(1)
    direction = rng.standard_normal(theta0.shape)
    direction *= np.linalg.norm(theta0) / np.linalg.norm(direction)
    steps = np.linspace(-1.0, 1.0, 401)
    hard = []
    for s in steps:
        scores = tf.linalg.matvec(features, tf.constant(theta0 + s * direction))
        hard.append(float(_hard_objective(values, scores, k)))
    soft, soft_slope = {}, {}

    @tf.function
    def soft_value_and_slope(step, epsilon):
        with tf.GradientTape() as tape:
            tape.watch(step)
            scores = tf.linalg.matvec(features, theta0 + step * direction)
            f = _soft_objective(values, scores, quantile, epsilon)
        return f, tape.gradient(f, step)

    for epsilon in (0.1, 0.03, 0.01):
        pairs = [
            soft_value_and_slope(tf.constant(s, tf.float64), tf.constant(epsilon, tf.float64))
            for s in steps
        ]
        soft[epsilon] = [float(f) for f, _ in pairs]
        soft_slope[epsilon] = [float(g) for _, g in pairs]
    sigma = 0.05
    coarse = steps[::10]
    perturbed, perturbed_slope = [], []
    for i, s in enumerate(coarse):
        theta = theta0 + s * direction
        value, _ = _perturbed(values, features, theta, k, sigma, 4000, seed=i)
        _, gradient = _perturbed(values, features, theta, k, sigma, 20, seed=1000 + i)
        perturbed.append(value)
        perturbed_slope.append(float(np.dot(gradient.numpy(), direction)))

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.4), sharex=True)
    top.step(steps, hard, where="mid", color="black", lw=1.6, label="hard (argsort)")
    shades = {0.1: "#9ecae1", 0.03: "#4292c6", 0.01: "#08519c"}
    for epsilon, curve in soft.items():
        top.plot(steps, curve, color=shades[epsilon], lw=1.4, label=f"soft, epsilon = {epsilon:g}")
    top.plot(
        coarse,
        perturbed,
        "o",
        ms=3.5,
        color="#d62728",
        label="perturbed, sigma = 0.05 (4000 draws)",
    )
    top.set_ylabel("f = mean(A_low) - mean(A_high)")
    top.legend(fontsize=8, loc="best")
    top.set_title("Objective along theta0 + s d  (N = 10, M = 20, 2 lowest and 2 highest)")
    bottom.axhline(0, color="black", lw=1.6, label="hard: autodiff gives 0 (None)")
    for epsilon, curve in soft_slope.items():
        bottom.plot(
            steps, curve, color=shades[epsilon], lw=1.4, label=f"soft, epsilon = {epsilon:g}"
        )
    bottom.plot(
        coarse,
        perturbed_slope,
        "x",
        ms=4,
        color="#d62728",
        label="perturbed estimate, 20 draws per point",
    )
    bottom.set_xlabel("s")
    bottom.set_ylabel("df/ds")
    bottom.legend(fontsize=8, loc="best")
    _save(fig, "zero_gradient_line.png")
    print(
        "line: hard objective takes",
        len(set(np.round(hard, 12))),
        "distinct values on",
        len(steps),
        "points",
    )


# --------------------------------------------------------------------------------------------
# Theory: memberships as functions of the squashed score, and solver convergence.
# --------------------------------------------------------------------------------------------


def figure_memberships() -> None:
    rng = np.random.default_rng(5)
    n = 2000
    x = tf.constant(rng.standard_normal((1, n)))
    z_grid = np.linspace(0, 1, 801)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
    for ax, epsilon in zip(axes, (0.05, 0.01), strict=True):
        _, info = ksq.soft_quantile_masks(x, (0.25, 0.75), epsilon=epsilon, return_diagnostics=True)
        t = info.boundaries.numpy()[0]
        # pi_j(z) = softmax_j((j z - T_j) / epsilon), T = (0, t0, t0 + t1).
        offsets = np.array([0.0, t[0], t[0] + t[1]])
        logits = (z_grid[:, None] * np.arange(3) - offsets) / epsilon
        logits -= logits.max(axis=1, keepdims=True)
        pi = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        for j, key in enumerate(("low", "middle", "high")):
            ax.plot(z_grid, pi[:, j], color=COLORS[key] if key != "middle" else "#6b6b6b", lw=1.8)
        for boundary in t:
            ax.axvline(boundary, color="black", lw=0.8, ls=":")
            ax.axvspan(boundary - 2 * epsilon, boundary + 2 * epsilon, color="#dddddd", alpha=0.5)
        ax.set_title(f"epsilon = {epsilon:g}: boundaries t = ({t[0]:.3f}, {t[1]:.3f})")
        ax.set_xlabel("squashed score z = Phi((x - mean) / std)")
        print(f"memberships: epsilon={epsilon} boundaries {t}")
    axes[0].set_ylabel("membership pi_j(z)")
    axes[0].legend(["lower", "middle", "upper"], fontsize=8, loc="center left")
    _save(fig, "memberships.png")


def figure_convergence() -> None:
    rng = np.random.default_rng(6)
    n = 1000
    z = ksq.ops.squash_scores(tf.constant(rng.standard_normal((1, n))))
    weights = tf.fill([1, n], tf.constant(1.0 / n, tf.float64))
    masses = tf.constant([0.25, 0.5, 0.25], tf.float64)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    styles = {1e-2: "-", 1e-3: "--"}
    for epsilon, style in styles.items():
        newton_steps = list(range(0, 4))
        newton = [
            float(
                transport.solve_newton(
                    z, weights, masses, epsilon, max_iterations=i
                ).marginal_error[0]
            )
            for i in newton_steps
        ]
        sinkhorn_steps = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
        sinkhorn = [
            float(
                transport.solve_sinkhorn(
                    z, weights, masses, epsilon, max_iterations=i, newton_steps=0
                ).marginal_error[0]
            )
            for i in sinkhorn_steps
        ]
        floor = 1e-17
        ax.semilogy(
            newton_steps,
            np.maximum(newton, floor),
            "o" + style,
            color="#08519c",
            label=f"Newton, epsilon = {epsilon:g}",
        )
        ax.semilogy(
            sinkhorn_steps,
            np.maximum(sinkhorn, floor),
            "s" + style,
            color="#d62728",
            ms=3.5,
            label=f"Sinkhorn, epsilon = {epsilon:g}",
        )
        print(f"convergence eps={epsilon}: newton {newton}")
        by_iterations = dict(zip(sinkhorn_steps, sinkhorn, strict=True))
        print(f"convergence eps={epsilon}: sinkhorn {by_iterations}")
    loose = 1e-2 * transport.default_tolerance(tf.float64) ** 0.5
    ax.axhline(loose, color="#d62728", lw=0.6, ls=":")
    ax.text(
        12,
        loose * 0.05,
        "dotted: Sinkhorn's own stopping tolerance;\nNewton steps polish after it",
        fontsize=7,
        color="#d62728",
    )
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(-0.2, 3000)
    ax.set_xlabel("iterations (Newton: from the bisection warm start)")
    ax.set_ylabel("marginal error (fraction of mass)")
    ax.set_title("Quartile buckets, n = 1000, float64")
    ax.legend(fontsize=8)
    _save(fig, "convergence.png")


# --------------------------------------------------------------------------------------------
# Choosing epsilon: sharpness and gradient norm.
# --------------------------------------------------------------------------------------------


def _tradeoff(n: int, epsilons, instances: int = 32, features: int = 20, seed: int = 7):
    """Sharpness of the upper-quartile mask and per-instance gradient norms, per epsilon.

    Returns the epsilons at which the solver converged on every instance, with the sharpness
    and the `[instances]` gradient norms at each; the others are reported and left out.
    """
    rng = np.random.default_rng(seed)
    values = tf.constant(rng.standard_normal((instances, n)))
    features_t = tf.constant(rng.standard_normal((instances, n, features)))
    theta0 = rng.standard_normal(features)
    theta_rows = np.tile(theta0, (instances, 1))
    scores0 = np.einsum("bnf,f->bn", features_t.numpy(), theta0)
    order = np.argsort(scores0, axis=-1)
    hard_upper = np.zeros_like(scores0)
    np.put_along_axis(hard_upper, order[:, -n // 4 :], 1.0, axis=-1)
    kept, sharpness, norms = [], [], []
    for epsilon in epsilons:
        masks, info = ksq.soft_quantile_masks(
            tf.constant(scores0), (0.25, 0.75), epsilon=epsilon, return_diagnostics=True
        )
        if not bool(tf.reduce_all(info.converged)):
            failed = int(tf.reduce_sum(tf.cast(~info.converged, tf.int32)))
            print(f"epsilon n={n} eps={epsilon:.2e}: {failed} of {instances} rows not converged")
            continue
        kept.append(epsilon)
        sharpness.append(float(np.mean(np.abs(masks.numpy()[..., 2] - hard_upper))))
        theta = tf.Variable(theta_rows)
        with tf.GradientTape() as tape:
            scores = tf.einsum("bnf,bf->bn", features_t, theta)
            f = tf.reduce_sum(_soft_objective(values, scores, 0.25, epsilon))
        gradient = tape.gradient(f, theta).numpy()  # row b: the gradient of instance b
        norms.append(np.linalg.norm(gradient, axis=-1))
    return np.array(kept), np.array(sharpness), np.array(norms)


def figure_epsilon() -> None:
    epsilons = np.logspace(-5, -0.5, 19)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    left.loglog(
        epsilons,
        2 * math.log(2) * epsilons,
        color="black",
        lw=0.8,
        ls=":",
        label="2 ln 2 * epsilon",
    )
    for n, color in ((100, "#4292c6"), (1000, "#d62728")):
        kept, sharpness, norms = _tradeoff(n, epsilons)
        left.loglog(kept, sharpness, "o-", color=color, ms=3.5, label=f"n = {n}")
        median = np.median(norms, axis=1)
        low, high = np.quantile(norms, [0.1, 0.9], axis=1)
        right.loglog(kept, median, "o-", color=color, ms=3.5, label=f"n = {n}: median")
        right.fill_between(
            kept,
            np.maximum(low, 1e-6),
            high,
            color=color,
            alpha=0.2,
            label=f"n = {n}: 10%-90% of instances",
        )
        right.axvline(1 / n, color=color, lw=0.8, ls=":")
        for epsilon, s, m, lo, hi in zip(kept, sharpness, median, low, high, strict=True):
            print(
                f"epsilon n={n} eps={epsilon:.2e} sharpness={s:.3e} ratio={s / epsilon:.2f} "
                f"grad median={m:.3e} 10%={lo:.3e} 90%={hi:.3e}"
            )
    left.set_xlabel("epsilon")
    left.set_ylabel("mean |soft - hard| (upper-quartile mask)")
    left.set_title("Sharpness")
    left.legend(fontsize=8)
    right.set_xlabel("epsilon (dotted: 1 / n)")
    right.set_ylabel("|| d f / d theta || per instance")
    right.set_ylim(1e-6, 30)
    right.set_title("Gradient norm of f = mean(A_low) - mean(A_high)")
    right.legend(fontsize=7, loc="lower right")
    _save(fig, "epsilon_tradeoff.png")


# --------------------------------------------------------------------------------------------
# Ops guide: soft sort and ranks against epsilon.
# --------------------------------------------------------------------------------------------


def figure_sorting() -> None:
    x = tf.constant([[0.9, -1.3, 0.2, 2.1, -0.4, 0.25, 1.0, -2.0]], tf.float64)
    epsilons = np.logspace(-3.5, 0, 60)
    sorted_rows = np.stack([ksq.soft_sort(x, epsilon=float(e)).numpy()[0] for e in epsilons])
    ranks = np.stack([ksq.soft_rank(x, epsilon=float(e)).numpy()[0] for e in epsilons])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    left.semilogx(epsilons, sorted_rows)
    left.set_xlabel("epsilon")
    left.set_title("soft_sort(x): output positions")
    right.semilogx(epsilons, ranks)
    right.set_xlabel("epsilon")
    right.set_title("soft_rank(x): each entry's rank")
    for ax in (left, right):
        ax.axvline(1 / x.shape[-1], color="black", lw=0.8, ls=":")
    left.text(1 / x.shape[-1], left.get_ylim()[1], " 1/n", va="top", fontsize=8)
    _save(fig, "sorting.png")
    print("sorting: row sums", sorted_rows.sum(1)[[0, -1]], "x sum", float(tf.reduce_sum(x)))


# --------------------------------------------------------------------------------------------
# Benchmarks: the committed table, as bars.
# --------------------------------------------------------------------------------------------


def _benchmark_rows(path: Path):
    rows = []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not re.fullmatch(r"\d+x\d+", cells[0]):
            continue
        sort_graph, sort_xla = (float(v) for v in cells[1].split("/"))
        soft_graph, soft_xla = (float(v) for v in cells[2].split("/"))
        rows.append((cells[0], sort_graph, sort_xla, soft_graph, soft_xla))
    return rows


def figure_benchmarks() -> None:
    rows = _benchmark_rows(ROOT / "benchmarks" / "results" / "bench_ops.md")
    labels = [r[0] for r in rows]
    series = [
        ("tf.sort, graph (forward)", 1, "#bdbdbd"),
        ("tf.sort, XLA (forward)", 2, "#737373"),
        ("soft masks, graph (fwd + bwd)", 3, "#6baed6"),
        ("soft masks, XLA (fwd + bwd)", 4, "#08519c"),
    ]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.2
    for i, (label, column, color) in enumerate(series):
        ax.bar(
            np.arange(len(rows)) + (i - 1.5) * width,
            [r[column] for r in rows],
            width,
            label=label,
            color=color,
        )
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(rows)), labels)
    ax.set_xlabel("batch x n")
    ax.set_ylabel("median time (ms)")
    ax.set_title("Quartile masks, float32, epsilon = 5e-4 (benchmarks/results/bench_ops.md)")
    ax.legend(fontsize=8)
    _save(fig, "benchmark_times.png")


FIGURES = {
    "masks": figure_masks,
    "line": figure_line,
    "memberships": figure_memberships,
    "convergence": figure_convergence,
    "epsilon": figure_epsilon,
    "sorting": figure_sorting,
    "benchmarks": figure_benchmarks,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"figures to make, among {', '.join(FIGURES)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(FIGURES))
    if unknown:
        parser.error(f"unknown figures {unknown}; choose among {list(FIGURES)}")
    for name in args.names or FIGURES:
        start = time.perf_counter()
        FIGURES[name]()
        print(f"  {name}: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
