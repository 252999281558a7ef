"""`QuantileObjectiveModel.fit` on JAX under `keras.distribution.DataParallel` over two host
CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=2`) gives the theta of one
device. Run in a subprocess: the flag and the backend are read when JAX and Keras start."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import jax
    import keras
    from keras.src.backend.jax import distribution_lib

    import keras_softquantile as ksq

    devices = jax.devices("cpu")
    assert len(devices) == 2, devices
    rng = np.random.default_rng(0)
    B = rng.standard_normal((32, 40, 4)).astype("float32")
    A = (B @ rng.standard_normal(4) + rng.standard_normal((32, 40))).astype("float32")
    start = rng.standard_normal(4).astype("float32")

    # Records over how many devices Keras lays out each batch's A.
    spread_over = []
    distribute = distribution_lib.distribute_data_input

    def recorded(per_process_batch, layout, batch_dim_name):
        batch = distribute(per_process_batch, layout, batch_dim_name)
        if batch.ndim == 2:
            spread_over.append(len(batch.sharding.device_set))
        return batch

    distribution_lib.distribute_data_input = recorded

    def train(distribution):
        keras.distribution.set_distribution(distribution)
        model = ksq.QuantileObjectiveModel("spread", num_features=4, epsilon=2e-2)
        model.build((None, 40, 4))
        model.theta.assign(start)
        model.compile(optimizer=keras.optimizers.Adam(0.05))
        history = model.fit(x=(A, B), batch_size=8, epochs=3, verbose=0, shuffle=False)
        devices_of_theta = len(model.theta.value.sharding.device_set)
        return keras.ops.convert_to_numpy(model.theta), history.history, devices_of_theta

    theta_one, logs_one, on_one = train(None)
    assert spread_over == [] and on_one == 1, (spread_over, on_one)
    theta_two, logs_two, on_two = train(keras.distribution.DataParallel(devices=devices))
    # 4 batches of 8 per epoch, each split over the two devices; theta replicated on both.
    assert len(spread_over) == 12 and set(spread_over) == {2}, spread_over
    assert on_two == 2
    assert not np.allclose(theta_one, start)
    np.testing.assert_allclose(theta_two, theta_one, rtol=1e-5, atol=1e-6)
    for name in ("loss", "hard_objective", "selection_agreement"):
        np.testing.assert_allclose(logs_two[name], logs_one[name], rtol=1e-5, atol=1e-6)
    print("OK", theta_two)
    """
)


def test_data_parallel_over_two_devices_gives_the_one_device_theta():
    pytest.importorskip("jax", reason="the JAX backend is an extra: pip install '.[jax]'")
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "OK" in result.stdout
