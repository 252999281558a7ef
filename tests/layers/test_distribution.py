"""Training under `tf.distribute.MirroredStrategy` over two logical CPU devices.

Logical devices must be configured before TensorFlow initialises its devices, which the
other tests in this process have already done, so the scenario runs in a fresh interpreter.
"""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )

    import keras

    from keras_softquantile import layers, ops

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync

    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 6)).astype("float32")
    y_topk = (x >= np.sort(x, axis=-1)[:, -2:-1]).astype("float32")

    with strategy.scope():
        inputs = keras.Input((6,))
        scores = keras.layers.Dense(6, name="scorer")(inputs)
        topk = layers.SoftTopK(2, epsilon=0.2, name="topk")
        model = keras.Model(inputs, {"topk": topk(scores)})
        model.compile(keras.optimizers.Adam(0.01), "mse")

    assert isinstance(topk.epsilon_variable.value, tf.distribute.DistributedValues) or (
        "Mirrored" in type(topk.epsilon_variable.value).__name__
    ), type(topk.epsilon_variable.value)

    class Anneal(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            topk.set_epsilon([0.2, 0.1, 0.05][epoch])

    kernel = model.get_layer("scorer").kernel
    before = kernel.numpy().copy()
    history = model.fit(
        x, {"topk": y_topk}, epochs=3, batch_size=16, verbose=0,
        callbacks=[Anneal()],
    )
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)), losses
    assert not np.allclose(kernel.numpy(), before)  # gradients flowed through SoftTopK
    replicas = strategy.experimental_local_results(kernel.value)
    assert len(replicas) == 2
    np.testing.assert_array_equal(replicas[0].numpy(), replicas[1].numpy())
    epsilons = strategy.experimental_local_results(topk.epsilon_variable.value)
    assert [float(e) for e in epsilons] == [float(np.float32(0.05))] * 2, epsilons
    assert abs(float(topk.get_epsilon()) - 0.05) < 1e-7

    predicted = model(x)
    hidden = model.get_layer("scorer")(x)
    np.testing.assert_allclose(
        predicted["topk"], ops.soft_topk_mask(hidden, 2, epsilon=0.05), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(np.sum(predicted["topk"], -1), 2.0, rtol=1e-4)
    print("DISTRIBUTED_OK", losses)
    """
)


@pytest.mark.slow
def test_fit_under_mirrored_strategy_on_two_logical_cpus():
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "DISTRIBUTED_OK" in completed.stdout
