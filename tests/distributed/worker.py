"""One worker process of the multi-worker tests: trains `QuantileObjectiveModel` on a planted
problem and writes its theta and logs to an `.npz` file.

Run by `test_multi_worker.py`, never collected by pytest:

    python worker.py --out theta.npz [--strategy multi_worker] [--backup DIR] [--pause-at S]

`TF_CONFIG` (set by the test) makes the process one worker of a cluster on 127.0.0.1; without
`--strategy multi_worker` it trains alone on the same global batches (the reference).
`--pause-at S` stops the process after step S of the whole run (counted from 1) and writes
`<out>.paused`, for the test to kill it there by its pid as a lost machine would stop: no
callback, no clean-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

INSTANCES, ENTRIES, FEATURES, GLOBAL_BATCH, EPOCHS = 32, 40, 4, 8, 3


def problem():
    """The planted problem and the starting theta, the same in every process."""
    rng = np.random.default_rng(0)
    B = rng.standard_normal((INSTANCES, ENTRIES, FEATURES)).astype("float32")
    A = (B @ rng.standard_normal(FEATURES) + rng.standard_normal((INSTANCES, ENTRIES))).astype(
        "float32"
    )
    start = rng.standard_normal(FEATURES).astype("float32")
    return A, B, start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", choices=["none", "multi_worker"], default="none")
    parser.add_argument("--backup", default=None, help="BackupAndRestore directory")
    parser.add_argument("--pause-at", type=int, default=None, help="global step to stop at")
    args = parser.parse_args(argv)

    import tensorflow as tf

    if args.strategy == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()

    import keras

    import keras_softquantile as ksq

    A, B, start = problem()
    options = tf.data.Options()
    # Each worker takes its share of every global batch (the batches themselves are the same
    # in every process, so the run sees the same global batches as one process).
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = tf.data.Dataset.from_tensor_slices((A, B)).batch(GLOBAL_BATCH).with_options(options)

    with strategy.scope():
        model = ksq.QuantileObjectiveModel("spread", num_features=FEATURES, epsilon=2e-2)
        model.build((None, ENTRIES, FEATURES))
        model.theta.assign(start)
        model.compile(optimizer=keras.optimizers.Adam(0.05))

    callbacks = []
    if args.backup is not None:
        callbacks.append(keras.callbacks.BackupAndRestore(args.backup, save_freq="epoch"))
    if args.pause_at is not None:
        steps_per_epoch = INSTANCES // GLOBAL_BATCH

        class Pause(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = epoch

            def on_train_batch_end(self, batch, logs=None):
                if self.epoch * steps_per_epoch + batch + 1 == args.pause_at:
                    with open(args.out + ".paused", "w") as marker:
                        marker.write(str(os.getpid()))
                    time.sleep(600)  # until the test kills this process

        callbacks.append(Pause())
    history = model.fit(dataset, epochs=EPOCHS, verbose=0, shuffle=False, callbacks=callbacks)
    theta = keras.ops.convert_to_numpy(model.theta)
    logs = {name: np.asarray(values) for name, values in history.history.items()}
    evaluation = model.evaluate(dataset, verbose=0, return_dict=True)
    logs.update({f"evaluate_{name}": np.asarray(value) for name, value in evaluation.items()})
    np.savez(args.out, theta=theta, epochs=len(history.epoch), **logs)
    print(json.dumps({"theta": theta.tolist(), "epochs": history.epoch}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
