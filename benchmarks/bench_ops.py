"""Forward+backward cost of `soft_quantile_masks` against the backend's own hard sort.

For each batch x n it measures, in one process and one run, on the Keras backend chosen with
`--backend` (tensorflow, jax or torch):
  * the hard sort of the same input (forward only, it has no gradient): `tf.sort` as a
    `tf.function` with and without XLA, `jnp.sort` under `jax.jit`, `torch.sort`; the faster
    TensorFlow mode is the baseline;
  * `soft_quantile_masks` (quartile buckets, float32) forward + backward of a loss on the
    upper and lower masks: TensorFlow as a `tf.function` with and without XLA ("graph", which
    is what Keras's `fit` runs on CPU and under `tf.distribute`, and "XLA"), JAX under
    `jax.jit` of `jax.value_and_grad`, PyTorch eagerly with `torch.autograd.grad`;
  * sharpness: the mean absolute difference of the soft upper-quartile mask from the hard one;
  * the worst relative error of the three bucket masses;
  * on TensorFlow, peak memory above what the inputs already hold, forward alone and
    forward+backward, read from TensorFlow's allocator statistics (a fresh subprocess per
    measurement, with the BFC allocator switched on for the CPU so that the statistics exist).
Times are medians over `--repeats` runs after a warm-up. The machines are shared and noisy:
compare the ratio columns, not the milliseconds across runs.

Usage:
    python benchmarks/bench_ops.py                  # TensorFlow, all sizes, table to stdout
    python benchmarks/bench_ops.py --backend jax --sizes 256x1000 1x100000 --no-memory
    python benchmarks/bench_ops.py --output benchmarks/results/bench_ops.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

from _harness import BACKENDS, backend_versions, block, median_ms, publish, select_backend

select_backend()

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_softquantile import ops  # noqa: E402

BACKEND = keras.backend.backend()
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
    x = keras.ops.convert_to_tensor(rng.standard_normal((batch, n)), "float32")
    w = keras.ops.convert_to_tensor(rng.standard_normal((batch, n)), "float32")
    return x, w


def forward_function(epsilon: float):
    def forward(x, w):
        masks = ops.soft_quantile_masks(x, epsilon=epsilon)
        return keras.ops.sum((masks[..., 2] - masks[..., 0]) * w)

    return forward


def timed_functions(epsilon: float) -> tuple[dict, dict]:
    """`({mode: hard sort}, {mode: soft forward+backward})` for the active backend."""
    forward = forward_function(epsilon)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        def sort(x):
            return tf.sort(x, axis=-1)

        def forward_backward(x, w):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = forward(x, w)
            return loss, tape.gradient(loss, x)

        return (
            {"graph": tf.function(sort), "XLA": tf.function(sort, jit_compile=True)},
            {
                "graph": tf.function(forward_backward),
                "XLA": tf.function(forward_backward, jit_compile=True),
            },
        )
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        return (
            {"jit": jax.jit(lambda x: jnp.sort(x, axis=-1))},
            {"jit": jax.jit(jax.value_and_grad(forward))},
        )
    import torch

    def torch_forward_backward(x, w):
        x = x.detach().requires_grad_(True)
        loss = forward(x, w)
        return loss.detach(), torch.autograd.grad(loss, x)[0]

    return (
        {"eager": lambda x: torch.sort(x, dim=-1).values},
        {"eager": torch_forward_backward},
    )


def memory_probe(size: str, what: str, epsilon: float, xla: bool) -> float:
    """Runs in a subprocess (TensorFlow): peak allocator memory (MiB) of one call."""
    import tensorflow as tf

    batch, n = parse_size(size)
    x, w = make_inputs(batch, n)
    forward = forward_function(epsilon)

    def forward_backward(x, w):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = forward(x, w)
        return loss, tape.gradient(loss, x)

    fn = {"forward": forward, "forward_backward": forward_backward}[what]
    fn = tf.function(fn, jit_compile=xla)
    block(fn(x, w))  # trace and compile first
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    block(fn(x, w))
    return (tf.config.experimental.get_memory_info("CPU:0")["peak"] - before) / 2**20


def measure_memory(size: str, what: str, epsilon: float, xla: bool) -> float:
    command = [
        sys.executable,
        __file__,
        "--probe",
        json.dumps({"size": size, "what": what, "epsilon": epsilon, "xla": xla}),
    ]
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true", KERAS_BACKEND="tensorflow")
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])[PROBE_KEY]


def measure(size: str, epsilon: float, repeats: int, memory: bool) -> dict:
    batch, n = parse_size(size)
    x, w = make_inputs(batch, n)
    sorts, softs = timed_functions(epsilon)
    sort_ms = {mode: median_ms(fn, x, repeats=repeats) for mode, fn in sorts.items()}
    soft_ms = {mode: median_ms(fn, x, w, repeats=repeats) for mode, fn in softs.items()}

    masks, info = ops.soft_quantile_masks(x, epsilon=epsilon, return_diagnostics=True)
    masks = np.asarray(keras.ops.convert_to_numpy(masks), np.float64)
    values = np.asarray(keras.ops.convert_to_numpy(x))
    ranks = np.argsort(np.argsort(values, axis=-1, kind="stable"), axis=-1)
    hard_upper = (ranks >= n - n // 4).astype(np.float64)
    sharpness = float(np.mean(np.abs(masks[..., 2] - hard_upper)))
    expected = np.array([0.25, 0.5, 0.25]) * n
    mass_error = float(np.max(np.abs(masks.sum(axis=1) - expected) / expected))

    row = {
        "size": size,
        "sort_ms": sort_ms,
        "soft_ms": soft_ms,
        "ratio": min(soft_ms.values()) / min(sort_ms.values()),
        "target": TARGETS.get(size),
        "sharpness": sharpness,
        "mass_error": mass_error,
        "max_iterations": int(np.max(keras.ops.convert_to_numpy(info.iterations))),
        "all_converged": bool(np.all(keras.ops.convert_to_numpy(info.converged))),
    }
    if "graph" in soft_ms and "XLA" in soft_ms:
        row["graph_over_xla"] = soft_ms["graph"] / soft_ms["XLA"]
    if memory and BACKEND == "tensorflow":
        xla_faster = soft_ms["XLA"] < soft_ms["graph"]
        row["memory_forward_mb"] = measure_memory(size, "forward", epsilon, xla_faster)
        row["memory_forward_backward_mb"] = measure_memory(
            size, "forward_backward", epsilon, xla_faster
        )
    return row


def format_table(rows: list[dict], epsilon: float) -> str:
    modes = " / ".join(rows[0]["soft_ms"]) if rows else ""
    sort_modes = " / ".join(rows[0]["sort_ms"]) if rows else ""
    graph_column = bool(rows) and "graph_over_xla" in rows[0]
    header = (
        f"| batch x n | hard sort {sort_modes} (ms) | soft fwd+bwd {modes} (ms) | ratio | target "
        + ("| graph / XLA " if graph_column else "")
        + "| sharpness | mass error | Newton steps | peak MiB fwd / fwd+bwd |\n"
        + "|---" * (9 + graph_column)
        + "|"
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
        sort_ms = " / ".join(f"{v:.2f}" for v in r["sort_ms"].values())
        soft_ms = " / ".join(f"{v:.2f}" for v in r["soft_ms"].values())
        graph = f"| {r['graph_over_xla']:.2f}x " if graph_column else ""
        lines.append(
            f"| {r['size']} | {sort_ms} | {soft_ms} | {r['ratio']:.2f}x | {target}{verdict} "
            f"{graph}| {r['sharpness']:.2e} | {r['mass_error']:.1e} "
            f"| {r['max_iterations']}{'' if r['all_converged'] else ' (not converged)'} "
            f"| {memory} |"
        )
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Keras backend {BACKEND} ({backend_versions()}), float32, epsilon={epsilon:g}"
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
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), help="BATCHxN, e.g. 1x1000")
    parser.add_argument("--epsilon", type=float, default=5e-4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--output", help="also write the table (markdown) to this file")
    parser.add_argument("--json", action="store_true", help="print one JSON row per size instead")
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
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    table = format_table(rows, args.epsilon)
    publish(table, args.output)


if __name__ == "__main__":
    main()
