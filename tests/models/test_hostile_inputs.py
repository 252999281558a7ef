"""QuantileObjectiveModel on hostile data (issue 11, point 6), with and without XLA.

Bad values of A or B must raise an error that names the argument before any update, also
under `jit_compile=True` (where an assertion inside the compiled step cannot raise), for
array and dataset input and for `fit`, `evaluate` and `predict`.
"""

import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from problems import Interrupt

import keras_softquantile as ksq

ERRORS = (ValueError, tf.errors.InvalidArgumentError)
JIT = pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
# Training steps that run (not just fail) under XLA compile for several seconds on the CPU.
JIT_SLOW_XLA = pytest.mark.parametrize(
    "jit_compile", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["graph", "xla"]
)


def _problem(instances=8, n=12, features=3, seed=0):
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((instances, n, features)).astype("float32")
    A = (B @ rng.standard_normal(features) + rng.standard_normal((instances, n))).astype("float32")
    return A, B


def _model(jit_compile, run_eagerly=False, **kwargs):
    kwargs.setdefault("num_features", 3)
    model = ksq.QuantileObjectiveModel("spread", **kwargs)
    model.compile(
        optimizer=keras.optimizers.Adam(0.05), jit_compile=jit_compile, run_eagerly=run_eagerly
    )
    return model


def _theta(model):
    return keras.ops.convert_to_numpy(model.theta).copy()


def _call(model, entry, A, B, as_dataset):
    data = tf.data.Dataset.from_tensor_slices((A, B)).batch(4) if as_dataset else (A, B)
    batch = {} if as_dataset else {"batch_size": 4}
    if entry == "fit":
        return model.fit(data, epochs=1, verbose=0, shuffle=False, **batch)
    if entry == "evaluate":
        return model.evaluate(data, verbose=0, return_dict=True, **batch)
    return model.predict(data, verbose=0, **batch)


BAD_VALUES = {
    # name: (array, index, value, expected message)
    "nan_B": (
        "B",
        (1, 3, 0),
        np.nan,
        r"`B` must be finite wherever A is not NaN.*B\[1, 3, 0\]=nan",
    ),
    "inf_B": (
        "B",
        (2, 5, 2),
        -np.inf,
        r"`B` must be finite wherever A is not NaN.*B\[2, 5, 2\]=-inf",
    ),
    "inf_A": ("A", (1, 3), np.inf, r"`A` must be finite or NaN.*Received: A\[1, 3\]=inf"),
}


def _cases():
    """Every entry point with array and dataset input, with and without XLA; each bad value
    appears with every entry point (a Latin square keeps the count at 12)."""
    kinds = sorted(BAD_VALUES)
    cases = []
    for e, entry in enumerate(("fit", "evaluate", "predict")):
        for d, as_dataset in enumerate((False, True)):
            for j, jit_compile in enumerate((False, True)):
                bad = kinds[(e + d + j) % 3]
                ids = f"{entry}-{'dataset' if as_dataset else 'arrays'}-{'xla' if j else 'graph'}"
                cases.append(pytest.param(entry, as_dataset, jit_compile, bad, id=f"{ids}-{bad}"))
    return cases


class TestBadValuesRaiseBeforeAnyUpdate:
    @pytest.mark.parametrize(("entry", "as_dataset", "jit_compile", "bad"), _cases())
    @pytest.mark.slow
    def test_names_the_argument_and_the_entry(self, entry, as_dataset, jit_compile, bad):
        name, index, value, match = BAD_VALUES[bad]
        A, B = _problem()
        (A if name == "A" else B)[index] = value
        model = _model(jit_compile)
        start = _theta(model)
        with pytest.raises(ERRORS, match=match):
            _call(model, entry, A, B, as_dataset)
        np.testing.assert_array_equal(_theta(model), start)  # the first step never ran

    @JIT_SLOW_XLA
    @pytest.mark.slow
    def test_a_bad_later_batch_stops_training_with_finite_theta(self, jit_compile):
        A, B = _problem()
        B[6, 2, 1] = np.nan  # row 2 of the second batch of 4
        model = _model(jit_compile)
        start = _theta(model)
        with pytest.raises(ERRORS, match=r"Received: B\[2, 2, 1\]=nan"):
            model.fit(x=(A, B), batch_size=4, epochs=1, verbose=0, shuffle=False)
        theta = _theta(model)
        assert np.isfinite(theta).all()
        assert not np.array_equal(theta, start)  # the first batch trained

    def test_the_keras_hook_that_runs_the_checks_exists(self):
        # The checks wrap Keras's per-batch step in `_autoconvert_optionals` (outside XLA); a
        # Keras upgrade that renames it would silently drop them under XLA.
        from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

        assert callable(getattr(TensorFlowTrainer, "_autoconvert_optionals", None))
        model = _model(jit_compile=True)
        model.make_train_function()
        model.make_predict_function()
        assert model.train_function is not None and model.predict_function is not None

    def test_run_eagerly_raises_a_value_error(self):
        A, B = _problem()
        B[0, 0, 0] = np.nan
        model = _model(jit_compile=False, run_eagerly=True)
        with pytest.raises(ValueError, match=r"Received: B\[0, 0, 0\]=nan"):
            model.fit(x=(A, B), batch_size=4, epochs=1, verbose=0, shuffle=False)

    def test_selection_checks_eagerly_and_in_a_graph(self):
        A, B = _problem()
        A[3, 4] = -np.inf
        model = ksq.QuantileObjectiveModel("spread", num_features=3)
        with pytest.raises(ValueError, match=r"Received: A\[3, 4\]=-inf"):
            model.selection(A, B)
        with pytest.raises(ValueError, match=r"Received: A\[3, 4\]=-inf"):
            model.selection(A, B, soft=False)
        graph = tf.function(lambda a, b: model.selection(a, b, soft=False)["upper_mask"])
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"Received: A\[3, 4\]=-inf"):
            graph(tf.constant(A), tf.constant(B))

    @JIT_SLOW_XLA
    @pytest.mark.slow
    def test_nan_features_at_padding_are_ignored(self, jit_compile):
        A, B = _problem()
        A[:4, 9:] = np.nan
        B[:4, 9:] = np.nan
        model = _model(jit_compile)
        history = model.fit(x=(A, B), batch_size=4, epochs=2, verbose=0)
        assert np.isfinite(history.history["loss"]).all()
        assert np.isfinite(_theta(model)).all()
        masks = model.predict((A, B), batch_size=4, verbose=0)
        assert (masks["upper_mask"][:4].sum(-1) == 2).all()  # floor(0.25 * 9)
        assert (masks["upper_mask"][4:].sum(-1) == 3).all()  # floor(0.25 * 12)


class TestHugeValues:
    @JIT
    def test_values_beyond_the_limit_raise_naming_a(self, jit_compile):
        A, B = _problem()
        A[2, 7] = 1e30
        model = _model(jit_compile)
        start = _theta(model)
        match = r"`A` is too large: \|A\| must be at most 4\.295e\+09 in float32.*A\[2, 7\]=1e\+30"
        with pytest.raises(ERRORS, match=match):
            model.fit(x=(A, B), batch_size=4, epochs=1, verbose=0, shuffle=False)
        np.testing.assert_array_equal(_theta(model), start)

    @JIT_SLOW_XLA
    @pytest.mark.slow
    def test_values_up_to_the_limit_train_like_unit_values(self, jit_compile):
        A, B = _problem()
        scale = 4.2e9 / np.abs(A).max()
        results = []
        for values in (A, (A * scale).astype("float32")):
            keras.utils.set_random_seed(0)
            model = _model(jit_compile)
            history = model.fit(x=(values, B), batch_size=4, epochs=3, verbose=0, shuffle=False)
            results.append((_theta(model), np.array(history.history["hard_objective"])))
        (theta, hard), (big_theta, big_hard) = results
        assert np.isfinite(big_theta).all()
        assert big_hard[-1] < big_hard[0] - 1e9  # it learns
        # Adam is invariant to the scale of the objective: the same theta as with unit values.
        np.testing.assert_allclose(big_theta, theta, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(big_hard / scale, hard, rtol=1e-3, atol=1e-4)

    def test_the_limit_is_the_fourth_root_of_the_largest_value(self):
        model = ksq.QuantileObjectiveModel("spread", num_features=3)
        assert model._max_abs_value() == pytest.approx(np.finfo("float32").max ** 0.25)
        assert model._max_abs_value() == pytest.approx(2.0**32)
        wide = ksq.QuantileObjectiveModel("spread", num_features=3, dtype="float64")
        assert wide._max_abs_value() == pytest.approx(np.finfo("float64").max ** 0.25)

    def test_a_float64_model_takes_larger_values(self):
        A, B = _problem()
        model = ksq.QuantileObjectiveModel("spread", num_features=3, dtype="float64")
        selection = model.selection((A * 1e30).astype("float64"), B.astype("float64"))
        assert selection["scores"].dtype == tf.float64
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(selection["upper_membership"]).sum(-1), 3.0, rtol=1e-6
        )


class TestShortInstances:
    @pytest.mark.parametrize(
        ("quantile", "expected"), [(0.25, 4), (0.5, 2), (1 / 3, 3), (0.3, 4), (0.1, 10), (0.49, 3)]
    )
    def test_minimum_length(self, quantile, expected):
        model = ksq.QuantileObjectiveModel("spread", quantile=quantile)
        assert model._min_length() == expected
        assert math.floor(quantile * expected + 1e-9) == 1
        assert math.floor(quantile * (expected - 1) + 1e-9) == 0

    @JIT
    @pytest.mark.parametrize("estimator", ["ot", "perturbed"])
    @pytest.mark.parametrize("output", ["sorted", "weights", "mean"])
    def test_rows_too_short_for_the_quantile_fail_before_training(
        self, jit_compile, estimator, output
    ):
        A, B = _problem(n=3)
        model = _model(jit_compile, output=output, gradient_estimator=estimator, seed=1)
        start = _theta(model)
        match = r"quantile=0\.25 each instance needs at least 4 valid entries.*A\.shape=\(\w+, 3\)"
        with pytest.raises(ValueError, match=match):
            model.fit(x=(A, B), batch_size=4, epochs=1, verbose=0, shuffle=False)
        with pytest.raises(ValueError, match=match):
            model.evaluate(x=(A, B), batch_size=4, verbose=0)
        np.testing.assert_array_equal(_theta(model), start)

    @JIT_SLOW_XLA
    @pytest.mark.parametrize("output", ["weights", "mean"])
    def test_a_padded_row_too_short_names_the_row(self, jit_compile, output):
        A, B = _problem()
        A[5, 3:] = np.nan  # 3 valid entries in row 1 of the second batch
        model = _model(jit_compile, output=output)
        match = r"at least 4 valid entries.*Received: A\[1\] with 3 valid entries"
        with pytest.raises(ERRORS, match=match):
            model.fit(x=(A, B), batch_size=4, epochs=1, verbose=0, shuffle=False)
        assert np.isfinite(_theta(model)).all()
        A[5, 3] = 0.5  # 4 valid entries: one per bucket
        history = model.fit(x=(A, B), batch_size=4, epochs=1, verbose=0, shuffle=False)
        assert np.isfinite(history.history["loss"]).all()

    def test_predict_and_hard_selection_accept_short_rows(self):
        A, B = _problem(n=3)
        model = ksq.QuantileObjectiveModel("spread", num_features=3)
        model.compile(jit_compile=False)
        outputs = model.predict((A, B), batch_size=4, verbose=0)
        assert not outputs["lower_mask"].any() and not outputs["upper_mask"].any()  # k = 0
        np.testing.assert_allclose(outputs["scores"], B @ _theta(model), rtol=1e-5, atol=1e-6)
        assert not keras.ops.convert_to_numpy(model.selection(A, B, soft=False)["upper_mask"]).any()
        with pytest.raises(ValueError, match="at least 4 valid entries"):
            model.selection(A, B)  # the soft selection needs one entry per bucket


class TestSortedOutputPadding:
    @pytest.mark.slow
    @JIT
    def test_padding_with_sorted_output_raises_naming_a(self, jit_compile):
        A, B = _problem()
        A[2, 10:] = np.nan
        model = _model(jit_compile, output="sorted")
        start = _theta(model)
        match = r"sorted output needs instances of equal length.*Received: A\[2, 10\]=nan"
        with pytest.raises(ERRORS, match=match):
            model.fit(x=(A, B), batch_size=4, epochs=1, verbose=0, shuffle=False)
        np.testing.assert_array_equal(_theta(model), start)
        # Hard masks of padded instances are still available.
        masks = model.predict((A, B), batch_size=4, verbose=0)
        assert masks["upper_mask"][2].sum() == 2 and masks["upper_mask"][3].sum() == 3


class TestFloat64Input:
    def test_selection_casts_float64_arrays_to_the_model_dtype(self):
        A, B = _problem()
        model = ksq.QuantileObjectiveModel("spread", num_features=3)
        single = model.selection(A, B)
        double = model.selection(A.astype("float64"), B.astype("float64"))
        mixed = model.selection(A.astype("float64"), B)
        for result in (double, mixed):
            assert result["scores"].dtype == tf.float32
            for key, value in single.items():
                np.testing.assert_allclose(
                    keras.ops.convert_to_numpy(result[key]), keras.ops.convert_to_numpy(value)
                )

    @pytest.mark.slow
    @JIT
    def test_a_float64_dataset_is_computed_in_the_model_dtype(self, jit_compile):
        A, B = _problem()
        # Distinct in float64, all equal to 1.0 in float32: the hard spread is then exactly 0.
        A = 1.0 + 1e-9 * A.astype("float64")
        data = tf.data.Dataset.from_tensor_slices((A, B.astype("float64"))).batch(4)
        single = _model(jit_compile)
        metrics = single.evaluate(data, verbose=0, return_dict=True)
        assert metrics["hard_objective"] == 0.0
        wide = ksq.QuantileObjectiveModel("spread", num_features=3, dtype="float64")
        wide.compile(jit_compile=jit_compile)
        wide.build((None, None, 3))
        wide.theta.assign(tf.cast(single.theta, tf.float64))
        metrics = wide.evaluate(data, verbose=0, return_dict=True)
        assert 1e-11 < abs(metrics["hard_objective"]) < 1e-8  # float64 sees the differences


class TestPerturbedSeedState:
    @pytest.mark.slow
    @JIT
    @pytest.mark.parametrize("seed", [7, None])
    def test_backup_and_restore_resumes_the_same_noise(self, tmp_path, jit_compile, seed):
        A, B = _problem(instances=8, n=16)

        def new_model():
            keras.utils.set_random_seed(3)
            return _model(
                jit_compile, gradient_estimator="perturbed", num_samples=8, sigma=0.05, seed=seed
            )

        def fit(model, callbacks):
            return model.fit(
                x=(A, B), batch_size=4, epochs=4, verbose=0, shuffle=False, callbacks=callbacks
            )

        reference = new_model()
        fit(reference, [])
        backup = keras.callbacks.BackupAndRestore(os.path.join(tmp_path, "backup"))
        interrupted = new_model()
        with pytest.raises(RuntimeError, match="interrupted"):
            fit(interrupted, [backup, Interrupt(2)])
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(interrupted.perturbation_seed)[1],
            4,  # 2 epochs x 2 steps
        )
        resumed = new_model()
        history = fit(resumed, [backup])
        assert len(history.history["loss"]) == 2
        np.testing.assert_array_equal(_theta(resumed), _theta(reference))
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(resumed.perturbation_seed),
            keras.ops.convert_to_numpy(reference.perturbation_seed),
        )

    def test_seed_state_is_a_saved_weight(self, tmp_path):
        A, B = _problem()
        model = _model(False, gradient_estimator="perturbed", num_samples=4, seed=11)
        assert any(w is model.perturbation_seed for w in model.non_trainable_weights)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.perturbation_seed), [11, 0])
        model.fit(x=(A, B), batch_size=4, epochs=1, verbose=0, shuffle=False)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.perturbation_seed), [11, 2])
        path = os.path.join(tmp_path, "perturbed.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded.perturbation_seed), [11, 2])
        # A file saved before the seed state was saved (only epsilon) still loads.
        fresh = ksq.QuantileObjectiveModel(
            "spread", num_features=3, gradient_estimator="perturbed", seed=5
        )
        with pytest.warns(UserWarning, match="no perturbation seed state"):
            fresh.load_own_variables({"0": np.float32(0.03)})
        np.testing.assert_allclose(float(fresh.get_epsilon()), 0.03)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(fresh.perturbation_seed), [5, 0])

    def test_the_ot_estimator_has_no_seed_state(self):
        model = ksq.QuantileObjectiveModel("spread", num_features=3)
        assert model.perturbation_seed is None
        assert len(model.non_trainable_weights) == 1  # epsilon


class TestShapeMismatch:
    """A and B that disagree on n are named, also when n is known only at run time."""

    MATCH = r"A \[batch, n\] and B \[batch, n, M\] must agree.*A.shape=\(\d+, 30\).*B.shape="

    @pytest.mark.parametrize("entry", ["fit", "evaluate", "predict"])
    def test_arrays(self, entry):
        A, B = _problem(instances=8, n=30)
        _, B = _problem(instances=8, n=40)
        with pytest.raises(ERRORS, match=self.MATCH):
            _call(_model(False), entry, A, B, as_dataset=False)

    @JIT
    @pytest.mark.parametrize("entry", ["fit", "evaluate"])
    def test_a_dataset_of_unknown_length(self, entry, jit_compile):
        A, B = _problem(instances=8, n=30)
        _, B = _problem(instances=8, n=40)
        data = tf.data.Dataset.from_generator(
            lambda: iter([(A, B)]),
            output_signature=(tf.TensorSpec([None, None]), tf.TensorSpec([None, None, 3])),
        )
        model = _model(jit_compile)
        start = _theta(model)
        with pytest.raises(ERRORS, match=self.MATCH):
            getattr(model, entry)(data, verbose=0)
        np.testing.assert_array_equal(_theta(model), start)

    @pytest.mark.slow
    def test_selection_in_a_graph(self):
        A, B = _problem(instances=8, n=30)
        _, B = _problem(instances=8, n=40)
        model = _model(False)
        selection = tf.function(
            model.selection,
            input_signature=[tf.TensorSpec([None, None]), tf.TensorSpec([None, None, 3])],
        )
        with pytest.raises(tf.errors.InvalidArgumentError, match=self.MATCH):
            selection(A, B)
