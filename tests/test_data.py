"""Streamed instances (`keras_softquantile.data`): padded batches that hold exactly the
instances written, from `.npz` files, TFRecord shards and a long CSV table, and a model trained
on them that ends where the same batches in memory take it."""

import csv

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_softquantile import QuantileObjectiveModel, data

M = 3


def ragged_instances(count=10, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(12, 30, count)
    theta = np.array([1.0, -0.5, 0.25])
    features = [rng.standard_normal((n, M)).astype("float32") for n in lengths]
    values = [(b @ theta + 0.1 * rng.standard_normal(len(b))).astype("float32") for b in features]
    return values, features


def padded_arrays(values, features, length):
    A = np.full((len(values), length), np.nan, "float32")
    B = np.zeros((len(values), length, M), "float32")
    for i, (a, b) in enumerate(zip(values, features, strict=True)):
        A[i, : len(a)], B[i, : len(a)] = a, b
    return A, B


def batches(dataset):
    return [(a.numpy(), b.numpy()) for a, b in dataset]


def write_csv(path, values, features, order):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["date", "ret", "f0", "f1", "f2"])
        for i in order:
            for value, row in zip(values[i], features[i], strict=True):
                writer.writerow([f"d{i}", repr(float(value)), *map(float, row)])


FORMATS = pytest.mark.parametrize("file_format", ["npz", "tfrecord"])


def write_record(path, a, b, n=None, mark=data.RECORD_MARK):
    """One TFRecord file of one record in `save_instances`' layout (`n` and `mark` to break
    it), in the dtype of `b`."""
    record = np.zeros((len(a) + 1, b.shape[1] + 1), b.dtype)
    record[0, :2] = mark, len(a) if n is None else n
    record[1:, 0], record[1:, 1:] = a, b
    with tf.io.TFRecordWriter(str(path)) as writer:
        writer.write(record.tobytes())


class TestFromFiles:
    @FORMATS
    def test_batches_hold_the_instances_padded_with_nan(self, tmp_path, file_format):
        values, features = ragged_instances(7)
        paths = data.save_instances(
            tmp_path, values, features, file_format=file_format, instances_per_file=3
        )
        assert len(paths) == (7 if file_format == "npz" else 3)
        assert all(path.endswith("." + file_format) for path in paths)
        got = batches(data.instances_from_files(tmp_path, batch_size=3))
        assert [a.shape[0] for a, _ in got] == [3, 3, 1]
        for start, (a, b) in zip((0, 3, 6), got, strict=True):
            for row in range(a.shape[0]):
                n = len(values[start + row])
                np.testing.assert_array_equal(a[row, :n], values[start + row])
                np.testing.assert_array_equal(b[row, :n], features[start + row])
                assert np.isnan(a[row, n:]).all() and (b[row, n:] == 0).all()
            assert a.shape[1] == max(len(values[start + r]) for r in range(a.shape[0]))

    @FORMATS
    def test_pad_to_gives_a_static_length_and_refuses_longer_instances(self, tmp_path, file_format):
        values, features = ragged_instances(4)
        data.save_instances(tmp_path, values, features, file_format=file_format)
        dataset = data.instances_from_files(tmp_path, batch_size=2, pad_to=40)
        assert dataset.element_spec[0].shape.as_list() == [None, 40]
        assert dataset.element_spec[1].shape.as_list() == [None, 40, M]
        assert all(a.shape == (2, 40) for a, _ in batches(dataset))
        too_short = data.instances_from_files(tmp_path, batch_size=2, pad_to=5)
        with pytest.raises(tf.errors.InvalidArgumentError, match="more entries than pad_to=5"):
            batches(too_short)

    @FORMATS
    def test_shuffle_reorders_the_files_reproducibly(self, tmp_path, file_format):
        values, features = ragged_instances(8)
        data.save_instances(
            tmp_path, values, features, file_format=file_format, instances_per_file=1
        )

        def firsts(seed):
            dataset = data.instances_from_files(tmp_path, 1, shuffle=True, seed=seed)
            return [float(a[0, 0]) for a, _ in batches(dataset)]

        assert firsts(3) == firsts(3)
        assert sorted(firsts(3)) == sorted(float(v[0]) for v in values)
        assert firsts(3) != [float(v[0]) for v in values]

    @FORMATS
    def test_float64_batches(self, tmp_path, file_format):
        values, features = ragged_instances(2)
        data.save_instances(tmp_path, values, features, file_format=file_format)
        a, b = next(iter(data.instances_from_files(tmp_path, 2, dtype="float64")))
        assert a.dtype == tf.float64 and b.dtype == tf.float64
        np.testing.assert_array_equal(a.numpy()[0, : len(values[0])], values[0])

    def test_tfrecords_keep_float64_and_cast_when_read(self, tmp_path):
        rng = np.random.default_rng(1)
        values = [rng.standard_normal(5) * (1 + 1e-12)]  # float64: digits float32 drops
        features = [rng.standard_normal((5, M))]
        data.save_instances(tmp_path, values, features, file_format="tfrecord")
        a, b = next(iter(data.instances_from_files(tmp_path, 1, dtype="float64")))
        np.testing.assert_array_equal(a.numpy()[0], values[0])
        np.testing.assert_array_equal(b.numpy()[0], features[0])
        a, _ = next(iter(data.instances_from_files(tmp_path, 1)))
        assert a.dtype == tf.float32
        np.testing.assert_array_equal(a.numpy()[0], values[0].astype("float32"))

    @pytest.mark.parametrize(
        "broken",
        [
            dict(a=np.ones(4, "float32"), b=np.ones((4, 2), "float32")),  # another M
            dict(a=np.ones(4, "float32"), b=np.ones((4, M), "float32"), n=5),  # a wrong n
            dict(a=np.ones(4), b=np.ones((4, M))),  # float64 after float32
            dict(a=np.ones(4, "float32"), b=np.ones((4, M), "float32"), mark=1.0),  # no mark
        ],
    )
    def test_a_broken_record_is_an_error_that_names_its_file(self, tmp_path, broken):
        values, features = ragged_instances(2)
        data.save_instances(tmp_path, values, features, file_format="tfrecord")
        write_record(tmp_path / "z_broken.tfrecord", **broken)
        dataset = data.instances_from_files(tmp_path, 2)
        with pytest.raises(
            tf.errors.InvalidArgumentError, match=r"not a float32 instance with M=3[\s\S]*z_broken"
        ):
            batches(dataset)

    def test_a_truncated_record_is_an_error_that_names_its_file(self, tmp_path):
        values, features = ragged_instances(3)
        data.save_instances(tmp_path, values, features, file_format="tfrecord")
        record = np.zeros((5, M + 1), "float32")
        record[0, :2] = data.RECORD_MARK, 3  # the header of the whole rows left
        with tf.io.TFRecordWriter(str(tmp_path / "z_cut.tfrecord")) as writer:
            writer.write(record.tobytes()[:-6])  # 3 rows and a part: not a whole number
        for pad_to in (None, 40):
            dataset = data.instances_from_files(tmp_path, 2, pad_to=pad_to)
            with pytest.raises(tf.errors.InvalidArgumentError, match=r"not a float32[\s\S]*z_cut"):
                batches(dataset)

    def test_a_batch_of_empty_records_is_an_error_that_names_its_file(self, tmp_path):
        values, features = ragged_instances(2)
        data.save_instances(tmp_path, values, features, file_format="tfrecord")
        with tf.io.TFRecordWriter(str(tmp_path / "z_empty.tfrecord")) as writer:
            writer.write(b"")
            writer.write(b"")
        for pad_to in (None, 40):
            dataset = data.instances_from_files(tmp_path, 2, pad_to=pad_to)
            with pytest.raises(
                tf.errors.InvalidArgumentError, match=r"not a float32[\s\S]*z_empty"
            ):
                batches(dataset)

    def test_records_in_float64_and_of_one_feature(self, tmp_path):
        rng = np.random.default_rng(2)
        values, features = [rng.standard_normal(6)], [rng.standard_normal((6, 1))]
        write_record(tmp_path / "one.tfrecord", values[0], features[0])
        a, b = next(iter(data.instances_from_files(tmp_path, 1, dtype="float64")))
        np.testing.assert_array_equal(a.numpy()[0], values[0])
        np.testing.assert_array_equal(b.numpy()[0], features[0])

    def test_tfrecord_arguments_and_first_records_are_checked(self, tmp_path):
        values, features = ragged_instances(2)
        with pytest.raises(ValueError, match="file_format"):
            data.save_instances(tmp_path, values, features, file_format="csv")
        with pytest.raises(ValueError, match="instances_per_file"):
            data.save_instances(tmp_path, values, features, instances_per_file=0)
        with pytest.raises(TypeError, match="Instance 0: A must be numeric"):
            data.save_instances(
                tmp_path, [np.array(["a"] * 3)], [np.ones((3, M))], file_format="tfrecord"
            )
        data.save_instances(tmp_path / "records", values, features, file_format="tfrecord")
        data.save_instances(tmp_path / "records", values, features)  # .npz next to them
        with pytest.raises(ValueError, match=r"mixes \.npz and \.tfrecord"):
            data.instances_from_files(tmp_path / "records", 2)
        (tmp_path / "notes.txt").write_text("")
        with pytest.raises(ValueError, match=r"must be \.npz or \.tfrecord files"):
            data.instances_from_files([str(tmp_path / "notes.txt")], 2)
        (tmp_path / "empty.tfrecord").write_bytes(b"")
        with pytest.raises(ValueError, match="holds no record"):
            data.instances_from_files([str(tmp_path / "empty.tfrecord")], 2)
        for name, record in (
            (
                "other.tfrecord",
                dict(a=np.ones(4, "float32"), b=np.ones((4, M), "float32"), mark=3.0),
            ),
            ("short.tfrecord", dict(a=np.ones(4, "float32"), b=np.ones((4, M), "float32"), n=6)),
        ):
            write_record(tmp_path / name, **record)
            with pytest.raises(ValueError, match="not an instance written by `save_instances"):
                data.instances_from_files([str(tmp_path / name)], 2)


class TestFromCsv:
    def test_the_table_gives_the_instances_in_file_order(self, tmp_path):
        values, features = ragged_instances(5)
        path = tmp_path / "panel.csv"
        order = [3, 0, 4, 1, 2]
        write_csv(path, values, features, order)
        dataset = data.instances_from_csv(
            path, 2, instance_column="date", value_column="ret", feature_columns=["f0", "f1", "f2"]
        )
        rows = [(a[r], b[r]) for a, b in batches(dataset) for r in range(a.shape[0])]
        assert len(rows) == 5
        for (a, b), i in zip(rows, order, strict=True):
            n = len(values[i])
            np.testing.assert_allclose(a[:n], values[i], rtol=1e-6)
            np.testing.assert_allclose(b[:n], features[i], rtol=1e-6)
            assert np.isnan(a[n:]).all()

    def test_errors_name_the_problem(self, tmp_path):
        values, features = ragged_instances(3)
        path = tmp_path / "panel.csv"
        write_csv(path, values, features, [0, 1, 0])  # instance 0 twice: not contiguous
        columns = {"instance_column": "date", "value_column": "ret"}
        with pytest.raises(ValueError, match=r"no column\(s\) \['f9'\]"):
            data.instances_from_csv(path, 2, feature_columns=["f0", "f9"], **columns)
        with pytest.raises(ValueError, match="feature_columns"):
            data.instances_from_csv(path, 2, feature_columns=[], **columns)
        with pytest.raises(ValueError, match="must be a CSV file"):
            data.instances_from_csv(tmp_path / "none.csv", 2, feature_columns=["f0"], **columns)
        dataset = data.instances_from_csv(path, 2, feature_columns=["f0", "f1", "f2"], **columns)
        with pytest.raises(tf.errors.OpError, match="not contiguous"):
            batches(dataset)
        lines = path.read_text().splitlines()
        lines[3] = "," + lines[3].split(",", 1)[1]  # the third entry loses its instance id
        path.write_text("\n".join(lines) + "\n")
        dataset = data.instances_from_csv(path, 2, feature_columns=["f0", "f1", "f2"], **columns)
        with pytest.raises(tf.errors.OpError, match="line 4: no instance id"):
            batches(dataset)


class TestFromColumns:
    def columns(self, values, features, order):
        ids = np.concatenate([[f"d{i}"] * len(values[i]) for i in order])
        table = {
            "date": ids,
            "ret": np.concatenate([values[i] for i in order]),
        }
        for j in range(M):
            table[f"f{j}"] = np.concatenate([features[i][:, j] for i in order])
        return table

    def test_the_table_gives_the_instances_in_row_order(self):
        values, features = ragged_instances(5)
        order = [2, 4, 0, 1, 3]
        dataset = data.instances_from_columns(
            self.columns(values, features, order),
            2,
            instance_column="date",
            value_column="ret",
            feature_columns=["f0", "f1", "f2"],
            pad_to=32,
        )
        rows = [(a[r], b[r]) for a, b in batches(dataset) for r in range(a.shape[0])]
        assert len(rows) == 5
        for (a, b), i in zip(rows, order, strict=True):
            n = len(values[i])
            np.testing.assert_array_equal(a[:n], values[i])
            np.testing.assert_array_equal(b[:n], features[i])
            assert np.isnan(a[n:]).all() and a.shape == (32,)

    def test_errors_name_the_problem(self):
        values, features = ragged_instances(3)
        table = self.columns(values, features, [0, 1, 0])
        columns = {"instance_column": "date", "value_column": "ret"}
        with pytest.raises(ValueError, match="'d0' are not contiguous"):
            data.instances_from_columns(table, 2, feature_columns=["f0"], **columns)
        table = self.columns(values, features, [0, 1])
        with pytest.raises(ValueError, match="no column 'f9'"):
            data.instances_from_columns(table, 2, feature_columns=["f9"], **columns)
        with pytest.raises(TypeError, match="'date' must be numeric"):
            data.instances_from_columns(table, 2, feature_columns=["date"], **columns)
        no_id = dict(table, date=np.where(np.arange(len(table["date"])) == 3, None, table["date"]))
        with pytest.raises(ValueError, match="no id in row 3"):
            data.instances_from_columns(no_id, 2, feature_columns=["f0"], **columns)
        nan_id = dict(table, date=np.where(table["date"] == "d1", np.nan, 0.0))
        with pytest.raises(ValueError, match="no id in row"):
            data.instances_from_columns(nan_id, 2, feature_columns=["f0"], **columns)
        short = dict(table, f1=table["f1"][:-1])
        with pytest.raises(ValueError, match="differ in length"):
            data.instances_from_columns(short, 2, feature_columns=["f1"], **columns)


@pytest.mark.slow
@FORMATS
def test_a_model_trained_on_streamed_files_ends_at_the_in_memory_theta(tmp_path, file_format):
    """Same batches, same order: streaming from disk changes nothing but where they come from."""
    values, features = ragged_instances(12)
    length = max(map(len, values))
    data.save_instances(tmp_path, values, features, file_format=file_format, instances_per_file=5)
    A, B = padded_arrays(values, features, length)

    initial = []

    def trained(x, **fit_options):
        keras.utils.set_random_seed(0)
        model = QuantileObjectiveModel("spread", num_features=M, quantile=0.25, epsilon=0.05)
        model.compile(optimizer=keras.optimizers.Adam(0.05))
        model.build((None, None, M))
        initial.append(keras.ops.convert_to_numpy(model.theta))
        model.fit(x, epochs=2, verbose=0, shuffle=False, **fit_options)
        return keras.ops.convert_to_numpy(model.theta)

    in_memory = trained((A, B), batch_size=4)
    assert np.abs(in_memory - initial[0]).max() > 0.05  # training moved theta
    streamed = trained(data.instances_from_files(tmp_path, batch_size=4, pad_to=length))
    np.testing.assert_allclose(streamed, in_memory, rtol=1e-5, atol=1e-6)
    # Batches padded only to their own longest instance train to the same theta too.
    ragged = trained(data.instances_from_files(tmp_path, batch_size=4))
    np.testing.assert_allclose(ragged, in_memory, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(initial[1], initial[0])  # the same start


def test_padded_instances_checks_its_dataset():
    good = tf.data.Dataset.from_tensors((tf.zeros([5]), tf.zeros([5, M])))
    assert data.padded_instances(good, 2).element_spec[0].shape.as_list() == [None, None]
    with pytest.raises(TypeError, match=r"tf\.data\.Dataset"):
        data.padded_instances([1, 2], 2)
    with pytest.raises(ValueError, match="single instances"):
        data.padded_instances(good.batch(2), 2)
    with pytest.raises(ValueError, match=r"\(A, B\) pairs"):
        data.padded_instances(tf.data.Dataset.from_tensors(tf.zeros([5])), 2)
    ints = tf.data.Dataset.from_tensors((tf.zeros([5], tf.int32), tf.zeros([5, M])))
    with pytest.raises(TypeError, match="floating point"):
        data.padded_instances(ints, 2)
