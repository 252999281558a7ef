"""Training throughput of `QuantileObjectiveModel.fit`: in memory, streamed from files, and
against the same scorer trained with mean squared error.

For each n (entries per instance) it generates a panel of instances with M features, and
measures steady-state instances per second (epochs after the first, which traces and
compiles, median over `--epochs - 1` epochs; the median of `--rounds` fits of each
configuration, taken in turn) of:
  * "MSE": a `keras.Sequential` with one bias-free `Dense(1)` on `B` (the linear scorer
    `C = B @ theta`), `fit` with mean squared error against `A`: the cost of a training step
    without the soft selection;
  * "in memory": `QuantileObjectiveModel("spread")`, `fit(x=(A, B))` as Keras compiles it
    by default (on CPU-only TensorFlow: a graph without XLA);
  * "in memory, XLA": the same with `compile(jit_compile=True)` (XLA on TensorFlow);
  * "streamed": the same model on `ksq.data.instances_from_files`, padded to n, over the
    panel written to a temporary directory first (not timed): one `.npz` file per instance,
    and TFRecord shards of 256 instances (`save_instances(file_format="tfrecord")`).
Each row also gives the peak resident memory of a fresh process that streams the panel from
TFRecord shards, for the panel and for one `--scale` times larger (more instances of the same
n): streaming holds the batches in flight, so the two should be close.

Usage:
    python benchmarks/bench_training.py                      # n in 200 2000 20000
    python benchmarks/bench_training.py --sizes 200 --instances 256 --output results.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile

from _harness import backend_versions, epoch_timer, publish, select_backend

select_backend()

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_softquantile as ksq  # noqa: E402

M = 20


def panel(instances: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((instances, n, M)).astype("float32")
    A = (B @ rng.standard_normal(M) + rng.standard_normal((instances, n))).astype("float32")
    return A, B


def throughput(fit, instances: int, epochs: int) -> float:
    """Instances per second over the epochs after the first (median)."""
    timer = epoch_timer()
    fit(timer, epochs)
    return timer.steady_state(instances)


def measure(
    n: int, instances: int, batch_size: int, epochs: int, rounds: int, directory: str
) -> dict:
    A, B = panel(instances, n)

    def mse(timer, epochs):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((n, M)), keras.layers.Dense(1, use_bias=False)])
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        model.fit(
            B, A[..., None], batch_size=batch_size, epochs=epochs, verbose=0, callbacks=[timer]
        )

    def objective_model(jit_compile="auto"):
        keras.utils.set_random_seed(0)
        model = ksq.QuantileObjectiveModel("spread", num_features=M, epsilon=1e-2)
        model.compile(optimizer=keras.optimizers.Adam(0.01), jit_compile=jit_compile)
        return model

    def in_memory(timer, epochs, jit_compile="auto"):
        objective_model(jit_compile).fit(
            x=(A, B), batch_size=batch_size, epochs=epochs, verbose=0, callbacks=[timer]
        )

    def in_memory_xla(timer, epochs):
        in_memory(timer, epochs, jit_compile=True)

    files = {}
    for file_format in ksq.data.FILE_FORMATS:
        files[file_format] = os.path.join(directory, f"n{n}_{file_format}")
        ksq.data.save_instances(files[file_format], list(A), list(B), file_format=file_format)

    def streamed(timer, epochs, file_format="npz"):
        dataset = ksq.data.instances_from_files(files[file_format], batch_size=batch_size, pad_to=n)
        objective_model().fit(dataset, epochs=epochs, verbose=0, callbacks=[timer])

    def streamed_tfrecord(timer, epochs):
        streamed(timer, epochs, file_format="tfrecord")

    row = {"n": n, "instances": instances}
    fits = (
        ("mse", mse),
        ("in_memory", in_memory),
        ("in_memory_xla", in_memory_xla),
        ("streamed", streamed),
        ("streamed_tfrecord", streamed_tfrecord),
    )
    # Round-robin over the configurations, so that a slow spell of a shared machine falls on
    # all of them; each figure is the median over the rounds.
    measured = {name: [] for name, _ in fits}
    for _ in range(rounds):
        for name, fit in fits:
            measured[name].append(throughput(fit, instances, epochs))
    row.update({name: float(np.median(values)) for name, values in measured.items()})
    return row


def peak_memory_mb(n: int, instances: int, batch_size: int, directory: str) -> float:
    """Peak resident memory of a fresh process that writes and streams the panel once."""
    command = [
        sys.executable,
        __file__,
        "--probe",
        json.dumps(
            {"n": n, "instances": instances, "batch_size": batch_size, "directory": directory}
        ),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


def probe(spec: dict) -> None:
    files = os.path.join(spec["directory"], f"probe_{spec['n']}_{spec['instances']}")
    rng = np.random.default_rng(0)
    paths = []
    for start in range(0, spec["instances"], 256):  # written in chunks: memory stays bounded
        count = min(256, spec["instances"] - start)
        B = rng.standard_normal((count, spec["n"], M)).astype("float32")
        A = (B[..., 0] + rng.standard_normal((count, spec["n"]))).astype("float32")
        chunk = os.path.join(files, f"chunk_{start:08d}")
        paths += ksq.data.save_instances(chunk, list(A), list(B), file_format="tfrecord")
        del A, B
    model = ksq.QuantileObjectiveModel("spread", num_features=M, epsilon=1e-2)
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    dataset = ksq.data.instances_from_files(paths, batch_size=spec["batch_size"], pad_to=spec["n"])
    model.fit(dataset, epochs=1, verbose=0)
    print(json.dumps({"peak_mb": peak_resident_mb()}))


def peak_resident_mb() -> float:
    """This process's peak resident memory. `getrusage`'s `ru_maxrss` would not do: it is kept
    across `fork` and `exec`, so a probe would report its parent's size when that is larger
    (earlier versions of this benchmark published the parent's). `VmHWM` belongs to the
    process's own memory map."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def format_table(rows: list[dict], scale: int, rounds: int) -> str:
    lines = [
        "| n | instances | MSE (inst/s) | in memory (inst/s) | in memory, XLA (inst/s) "
        "| streamed .npz (inst/s) | streamed TFRecord (inst/s) | in memory / MSE "
        "| in memory, XLA / MSE | streamed .npz / in memory | streamed TFRecord / in memory "
        f"| peak MiB streamed: 1x / {scale}x instances |",
        "|---" * 12 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['instances']} | {r['mse']:.0f} | {r['in_memory']:.0f} "
            f"| {r['in_memory_xla']:.0f} | {r['streamed']:.0f} | {r['streamed_tfrecord']:.0f} "
            f"| {r['in_memory'] / r['mse']:.2f}x | {r['in_memory_xla'] / r['mse']:.2f}x "
            f"| {r['streamed'] / r['in_memory']:.2f}x "
            f"| {r['streamed_tfrecord'] / r['in_memory']:.2f}x "
            f"| {r['peak_mb']:.0f} / {r['peak_mb_scaled']:.0f} |"
        )
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Keras backend {keras.backend.backend()} ({backend_versions()}), float32, M={M}"
    )
    return "\n".join(lines) + f"\n\nMachine: {machine}. Steady-state medians of {rounds} rounds.\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("tensorflow", "jax", "torch"))
    parser.add_argument("--sizes", nargs="+", type=int, default=[200, 2000, 20000])
    parser.add_argument(
        "--instances",
        type=int,
        default=None,
        help="instances per panel (default: 1e6 / n, at least 256)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=11)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="fits of each configuration, taken in turn; the table gives their median",
    )
    parser.add_argument("--output")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(json.loads(args.probe))
        return
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1. Received: {args.rounds}")
    if args.epochs < 2:
        parser.error(f"--epochs must be at least 2 (the first compiles). Received: {args.epochs}")
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for n in args.sizes:
            instances = args.instances or max(256, 1_000_000 // n)
            row = measure(n, instances, args.batch_size, args.epochs, args.rounds, directory)
            row["peak_mb"] = peak_memory_mb(n, instances, args.batch_size, directory)
            row["peak_mb_scaled"] = peak_memory_mb(
                n, args.scale * instances, args.batch_size, directory
            )
            rows.append(row)
            print(f"measured n={n}", file=sys.stderr, flush=True)
    table = format_table(rows, args.scale, args.rounds)
    publish(table, args.output)


if __name__ == "__main__":
    main()
