"""Instances of different lengths, streamed from disk into `QuantileObjectiveModel.fit`.

A panel of instances (dates, queries, ...), each with its own number of entries `n`, rarely
fits in memory as one `[instances, n_max, M]` array. These helpers build a `tf.data.Dataset`
of padded batches `(A, B)` that `fit`, `evaluate` and `predict` take directly: `A` `[batch,
n]` padded with NaN (the model leaves padded entries out of both selections) and `B`
`[batch, n, M]` padded with zeros. Only the instances of the batches in flight are in memory.

* `padded_instances(dataset, batch_size)`: batches any dataset of single instances.
* `instances_from_files(files, batch_size)`: one `.npz` file per instance (arrays `A` `[n]`
  and `B` `[n, M]`), or TFRecord shards of many instances, read as the batches are needed;
  `save_instances` writes either.
* `instances_from_csv(path, batch_size, ...)`: a long table with an instance-id column, read
  row by row, the rows of each instance contiguous.
* `instances_from_columns(table, batch_size, ...)`: the same table already in memory (a pandas
  DataFrame, or a dict of numpy columns).

They are built on `tf.data`, which every Keras backend's `fit` accepts.
"""

from __future__ import annotations

import csv
import numbers
import os
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf

__all__ = [
    "FILE_FORMATS",
    "RECORD_MARK",
    "instances_from_columns",
    "instances_from_csv",
    "instances_from_files",
    "padded_instances",
    "save_instances",
]


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be a positive int. Received: {name}={value!r}")
    if value < 1:
        raise ValueError(f"`{name}` must be a positive int. Received: {name}={value!r}")
    return int(value)


def _check_dtype(dtype) -> tf.DType:
    dtype = tf.as_dtype(dtype)
    if not dtype.is_floating:
        raise TypeError(f"`dtype` must be a floating-point dtype. Received: dtype={dtype.name}")
    return dtype


def padded_instances(
    dataset: tf.data.Dataset,
    batch_size: int,
    *,
    pad_to: int | None = None,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """Batches a dataset of single instances `(A [n], B [n, M])` with NaN padding.

    Args:
        dataset: a `tf.data.Dataset` whose elements are pairs `(A, B)`, `A` of shape `[n]`
            and `B` of shape `[n, M]`, floating point, `n` free to vary between instances.
        batch_size: instances per batch.
        pad_to: pad every batch to this many entries (a static length: the model's ops then
            compile once, instead of once per batch length); an instance with more entries is
            an error when it is read. None (the default) pads each batch to its longest
            instance.
        drop_remainder: drop a last batch with fewer than `batch_size` instances.

    Returns:
        A dataset of `(A [batch, n], B [batch, n, M])`, `A` padded with NaN and `B` with
        zeros, prefetched.

    Raises:
        TypeError / ValueError: `dataset` does not hold `(A [n], B [n, M])` float pairs, or
            `batch_size` / `pad_to` is not a positive int.
    """
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(
            f"`dataset` must be a tf.data.Dataset of (A, B) pairs. Received: {type(dataset)}"
        )
    batch_size = _positive_int(batch_size, "batch_size")
    if pad_to is not None:
        pad_to = _positive_int(pad_to, "pad_to")
    spec = dataset.element_spec
    if not (isinstance(spec, tuple) and len(spec) == 2):
        raise ValueError(f"`dataset` must hold (A, B) pairs. Received: element_spec={spec}")
    values, features = spec
    if values.shape.rank != 1 or features.shape.rank != 2:
        raise ValueError(
            "`dataset` must hold single instances, A of shape [n] and B of shape [n, M]. "
            f"Received: A {values.shape}, B {features.shape}"
        )
    if not (values.dtype.is_floating and features.dtype.is_floating):
        raise TypeError(
            f"A and B must be floating point. Received: A {values.dtype.name}, "
            f"B {features.dtype.name}"
        )
    if pad_to is not None:

        def fits(a, b):
            length = tf.shape(a)[0]
            check = tf.debugging.assert_less_equal(
                length,
                pad_to,
                message=f"an instance has more entries than pad_to={pad_to}",
            )
            with tf.control_dependencies([check]):
                return tf.identity(a), tf.identity(b)

        dataset = dataset.map(fits)
    num_features = features.shape[-1]
    padded = dataset.padded_batch(
        batch_size,
        padded_shapes=([pad_to], [pad_to, num_features]),
        padding_values=(
            tf.constant(np.nan, values.dtype),
            tf.constant(0, features.dtype),
        ),
        drop_remainder=drop_remainder,
    )
    return padded.prefetch(tf.data.AUTOTUNE)


FILE_FORMATS = ("npz", "tfrecord")
"""The file formats of `save_instances` and `instances_from_files`: one `.npz` file per
instance, or TFRecord shards of many instances."""


def save_instances(
    directory: str | os.PathLike,
    values: Sequence,
    features: Sequence,
    *,
    file_format: str = "npz",
    instances_per_file: int = 256,
) -> list[str]:
    """Writes instances to files, for `instances_from_files`.

    Two formats:

    * `"npz"` (the default): one file per instance, `instance_000000.npz`, ..., with arrays
      `A` `[n]` and `B` `[n, M]` in their own dtypes. Easy to write from any tool (numpy's
      `np.savez`), but each file is read by Python.
    * `"tfrecord"`: shards `instances_000000.tfrecord`, ... of `instances_per_file`
      instances each. A record is the bytes (little-endian) of one array `[n + 1, M + 1]`:
      the row `[RECORD_MARK, n, 0, ...]` (`RECORD_MARK` is -1234.5), then `A` in the first
      column and `B` in the others. TensorFlow reads and parses such records without Python,
      several times faster than `.npz` files (see the guide "Large data and several
      machines"). All instances are written in one dtype: float32 where every array is
      float32 (or narrower), float64 otherwise.

    Args:
        directory: where to write (created if missing).
        values: one array `A` `[n_i]` per instance.
        features: one array `B` `[n_i, M]` per instance, in the same order.
        file_format: `"npz"` or `"tfrecord"`.
        instances_per_file: instances per TFRecord shard (ignored for `.npz`).

    Returns:
        The paths written, in the order of the instances they hold.

    Raises:
        ValueError: `values` and `features` differ in length, an instance's arrays do not
            have the shapes `[n]` and `[n, M]` with one `M` for all, an unknown `file_format`,
            `instances_per_file` not a positive int, or a float32 TFRecord instance of more
            than 2**24 entries (which float32 cannot count).
        TypeError: with `"tfrecord"`, an array that is not numeric.
    """
    if file_format not in FILE_FORMATS:
        raise ValueError(
            f"`file_format` must be one of {FILE_FORMATS}. Received: file_format={file_format!r}"
        )
    instances_per_file = _positive_int(instances_per_file, "instances_per_file")
    if len(values) != len(features):
        raise ValueError(
            "`values` and `features` must hold the same number of instances. Received: "
            f"{len(values)} and {len(features)}"
        )
    pairs = []
    num_features = None
    for index, (a, b) in enumerate(zip(values, features, strict=True)):
        a, b = np.asarray(a), np.asarray(b)
        if a.ndim != 1 or b.ndim != 2 or b.shape[0] != a.shape[0]:
            raise ValueError(
                f"Instance {index}: A must be [n] and B [n, M]. Received: A.shape={a.shape}, "
                f"B.shape={b.shape}"
            )
        if num_features is not None and b.shape[1] != num_features:
            raise ValueError(
                f"Instance {index} has M={b.shape[1]} features, the ones before {num_features}"
            )
        num_features = b.shape[1]
        pairs.append((a, b))
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    if file_format == "tfrecord":
        return _write_tfrecords(directory, pairs, instances_per_file)
    paths = []
    for index, (a, b) in enumerate(pairs):
        path = os.path.join(directory, f"instance_{index:06d}.npz")
        np.savez(path, A=a, B=b)
        paths.append(path)
    return paths


def _record_dtype(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.dtype:
    """float32 where every array is float32 or narrower, float64 otherwise."""
    for index, pair in enumerate(pairs):
        for name, array in zip("AB", pair, strict=True):
            if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
                raise TypeError(
                    f"Instance {index}: {name} must be numeric. Received: dtype {array.dtype}"
                )
    narrow = all(
        np.issubdtype(array.dtype, np.floating) and array.dtype.itemsize <= 4
        for pair in pairs
        for array in pair
    )
    return np.dtype("float32" if narrow else "float64")


RECORD_MARK = -1234.5
"""The first value of every TFRecord record that `save_instances` writes: it marks a record of
this layout and tells its dtype (read in the other float width, the first value is something
else)."""


def _write_tfrecords(directory: str, pairs: list, instances_per_file: int) -> list[str]:
    """TFRecord shards of `instances_per_file` instances each (see `save_instances`)."""
    dtype = _record_dtype(pairs).newbyteorder("<")
    paths = []
    for shard, start in enumerate(range(0, len(pairs), instances_per_file)):
        path = os.path.join(directory, f"instances_{shard:06d}.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for index, (a, b) in enumerate(pairs[start : start + instances_per_file], start):
                n, num_features = b.shape
                if dtype.itemsize == 4 and n > 2**24:
                    raise ValueError(
                        f"Instance {index} has {n} entries, more than a float32 record can "
                        "count (2**24): write it in float64"
                    )
                record = np.zeros((n + 1, num_features + 1), dtype)
                record[0, :2] = RECORD_MARK, n
                record[1:, 0] = a
                record[1:, 1:] = b
                writer.write(record.tobytes())
        paths.append(path)
    return paths


def _format_of(path: str) -> str | None:
    """ "npz" or "tfrecord" from a file's name, None for other files."""
    for file_format in FILE_FORMATS:
        if path.endswith("." + file_format):
            return file_format
    return None


def _instance_paths(files) -> tuple[list[str], str]:
    """The paths of `files` (a directory or a list) and their format, "npz" or "tfrecord"."""
    if isinstance(files, str | os.PathLike):
        directory = os.fspath(files)
        if not os.path.isdir(directory):
            raise ValueError(
                "`files` must be a directory of .npz or .tfrecord files or a list of them. "
                f"Received: {directory!r}, which is not a directory"
            )
        paths = [
            os.path.join(directory, name)
            for name in sorted(os.listdir(directory))
            if _format_of(name)
        ]
        if not paths:
            raise ValueError(f"No .npz or .tfrecord files in `files`={directory!r}")
    else:
        paths = [os.fspath(path) for path in files]
        if not paths:
            raise ValueError("`files` is empty")
        missing = [path for path in paths if not os.path.isfile(path)]
        if missing:
            raise ValueError(f"`files` names files that do not exist: {missing[:3]}")
        unknown = [path for path in paths if not _format_of(path)]
        if unknown:
            raise ValueError(f"`files` must be .npz or .tfrecord files. Received: {unknown[:3]}")
    formats = sorted({_format_of(path) for path in paths})
    if len(formats) > 1:
        raise ValueError(
            "`files` mixes .npz and .tfrecord files: read each format with its own call. "
            f"Received: {len(paths)} files, {paths[0]!r}, ..."
        )
    return paths, formats[0]


def instances_from_files(
    files,
    batch_size: int,
    *,
    values_key: str = "A",
    features_key: str = "B",
    dtype="float32",
    pad_to: int | None = None,
    shuffle: bool = False,
    seed: int | None = None,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """Padded batches of instances read from files: one `.npz` file per instance, or TFRecord
    shards of many instances (both written by `save_instances`).

    Each `.npz` file holds the instance's values (`values_key`, `[n]`) and features
    (`features_key`, `[n, M]`); each TFRecord record holds one instance in the layout that
    `save_instances` describes. Files are read when their batch is needed, so memory holds
    only the batches in flight, whatever the number of files. TFRecord shards are read and
    parsed by TensorFlow without Python: several times faster than `.npz` files. Under
    `tf.distribute.MultiWorkerMirroredStrategy` the dataset can be sharded by file.

    Args:
        files: a directory (its `*.npz` or `*.tfrecord` files, in name order) or a list of
            paths, all of one format.
        batch_size: instances per batch.
        values_key: the name of `A` in each `.npz` file.
        features_key: the name of `B` in each `.npz` file.
        dtype: floating-point dtype of the batches.
        pad_to: see `padded_instances`.
        shuffle: shuffle the order of the files (again on each epoch); the instances of a
            TFRecord shard stay together, in order, so write small shards for a finer shuffle.
        seed: the shuffle's seed.
        drop_remainder: see `padded_instances`.

    Returns:
        A dataset of `(A [batch, n], B [batch, n, M])` (see `padded_instances`). From
        TFRecord shards its number of batches is known only once it has been read through
        (counting the records would read every shard first): Keras's `fit` then warns once,
        at the end of the first epoch, "Your input ran out of data", and trains on.

    Raises:
        ValueError: no files, a path that does not exist, files of both formats, or a first
            file (or first record) without the keys, layout or shapes described above. Later
            files and records are checked as they are read (their shapes, and for TFRecord
            records their dtype and M against the first record's): an error at that point of
            `fit` (an `InvalidArgumentError` from TFRecord shards) that names the file.
    """
    paths, file_format = _instance_paths(files)
    dtype = _check_dtype(dtype)
    batch_size = _positive_int(batch_size, "batch_size")
    if pad_to is not None:
        pad_to = _positive_int(pad_to, "pad_to")
    dataset = tf.data.Dataset.from_tensor_slices(paths)
    if shuffle:
        dataset = dataset.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    if file_format == "tfrecord":
        return _record_batches(dataset, paths[0], dtype, batch_size, pad_to, drop_remainder)
    read = _npz_reader(paths[0], values_key, features_key, dtype)
    dataset = dataset.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return padded_instances(dataset, batch_size, pad_to=pad_to, drop_remainder=drop_remainder)


def _npz_reader(first_path: str, values_key: str, features_key: str, dtype: tf.DType):
    """`read(path)`: an instance's `(A, B)` from its `.npz` file (checked on the first)."""
    with np.load(first_path) as first:
        for key in (values_key, features_key):
            if key not in first:
                raise ValueError(
                    f"{first_path!r} has no array {key!r} (its arrays: {sorted(first.files)}); "
                    "set `values_key` / `features_key`"
                )
        num_features = first[features_key].shape[-1] if first[features_key].ndim == 2 else None
    if num_features is None:
        raise ValueError(f"{first_path!r}: {features_key!r} must be [n, M]")
    numpy_dtype = dtype.as_numpy_dtype

    def load(path):
        name = path.decode() if isinstance(path, bytes) else str(path)
        with np.load(name) as data:
            a = np.asarray(data[values_key], numpy_dtype)
            b = np.asarray(data[features_key], numpy_dtype)
        if a.ndim != 1 or b.ndim != 2 or b.shape != (a.shape[0], num_features):
            raise ValueError(
                f"{name!r}: {values_key!r} must be [n] and {features_key!r} [n, {num_features}]"
                f". Received: {a.shape} and {b.shape}"
            )
        return a, b

    def read(path):
        a, b = tf.numpy_function(load, [path], (dtype, dtype), stateful=False)
        a.set_shape([None])
        b.set_shape([None, num_features])
        return a, b

    return read


def _record_layout(first_path: str) -> tuple[tf.DType, int]:
    """The dtype and M of the TFRecord records, from the first record of the first file."""
    record = next(iter(tf.data.TFRecordDataset(first_path).take(1)), None)
    if record is None:
        raise ValueError(f"{first_path!r} holds no record")
    record = record.numpy()
    for candidate in (np.dtype("<f4"), np.dtype("<f8")):
        if len(record) < 2 * candidate.itemsize or len(record) % candidate.itemsize:
            continue
        mark, n = np.frombuffer(record[: 2 * candidate.itemsize], candidate)
        size = len(record) // candidate.itemsize
        if mark == RECORD_MARK and n >= 0 and n % 1 == 0 and size % (int(n) + 1) == 0:
            num_features = size // (int(n) + 1) - 1
            if num_features >= 1:
                return tf.as_dtype(candidate.name), num_features
    raise ValueError(
        f"{first_path!r}: its first record is not an instance written by `save_instances("
        "file_format='tfrecord')` (the bytes of a float32 or float64 array [n + 1, M + 1]: "
        f"the row [{RECORD_MARK}, n, 0, ...], then A in the first column and B in the others)"
    )


def _record_batches(
    paths: tf.data.Dataset,
    first_path: str,
    dtype: tf.DType,
    batch_size: int,
    pad_to: int | None,
    drop_remainder: bool,
) -> tf.data.Dataset:
    """Padded batches `(A, B)` of the TFRecord records of `paths`' files, in TensorFlow ops.

    The records are batched as strings and decoded by one op per batch, zero-padded to the
    longest (or to `pad_to`); each batch is then checked and split into `A` and `B` at once.
    A record that does not match the first record's dtype and M, or whose first row does not
    match its length, is an `InvalidArgumentError` that names its file.
    """
    stored_dtype, num_features = _record_layout(first_path)
    width = num_features + 1
    item = stored_dtype.size
    limit = None if pad_to is None else (pad_to + 1) * width
    nan = tf.constant(np.nan, stored_dtype)

    def decode(path, record):
        size_in_bytes = tf.strings.length(record)
        size = size_in_bytes // item
        if limit is None:
            # At least one row: a batch of empty records still decodes, and the check names them.
            padded_bytes = tf.maximum(tf.reduce_max(size_in_bytes), width * item)
        else:
            fits = tf.debugging.Assert(
                tf.reduce_all(size <= limit),
                [
                    f"an instance has more entries than pad_to={pad_to}. Files:",
                    tf.boolean_mask(path, size > limit),
                ],
                summarize=3,
            )
            with tf.control_dependencies([fits]):
                padded_bytes = tf.constant(limit * item)
        # Zero bytes past each record's end: zeros in B, and made NaN in A below.
        flat = tf.io.decode_raw(record, stored_dtype, little_endian=True, fixed_length=padded_bytes)
        if limit is not None:
            flat = tf.ensure_shape(flat, [None, limit])
        rows = size // width
        agrees = (
            tf.equal(size_in_bytes % (item * width), 0)
            & (rows >= 1)
            & tf.equal(flat[:, 0], RECORD_MARK)
            & tf.equal(flat[:, 1] + 1, tf.cast(rows, stored_dtype))
        )
        check = tf.debugging.Assert(
            tf.reduce_all(agrees),
            [
                f"A record is not a {stored_dtype.name} instance with M={num_features} features "
                "as the first record of the first file: its dtype or M differs, or it is not "
                "written by `save_instances(file_format='tfrecord')`. Files:",
                tf.boolean_mask(path, tf.logical_not(agrees)),
            ],
            summarize=3,
        )
        with tf.control_dependencies([check]):
            length = tf.shape(flat)[1] // width if pad_to is None else pad_to + 1
            table = tf.reshape(flat, [-1, length, width])
        inside = tf.range(1, tf.shape(table)[1])[None, :] < rows[:, None]
        values = tf.where(inside, table[:, 1:, 0], nan)
        return tf.cast(values, dtype), tf.cast(table[:, 1:, 1:], dtype)

    records = paths.interleave(
        # One shard after another (in the order written), each record with its file's name.
        lambda path: tf.data.TFRecordDataset(path).map(lambda record: (path, record)),
        cycle_length=1,
    )
    batches = records.batch(batch_size, drop_remainder=drop_remainder).map(decode)
    return batches.prefetch(tf.data.AUTOTUNE)


def _csv_instances(
    path: str, instance_column: str, value_column: str, feature_columns: list[str], dtype
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The instances of a CSV file, one `(A, B)` pair at a time (rows of one id contiguous)."""
    finished: set[str] = set()
    current, rows = None, []

    def instance():
        table = np.asarray(rows, dtype=dtype).reshape(len(rows), 1 + len(feature_columns))
        return table[:, 0], table[:, 1:]

    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        for line, row in enumerate(reader, start=2):
            key = row[instance_column]
            if not key:
                raise ValueError(f"{path!r} line {line}: no instance id (empty field)")
            if key != current:
                if current is not None:
                    yield instance()
                    finished.add(current)
                if key in finished:
                    raise ValueError(
                        f"{path!r} line {line}: the rows of instance {key!r} are not contiguous "
                        "(sort the table by the instance column)"
                    )
                current, rows = key, []
            try:
                value = float(row[value_column] or "nan")
                rows.append([value, *(float(row[column]) for column in feature_columns)])
            except (TypeError, ValueError) as error:
                raise ValueError(f"{path!r} line {line}: {error}") from None
    if current is not None:
        yield instance()


def instances_from_csv(
    path: str | os.PathLike,
    batch_size: int,
    *,
    instance_column: str,
    value_column: str,
    feature_columns: Sequence[str],
    dtype="float32",
    pad_to: int | None = None,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """Padded batches of instances from a long CSV table with an instance-id column.

    The table has one row per entry: the instance's id, the entry's value `A` and its `M`
    features. The rows of each instance must be contiguous (sort by the id column first);
    they are read row by row, so memory holds one instance and the batches in flight,
    whatever the size of the file. An empty value is read as NaN (an entry left out).

    Args:
        path: the CSV file, with a header row.
        batch_size: instances per batch.
        instance_column: the column of instance ids.
        value_column: the column of values `A`.
        feature_columns: the `M` columns of features `B`, in order.
        dtype: floating-point dtype of the batches.
        pad_to: see `padded_instances`.
        drop_remainder: see `padded_instances`.

    Returns:
        A dataset of `(A [batch, n], B [batch, n, M])` (see `padded_instances`).

    Raises:
        ValueError: the file does not exist, no feature columns are given, or a column is
            missing from the header; when the rows are read (as `fit` iterates), a field that
            is not a number or an instance whose rows are not contiguous.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"`path` must be a CSV file. Received: {path!r}")
    feature_columns = [str(column) for column in feature_columns]
    if not feature_columns:
        raise ValueError("`feature_columns` must name at least one column")
    dtype = _check_dtype(dtype)
    with open(path, newline="") as handle:
        header = next(csv.reader(handle), [])
    missing = [
        column
        for column in (instance_column, value_column, *feature_columns)
        if column not in header
    ]
    if missing:
        raise ValueError(f"{path!r} has no column(s) {missing}. Its header: {header}")
    num_features = len(feature_columns)
    signature = (
        tf.TensorSpec([None], dtype),
        tf.TensorSpec([None, num_features], dtype),
    )
    dataset = tf.data.Dataset.from_generator(
        lambda: _csv_instances(
            path, instance_column, value_column, feature_columns, dtype.as_numpy_dtype
        ),
        output_signature=signature,
    )
    return padded_instances(dataset, batch_size, pad_to=pad_to, drop_remainder=drop_remainder)


def _contiguous_runs(ids: np.ndarray) -> list[tuple[int, int]]:
    """`(start, stop)` of each run of equal ids, or a ValueError if an id has two runs."""
    if len(ids) == 0:
        return []
    # A missing id (NaN, None) would silently become an instance of its own per row.
    if ids.dtype.kind == "f":
        missing = np.flatnonzero(np.isnan(ids))
    else:
        missing = [i for i, key in enumerate(ids) if key is None or key != key]  # None, NaN
    if len(missing):
        raise ValueError(
            f"The instance column has no id in row {missing[0]} (NaN or None); every row needs one"
        )
    change = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    starts = np.concatenate([[0], change])
    stops = np.concatenate([change, [len(ids)]])
    run_ids = ids[starts]
    unique, counts = np.unique(run_ids, return_counts=True)
    if (counts > 1).any():
        repeated = unique[counts > 1][0].item()
        raise ValueError(
            f"The rows of instance {repeated!r} are not contiguous (sort the table by the "
            "instance column)"
        )
    return list(zip(starts.tolist(), stops.tolist(), strict=True))


def instances_from_columns(
    table,
    batch_size: int,
    *,
    instance_column: str,
    value_column: str,
    feature_columns: Sequence[str],
    dtype="float32",
    pad_to: int | None = None,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """Padded batches of instances from a long table in memory with an instance-id column.

    The same layout as `instances_from_csv` (one row per entry, the rows of each instance
    contiguous), from a pandas DataFrame or a dict of equally long numpy columns. The table
    is converted column by column once; batches are built as they are needed.

    Args:
        table: anything with `table[column]` giving a 1-D array-like per column.
        batch_size: instances per batch.
        instance_column: the column of instance ids.
        value_column: the column of values `A` (NaN: an entry left out).
        feature_columns: the `M` columns of features `B`, in order.
        dtype: floating-point dtype of the batches.
        pad_to: see `padded_instances`.
        drop_remainder: see `padded_instances`.

    Returns:
        A dataset of `(A [batch, n], B [batch, n, M])` (see `padded_instances`).

    Raises:
        ValueError: a column is missing, the columns differ in length, no feature columns are
            given, or an instance's rows are not contiguous.
        TypeError: a value or feature column is not numeric.
    """
    feature_columns = [str(column) for column in feature_columns]
    if not feature_columns:
        raise ValueError("`feature_columns` must name at least one column")
    dtype = _check_dtype(dtype)
    columns = {}
    for column in (instance_column, value_column, *feature_columns):
        try:
            columns[column] = np.asarray(table[column])
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"`table` has no column {column!r}") from None
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"The columns of `table` differ in length: {lengths}")
    numeric = [columns[value_column], *(columns[c] for c in feature_columns)]
    for name, values in zip((value_column, *feature_columns), numeric, strict=True):
        if not (np.issubdtype(values.dtype, np.number) or values.dtype == bool):
            raise TypeError(f"Column {name!r} must be numeric. Received: dtype {values.dtype}")
    numpy_dtype = dtype.as_numpy_dtype
    values = columns[value_column].astype(numpy_dtype)
    features = np.stack([columns[c].astype(numpy_dtype) for c in feature_columns], axis=-1)
    runs = _contiguous_runs(columns[instance_column])

    def instances():
        for start, stop in runs:
            yield values[start:stop], features[start:stop]

    signature = (
        tf.TensorSpec([None], dtype),
        tf.TensorSpec([None, len(feature_columns)], dtype),
    )
    dataset = tf.data.Dataset.from_generator(instances, output_signature=signature)
    return padded_instances(dataset, batch_size, pad_to=pad_to, drop_remainder=drop_remainder)
