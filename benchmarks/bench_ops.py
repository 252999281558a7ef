"""Forward+backward cost of `soft_quantile_masks` against a hard `tf.sort` of the same input.

For each batch x n it measures, in one process and one run:
  * the hard sort (forward only, it has no gradient), as a `tf.function` with and without
    XLA; the faster of the two is the baseline;
  * `soft_quantile_masks` (quartile buckets, float32) forward + backward of a loss on the
    upper and lower masks, as a `tf.function` with and without XLA; the faster is reported;
  * sharpness: the mean absolute difference of the soft upper-quartile mask from the hard one;
  * the worst relative error of the three bucket masses;
  * peak memory above what the inputs already hold, forward alone and forward+backward, read
    from TensorFlow's allocator statistics (a fresh subprocess per measurement, with the BFC
    allocator switched on for the CPU so that the statistics exist).
Times are medians over `--repeats` runs after a warm-up. The machines are shared and noisy:
compare the ratio column, not the milliseconds across runs.

Usage:
    python benchmarks/bench_ops.py                  # all sizes, table to stdout
    python benchmarks/bench_ops.py --sizes 1x1000 256x1000 --no-memory
    python benchmarks/bench_ops.py --output benchmarks/results/bench_ops.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

from keras_softquantile import ops

SIZES = ("1x1000", "256x1000", "1x100000", "1x1000000")
# Targets from the issue: time ratio against the faster hard sort, by size.
TARGETS = {"256x1000": 3.0, "1x100000": 2.0, "1x1000000": 1.0}
# A memory probe (`--probe SPEC`) prints one JSON object: the measurement under PROBE_KEY,
# what it measured, and its SPEC; `measure_memory` reads the value back.
PROBE_KEY = "peak_memory_mib"
PROBE_MEASURED = (
    "peak CPU allocator memory of one call, above what its inputs hold, in MiB (2**20 bytes)"
)


def parse_size(text: str) -> tuple[int, int]:
    batch, n = text.lower().split("x")
    return int(batch), int(float(n))


def make_inputs(batch: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.standard_normal((batch, n)), tf.float32)
    w = tf.constant(rng.standard_normal((batch, n)), tf.float32)
    return x, w


def build_functions(epsilon: float):
    def sort(x):
        return tf.sort(x, axis=-1)

    def forward(x, w):
        masks = ops.soft_quantile_masks(x, epsilon=epsilon)
        return tf.reduce_sum((masks[..., 2] - masks[..., 0]) * w)

    def forward_backward(x, w):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = forward(x, w)
        return loss, tape.gradient(loss, x)

    return sort, forward, forward_backward


def median_ms(fn, *args, repeats: int) -> float:
    tf.nest.map_structure(np.asarray, fn(*args))  # warm-up: trace and compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tf.nest.map_structure(np.asarray, fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def memory_probe(size: str, what: str, epsilon: float, xla: bool) -> float:
    """Runs in a subprocess: peak allocator memory (MiB) of one call, above its inputs."""
    batch, n = parse_size(size)
    x, w = make_inputs(batch, n)
    _, forward, forward_backward = build_functions(epsilon)
    fn = {"forward": forward, "forward_backward": forward_backward}[what]
    fn = tf.function(fn, jit_compile=xla)
    tf.nest.map_structure(np.asarray, fn(x, w))  # trace and compile first
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    tf.nest.map_structure(np.asarray, fn(x, w))
    return (tf.config.experimental.get_memory_info("CPU:0")["peak"] - before) / 2**20


def measure_memory(size: str, what: str, epsilon: float, xla: bool) -> float:
    command = [
        sys.executable,
        __file__,
        "--probe",
        json.dumps({"size": size, "what": what, "epsilon": epsilon, "xla": xla}),
    ]
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true")
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])[PROBE_KEY]


def measure(size: str, epsilon: float, repeats: int, memory: bool) -> dict:
    batch, n = parse_size(size)
    x, w = make_inputs(batch, n)
    sort, _forward, forward_backward = build_functions(epsilon)
    sort_graph = median_ms(tf.function(sort), x, repeats=repeats)
    sort_xla = median_ms(tf.function(sort, jit_compile=True), x, repeats=repeats)
    soft_graph = median_ms(tf.function(forward_backward), x, w, repeats=repeats)
    soft_xla = median_ms(tf.function(forward_backward, jit_compile=True), x, w, repeats=repeats)

    masks, info = ops.soft_quantile_masks(x, epsilon=epsilon, return_diagnostics=True)
    ranks = tf.argsort(tf.argsort(x, axis=-1), axis=-1)
    hard_upper = tf.cast(ranks >= n - n // 4, tf.float64)
    sharpness = float(tf.reduce_mean(tf.abs(tf.cast(masks[..., 2], tf.float64) - hard_upper)))
    sums = tf.reduce_sum(tf.cast(masks, tf.float64), axis=1)
    expected = tf.constant([0.25, 0.5, 0.25], tf.float64) * n
    mass_error = float(tf.reduce_max(tf.abs(sums - expected) / expected))

    best_sort = min(sort_graph, sort_xla)
    xla_faster = soft_xla < soft_graph
    row = {
        "size": size,
        "sort_graph_ms": sort_graph,
        "sort_xla_ms": sort_xla,
        "soft_graph_ms": soft_graph,
        "soft_xla_ms": soft_xla,
        "ratio": min(soft_graph, soft_xla) / best_sort,
        "target": TARGETS.get(size),
        "sharpness": sharpness,
        "mass_error": mass_error,
        "max_iterations": int(tf.reduce_max(info.iterations)),
        "all_converged": bool(tf.reduce_all(info.converged)),
    }
    if memory:
        row["memory_forward_mb"] = measure_memory(size, "forward", epsilon, xla_faster)
        row["memory_forward_backward_mb"] = measure_memory(
            size, "forward_backward", epsilon, xla_faster
        )
    return row


def format_table(rows: list[dict], epsilon: float) -> str:
    header = (
        "| batch x n | tf.sort graph / XLA (ms) | soft fwd+bwd graph / XLA (ms) | ratio | target "
        "| sharpness | mass error | Newton steps | peak MiB fwd / fwd+bwd |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for r in rows:
        target = "-" if r["target"] is None else f"<= {r['target']:g}x"
        verdict = "" if r["target"] is None else (" ok" if r["ratio"] <= r["target"] else " MISS")
        memory = (
            f"{r['memory_forward_mb']:.1f} / {r['memory_forward_backward_mb']:.1f}"
            if "memory_forward_mb" in r
            else "-"
        )
        lines.append(
            f"| {r['size']} | {r['sort_graph_ms']:.2f} / {r['sort_xla_ms']:.2f} "
            f"| {r['soft_graph_ms']:.2f} / {r['soft_xla_ms']:.2f} | {r['ratio']:.2f}x "
            f"| {target}{verdict} | {r['sharpness']:.2e} | {r['mass_error']:.1e} "
            f"| {r['max_iterations']}{'' if r['all_converged'] else ' (not converged)'} "
            f"| {memory} |"
        )
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"TensorFlow {tf.__version__}, float32, epsilon={epsilon:g}"
    )
    return "\n".join(lines) + f"\n\nMachine: {machine}. Times are medians.\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), help="BATCHxN, e.g. 1x1000")
    parser.add_argument("--epsilon", type=float, default=5e-4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--output", help="also write the table (markdown) to this file")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        spec = json.loads(args.probe)
        peak = memory_probe(spec["size"], spec["what"], spec["epsilon"], spec["xla"])
        print(json.dumps({PROBE_KEY: peak, "measured": PROBE_MEASURED, **spec}))
        return
    rows = []
    for size in args.sizes:
        rows.append(measure(size, args.epsilon, args.repeats, not args.no_memory))
        print(f"measured {size}", file=sys.stderr, flush=True)
    table = format_table(rows, args.epsilon)
    print(table)
    if args.output:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output, "w") as handle:
            handle.write(table)


if __name__ == "__main__":
    main()
