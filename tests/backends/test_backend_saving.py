"""`.keras` files saved under each other Keras backend load here and predict the same.

For every backend other than the active one, a subprocess (with `KERAS_BACKEND` set to it)
builds a model of the six soft layers and a trained `QuantileObjectiveModel`, saves both as
`.keras` files with their predictions on fixed inputs (`.npz`), and this process loads them
and compares. Run under each backend (as `.ci/other_backends` does), this covers every direction.
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from harness import backend, to_numpy

import keras_softquantile as ksq

BACKENDS = ("tensorflow", "jax", "torch")
REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Run in the subprocess: writes layers.keras, model.keras and expected.npz to argv[1].
SAVE_SCRIPT = textwrap.dedent(
    """
    import os
    import sys

    import keras
    import numpy as np

    import keras_softquantile as ksq
    from keras_softquantile import layers

    assert keras.backend.backend() == os.environ["KERAS_BACKEND"], keras.backend.backend()
    directory = sys.argv[1]
    keras.utils.set_random_seed(0)
    # Compiled steps only where they are quick to compile (XLA on TensorFlow takes longer
    # than these few steps): the files do not depend on it.
    jit_compile = keras.backend.backend() == "jax"
    rng = np.random.default_rng(0)

    # A model of the six layers: values and scores [batch, 8].
    values_in = keras.Input((8,), name="values")
    scores_in = keras.Input((8,), name="scores")
    scores = keras.layers.Dense(8, name="scorer")(scores_in)
    topk = layers.SoftTopK(3, epsilon=0.05, name="topk")(scores)
    masks = layers.SoftQuantileMasks((0.25, 0.75), epsilon=0.05, name="masks")(scores)
    low, high = layers.SoftQuantileSplit(0.25, epsilon=0.05, output="mean", name="split")(
        [values_in, scores]
    )
    ordered = layers.SoftSort(epsilon=0.05, name="sort")(scores)
    ranks = layers.SoftRank(epsilon=0.05, trainable_epsilon=True, name="rank")(scores)
    quartiles = layers.SoftQuantiles([0.25, 0.75], epsilon=0.05, name="quantiles")(scores)
    layer_model = keras.Model(
        [values_in, scores_in], [topk, masks, low, high, ordered, ranks, quartiles]
    )
    values = rng.standard_normal((4, 8)).astype("float32")
    features = rng.standard_normal((4, 8)).astype("float32")
    layer_model.get_layer("topk").set_epsilon(0.02)
    layer_outputs = [keras.ops.convert_to_numpy(o) for o in layer_model([values, features])]
    layer_model.save(os.path.join(directory, "layers.keras"))

    # A trained QuantileObjectiveModel.
    A = rng.standard_normal((8, 20)).astype("float32")
    B = rng.standard_normal((8, 20, 3)).astype("float32")
    model = ksq.QuantileObjectiveModel("spread", quantile=0.2, epsilon=3e-2, seed=1)
    model.compile(optimizer=keras.optimizers.Adam(0.05), jit_compile=jit_compile)
    model.fit(x=(A, B), batch_size=4, epochs=1, verbose=0)
    model.set_epsilon(7e-3)
    model.save(os.path.join(directory, "model.keras"))
    selection = {
        name: keras.ops.convert_to_numpy(t) for name, t in model.selection(A, B).items()
    }
    metrics = model.evaluate(x=(A, B), batch_size=8, verbose=0, return_dict=True)
    np.savez(
        os.path.join(directory, "expected.npz"),
        values=values,
        features=features,
        A=A,
        B=B,
        theta=keras.ops.convert_to_numpy(model.theta),
        **{f"layer_output_{i}": np.asarray(o) for i, o in enumerate(layer_outputs)},
        **{f"selection_{name}": value for name, value in selection.items()},
        **{f"metric_{name}": np.asarray(value) for name, value in metrics.items()},
    )
    """
)


def _save_under(other: str, directory) -> dict:
    env = dict(os.environ, KERAS_BACKEND=other, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPOSITORY, env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-c", SAVE_SCRIPT, str(directory)],
        cwd=REPOSITORY,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = f"{completed.stdout}\n{completed.stderr[-5000:]}"
    assert completed.returncode == 0, f"saving under KERAS_BACKEND={other} failed:\n{output}"
    with np.load(os.path.join(directory, "expected.npz")) as data:
        return dict(data)


@pytest.mark.slow
@pytest.mark.parametrize("other", [b for b in BACKENDS if b != backend()])
def test_keras_files_saved_under_another_backend_load_here(other, tmp_path):
    expected = _save_under(other, tmp_path)

    layer_model = keras.models.load_model(os.path.join(tmp_path, "layers.keras"), safe_mode=True)
    outputs = to_numpy(layer_model([expected["values"], expected["features"]]))
    assert len(outputs) == 7
    for i, output in enumerate(outputs):
        np.testing.assert_allclose(
            output, expected[f"layer_output_{i}"], rtol=1e-4, atol=1e-5, err_msg=f"output {i}"
        )
    assert float(to_numpy(layer_model.get_layer("topk").get_epsilon())) == pytest.approx(0.02)

    model = keras.models.load_model(os.path.join(tmp_path, "model.keras"), safe_mode=True)
    assert isinstance(model, ksq.QuantileObjectiveModel)
    assert (model.quantile, model.output_mode) == (0.2, "weights")
    np.testing.assert_allclose(float(to_numpy(model.get_epsilon())), 7e-3, rtol=1e-6)
    np.testing.assert_array_equal(to_numpy(model.theta), expected["theta"])
    A, B = expected["A"], expected["B"]
    selection = to_numpy(model.selection(A, B))
    for name, value in selection.items():
        reference = expected[f"selection_{name}"]
        if value.dtype == bool:
            np.testing.assert_array_equal(value, reference, err_msg=name)
        else:
            np.testing.assert_allclose(value, reference, rtol=1e-4, atol=1e-5, err_msg=name)
    # Compiled again, with this backend's defaults and a new optimizer: the saved compile
    # configuration carries the saving backend's `jit_compile` (True from JAX would mean
    # `torch.compile` here), and Keras 3.15 itself cannot resume an optimizer saved under
    # another backend (a plain Sequential saved after `fit` under PyTorch fails in `fit`
    # under TensorFlow: "expected Tensor ... but got ResourceVariable").
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    metrics = model.evaluate(x=(A, B), batch_size=8, verbose=0, return_dict=True)
    for name, value in metrics.items():
        np.testing.assert_allclose(value, expected[f"metric_{name}"], rtol=1e-4, err_msg=name)
    history = model.fit(x=(A, B), batch_size=4, epochs=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
