"""Training throughput of `QuantileObjectiveModel.fit` on one worker and on two: TensorFlow's
`MultiWorkerMirroredStrategy` over two processes on 127.0.0.1, and JAX's
`keras.distribution.DataParallel` over two host CPU devices.

Each configuration runs in fresh processes (the strategy, `TF_CONFIG` and `XLA_FLAGS` are
read at start-up) on the same panel and global batches, and reports steady-state instances
per second: the panel's instances over the median epoch time, epochs after the first (which
traces and compiles). The one-worker run of each backend is the baseline of the same table.

Usage:
    python benchmarks/bench_workers.py                          # n = 2000, 256 instances
    python benchmarks/bench_workers.py --n 200 --instances 1024 --output results.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys

from _harness import epoch_timer, publish

M = 20


def _panel(instances: int, n: int):
    import numpy as np

    rng = np.random.default_rng(0)
    B = rng.standard_normal((instances, n, M)).astype("float32")
    A = (B @ rng.standard_normal(M) + rng.standard_normal((instances, n))).astype("float32")
    return A, B


def _train(spec: dict) -> dict:
    """One process's run (`--role`): the steady-state throughput it saw."""

    strategy = None
    if spec["role"] == "tf_worker":
        import tensorflow as tf

        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import keras

    import keras_softquantile as ksq

    if spec["role"] == "jax_two_devices":
        import jax

        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices("cpu"))
        )
    A, B = _panel(spec["instances"], spec["n"])
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        data = {
            "x": tf.data.Dataset.from_tensor_slices((A, B))
            .batch(spec["batch_size"])
            .with_options(options)
        }
    else:
        data = {"x": (A, B), "batch_size": spec["batch_size"]}

    scope = strategy.scope() if strategy is not None else _NoScope()
    with scope:
        keras.utils.set_random_seed(0)
        model = ksq.QuantileObjectiveModel("spread", num_features=M, epsilon=1e-2)
        model.compile(optimizer=keras.optimizers.Adam(0.01))
    timer = epoch_timer()
    model.fit(**data, epochs=spec["epochs"], verbose=0, shuffle=False, callbacks=[timer])
    return {"throughput": timer.steady_state(spec["instances"])}


class _NoScope:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for handle in sockets:
            handle.bind(("127.0.0.1", 0))
        return [handle.getsockname()[1] for handle in sockets]
    finally:
        for handle in sockets:
            handle.close()


def _run(spec: dict, env: dict, count: int = 1) -> list[dict]:
    """Runs `count` processes of `spec` at once (workers of one cluster when `count` > 1)."""
    base = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", **env)
    base.pop("TF_CONFIG", None)
    addresses = [f"127.0.0.1:{port}" for port in _free_ports(count)]
    processes = []
    for index in range(count):
        process_env = dict(base)
        if count > 1:
            process_env["TF_CONFIG"] = json.dumps(
                {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
            )
        processes.append(
            subprocess.Popen(
                [sys.executable, __file__, "--spec", json.dumps(spec)],
                env=process_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for process in processes:
        out, err = process.communicate(timeout=1800)
        if process.returncode != 0:
            raise RuntimeError(f"{spec['role']} failed:\n{err[-4000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def measure(n: int, instances: int, batch_size: int, epochs: int, backends: list[str]) -> list:
    spec = {"n": n, "instances": instances, "batch_size": batch_size, "epochs": epochs}
    rows = []
    if "tensorflow" in backends:
        tf_env = {"KERAS_BACKEND": "tensorflow"}
        one = _run({**spec, "role": "tf_single"}, tf_env)[0]["throughput"]
        # Every worker sees every global batch's time; worker 0's figure is the cluster's.
        two = _run({**spec, "role": "tf_worker"}, tf_env, count=2)[0]["throughput"]
        rows.append(("TensorFlow, MultiWorkerMirroredStrategy (processes)", one, two))
        print("measured TensorFlow", file=sys.stderr, flush=True)
    if "jax" in backends:
        jax_env = {
            "KERAS_BACKEND": "jax",
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        }
        one = _run({**spec, "role": "jax_one_device"}, jax_env)[0]["throughput"]
        two = _run({**spec, "role": "jax_two_devices"}, jax_env)[0]["throughput"]
        rows.append(("JAX, keras.distribution.DataParallel (host devices)", one, two))
        print("measured JAX", file=sys.stderr, flush=True)
    return rows


def format_table(rows: list, n: int, instances: int, batch_size: int) -> str:
    lines = [
        "| backend, engine | 1 worker (inst/s) | 2 workers (inst/s) | speed-up |",
        "|---|---|---|---|",
    ]
    for name, one, two in rows:
        lines.append(f"| {name} | {one:.0f} | {two:.0f} | {two / one:.2f}x |")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return (
        "\n".join(lines)
        + f"\n\nn = {n} entries, M = {M} features, {instances} instances, global batch "
        f"{batch_size}, float32. Machine: {machine}. Steady-state medians.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--instances", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument(
        "--backends", nargs="+", choices=("tensorflow", "jax"), default=["tensorflow", "jax"]
    )
    parser.add_argument("--output")
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.spec:
        print(json.dumps(_train(json.loads(args.spec))))
        return
    if args.epochs < 2:
        parser.error(f"--epochs must be at least 2 (the first compiles). Received: {args.epochs}")
    if args.batch_size % 2:
        parser.error(
            f"--batch-size must be even (split over 2 workers). Received: {args.batch_size}"
        )
    rows = measure(args.n, args.instances, args.batch_size, args.epochs, args.backends)
    table = format_table(rows, args.n, args.instances, args.batch_size)
    publish(table, args.output)


if __name__ == "__main__":
    main()
