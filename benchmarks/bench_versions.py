"""Old against new: the TensorFlow timings of two versions of this package, interleaved.

Runs `bench_ops.py --json` alternately on the working tree and on another checkout of the
package (`--baseline DIR`, a directory that contains a `keras_softquantile` package, e.g. made
with `git archive <commit> keras_softquantile | tar -x -C DIR`), `--rounds` times each, every
run in a fresh process, and prints per size the median ratio of the soft forward+backward time
to the faster `tf.sort` for both, in graph mode and under XLA. Interleaving spreads the
machine's noise over both versions alike; compare the ratios, not the milliseconds.

Usage:
    git archive HEAD~5 keras_softquantile | tar -x -C /tmp/baseline
    python benchmarks/bench_versions.py --baseline /tmp/baseline --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run(tree: str, sizes: list[str], epsilon: float, repeats: int) -> list[dict]:
    env = dict(os.environ, KERAS_BACKEND="tensorflow", PYTHONPATH=tree)
    command = [sys.executable, os.path.join(HERE, "bench_ops.py"), "--backend", "tensorflow"]
    command += ["--sizes", *sizes, "--epsilon", str(epsilon), "--repeats", str(repeats)]
    command += ["--no-memory", "--json"]
    output = subprocess.run(
        command, check=True, capture_output=True, text=True, env=env, cwd=tree
    ).stdout
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="directory holding the old package")
    parser.add_argument("--sizes", nargs="+", default=["256x1000", "1x100000", "1x1000000"])
    parser.add_argument("--epsilon", type=float, default=5e-4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not os.path.isdir(os.path.join(args.baseline, "keras_softquantile")):
        raise SystemExit(
            "`--baseline` must contain a keras_softquantile package. "
            f"Received: --baseline={args.baseline!r}"
        )
    trees = {"old": os.path.abspath(args.baseline), "new": ROOT}
    rows: dict[tuple[str, str], list[dict]] = {}
    for round_index in range(args.rounds):
        for name, tree in trees.items():
            for row in run(tree, args.sizes, args.epsilon, args.repeats):
                rows.setdefault((name, row["size"]), []).append(row)
            print(f"round {round_index + 1}: {name} done", file=sys.stderr, flush=True)

    def median(name: str, size: str, key) -> float:
        return float(np.median([key(r) for r in rows[(name, size)]]))

    def ratio(mode):
        return lambda r: r["soft_ms"][mode] / min(r["sort_ms"].values())

    print(
        "| batch x n | XLA / tf.sort old | new | new vs old | graph / tf.sort old | new "
        "| new vs old | new graph / new XLA |\n|---|---|---|---|---|---|---|---|"
    )
    for size in args.sizes:
        xla_old, xla_new = (median(v, size, ratio("XLA")) for v in ("old", "new"))
        graph_old, graph_new = (median(v, size, ratio("graph")) for v in ("old", "new"))
        graph_xla = median("new", size, lambda r: r["soft_ms"]["graph"] / r["soft_ms"]["XLA"])
        print(
            f"| {size} | {xla_old:.2f}x | {xla_new:.2f}x | {xla_new / xla_old:.2f} "
            f"| {graph_old:.2f}x | {graph_new:.2f}x | {graph_new / graph_old:.2f} "
            f"| {graph_xla:.2f}x |"
        )
    print(
        f"\nMedians of {args.rounds} interleaved rounds (fresh process each), float32, "
        f"epsilon={args.epsilon:g}, {os.cpu_count()} cores."
    )


if __name__ == "__main__":
    main()
