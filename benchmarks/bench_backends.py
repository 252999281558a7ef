"""`bench_ops.py` on every Keras backend, in rounds taken in turn: one table of medians.

Each round runs `bench_ops.py --json --no-memory` once per backend (a fresh process each:
Keras reads the backend at import), one backend after the other. A slow spell of a shared
machine then falls on every backend alike, and each ratio to TensorFlow under XLA is taken
within one round (the runs minutes apart at most) before the median over the rounds is taken.

Columns: the hard sort and the soft forward+backward of `soft_quantile_masks` (see
`bench_ops.py`) per backend and mode, TensorFlow's graph mode over its XLA, and JAX's and
PyTorch's time over TensorFlow's under XLA; every figure is the median over the rounds.

Usage:
    python benchmarks/bench_backends.py                              # 3 rounds, all sizes
    python benchmarks/bench_backends.py --rounds 5 --sizes 256x1000 --output results.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from collections import defaultdict

import numpy as np
from _harness import BACKENDS, publish

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = ("1x1000", "256x1000", "1x100000", "1x1000000")


def run_backend(backend: str, sizes: list[str], epsilon: float, repeats: int) -> dict:
    """`{size: bench_ops row}` of one `bench_ops.py` process under `backend`."""
    command = [
        sys.executable,
        os.path.join(HERE, "bench_ops.py"),
        "--backend",
        backend,
        "--json",
        "--no-memory",
        "--epsilon",
        str(epsilon),
        "--repeats",
        str(repeats),
        "--sizes",
        *sizes,
    ]
    env = dict(os.environ, KERAS_BACKEND=backend)
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    rows = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return {row["size"]: row for row in rows}


def versions() -> str:
    """The frameworks' versions, read in a subprocess per backend (not imported here)."""
    found = []
    for backend in BACKENDS:
        code = "from _harness import backend_versions; print(backend_versions())"
        env = dict(os.environ, KERAS_BACKEND=backend)
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=HERE
        )
        found.append(result.stdout.strip() or f"{backend}: not installed")
    return ", ".join(found)


def summarize(rounds: list[dict], sizes: list[str]) -> list[dict]:
    """Per size, the median over the rounds of each time and of each within-round ratio, and
    the range of each ratio (`NAME_range`)."""
    rows = []
    for size in sizes:
        cells = defaultdict(list)
        for measured in rounds:
            tf_row = measured["tensorflow"][size]
            xla = tf_row["soft_ms"]["XLA"]
            cells["tf_sort_graph"].append(tf_row["sort_ms"]["graph"])
            cells["tf_sort_xla"].append(tf_row["sort_ms"]["XLA"])
            cells["tf_graph"].append(tf_row["soft_ms"]["graph"])
            cells["tf_xla"].append(xla)
            cells["graph_over_xla"].append(tf_row["soft_ms"]["graph"] / xla)
            for backend, mode in (("jax", "jit"), ("torch", "eager")):
                if backend in measured:
                    row = measured[backend][size]
                    cells[f"{backend}_sort"].append(next(iter(row["sort_ms"].values())))
                    cells[f"{backend}_soft"].append(row["soft_ms"][mode])
                    cells[f"{backend}_over_xla"].append(row["soft_ms"][mode] / xla)
        row = {"size": size, "rounds": len(rounds)}
        for name, values in cells.items():
            row[name] = float(np.median(values))
            if name.endswith("_over_xla"):
                row[f"{name}_range"] = (float(np.min(values)), float(np.max(values)))
        rows.append(row)
    return rows


def worst_mass_errors(rounds: list[dict]) -> str:
    """The largest relative error of a bucket's mass per backend, over every size and round."""
    worst = {}
    for measured in rounds:
        for backend, rows in measured.items():
            errors = [row["mass_error"] for row in rows.values()]
            worst[backend] = max(worst.get(backend, 0.0), *errors)
    return ", ".join(f"{backend} {error:.1e}" for backend, error in worst.items())


def format_table(rows: list[dict], epsilon: float, backends: list[str]) -> str:
    def ratio(row, name):
        low, high = row[f"{name}_range"]
        return f"{row[name]:.2f}x ({low:.2f}-{high:.2f})"

    header = "| batch x n | tf.sort graph / XLA (ms) | TF soft graph / XLA (ms) | TF graph / XLA "
    columns = 4
    if "jax" in backends:
        header += "| jnp.sort (ms) | JAX soft, jit (ms) | JAX / TF-XLA "
        columns += 3
    if "torch" in backends:
        header += "| torch.sort (ms) | PyTorch soft, eager (ms) | PyTorch / TF-XLA "
        columns += 3
    lines = [header + "|", "|---" * columns + "|"]
    for r in rows:
        line = (
            f"| {r['size']} | {r['tf_sort_graph']:.2f} / {r['tf_sort_xla']:.2f} "
            f"| {r['tf_graph']:.2f} / {r['tf_xla']:.2f} | {ratio(r, 'graph_over_xla')} "
        )
        if "jax" in backends:
            line += f"| {r['jax_sort']:.2f} | {r['jax_soft']:.2f} | {ratio(r, 'jax_over_xla')} "
        if "torch" in backends:
            line += (
                f"| {r['torch_sort']:.2f} | {r['torch_soft']:.2f} | {ratio(r, 'torch_over_xla')} "
            )
        lines.append(line + "|")
    rounds = rows[0]["rounds"] if rows else 0
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {versions()}; "
        f"float32, epsilon={epsilon:g}"
    )
    return (
        "\n".join(lines)
        + f"\n\nMachine: {machine}. Medians over {rounds} rounds (backends taken in turn); "
        "ratios taken within each round, their range over the rounds in brackets.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), help="BATCHxN, e.g. 1x1000")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=5e-4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", help="also write the table (markdown) to this file")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1. Received: {args.rounds}")
    if "tensorflow" not in args.backends:
        parser.error(
            f"--backends must include tensorflow (the reference). Received: {args.backends}"
        )
    rounds = []
    for number in range(args.rounds):
        measured = {}
        for backend in args.backends:
            measured[backend] = run_backend(backend, args.sizes, args.epsilon, args.repeats)
            print(f"round {number + 1}: {backend} measured", file=sys.stderr, flush=True)
        rounds.append(measured)
    table = format_table(summarize(rounds, args.sizes), args.epsilon, args.backends)
    table += f"Worst relative error of a bucket's mass: {worst_mass_errors(rounds)}.\n"
    publish(table, args.output)


if __name__ == "__main__":
    main()
