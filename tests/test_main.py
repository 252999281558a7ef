"""The command-line demo, end to end with small options, and the command line's start-up."""

import importlib
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import keras_softquantile as ksq
from keras_softquantile import __main__ as cli
from keras_softquantile import _tensorflow_logs
from keras_softquantile.__main__ import main
from keras_softquantile.models import QuantileObjectiveModel
from keras_softquantile.ops._validation import epsilon_minimum

# A C++ log line of TensorFlow, or Abseil's banner before them.
TF_LOG_LINE = re.compile(r"^[IWEF]\d{4} |absl::InitializeLog", re.MULTILINE)


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    logdir = os.fspath(tmp_path / "runs")
    code = main(
        [
            "demo",
            "--n",
            "40",
            "--features",
            "4",
            "--instances",
            "8",
            "--epochs",
            "3",
            "--epsilon",
            "0.05",
            "--seed",
            "1",
            "--logdir",
            logdir,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"through tf\.argsort\s+norm 0\.0\b", out), out
    assert re.search(r"through tf\.math\.top_k\s+norm 0\.0\b", out), out
    rows = dict(
        re.findall(r"\| (start|after training|planted theta\*|least squares) \| (\S+) \|", out)
    )
    assert set(rows) == {"start", "after training", "planted theta*", "least squares"}, out
    assert float(rows["after training"]) < float(rows["start"])
    assert logdir in out
    for run in ("train", "selection"):
        assert os.listdir(os.path.join(logdir, run)), run


@pytest.mark.slow
def test_demo_with_the_order_dependent_objective(tmp_path, capsys):
    code = main(
        [
            "demo",
            "--n",
            "16",
            "--features",
            "3",
            "--instances",
            "4",
            "--epochs",
            "2",
            "--objective",
            "rank_weighted_spread",
            "--logdir",
            os.fspath(tmp_path),
        ]
    )
    assert code == 0
    assert "output='sorted'" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--n", "0"], "--n: must be a positive integer. Received: 0"),
        (["demo", "--n", "abc"], "--n: must be a positive integer. Received: abc"),
        (["demo", "--instances", "2.5"], "--instances: must be a positive integer. Received: 2.5"),
        (["demo", "--batch-size", "-8"], "--batch-size: must be a positive integer. Received: -8"),
        (["demo", "--epsilon", "-1"], "--epsilon: must be a finite number > 0. Received: -1"),
        (["demo", "--epsilon", "inf"], "--epsilon: must be a finite number > 0. Received: inf"),
        (["demo", "--epsilon", "nan"], "--epsilon: must be a finite number > 0. Received: nan"),
        (["demo", "--epsilon", "1e-7"], r"--epsilon: must be >= 9.537e-07 .*Received: 1e-7"),
        (["demo", "--epsilon", "1e37"], r"--epsilon: must be <= 8.507e\+36 .*Received: 1e37"),
        (["demo", "--noise", "nan"], "--noise: must be a finite number >= 0. Received: nan"),
        (["demo", "--noise", "-1"], "--noise: must be a finite number >= 0. Received: -1"),
        (["demo", "--noise", "1e10"], r"--noise: too large: .* above the model's float32 limit"),
        (
            ["demo", "--learning-rate", "inf"],
            "--learning-rate: must be a finite number > 0. Received: inf",
        ),
        (
            ["demo", "--learning-rate", "1e38"],
            r"--learning-rate: too large for 200 Adam steps: .*Received: 1e\+38",
        ),
        (
            ["demo", "--quantile", "0.7"],
            r"--quantile: must be a number in \(0, 0.5\]. Received: 0.7",
        ),
        (
            ["demo", "--quantile", "nan"],
            r"--quantile: must be a number in \(0, 0.5\]. Received: nan",
        ),
        (["demo", "--n", "3"], r"--n: must be >= 4 at --quantile 0.25 .*Received: 3"),
        (["demo", "--quantile", "0.1", "--n", "9"], r"--n: must be >= 10 at --quantile 0.1 "),
        (["demo", "--seed", "-1"], r"--seed: must be an integer in \[0, 4294967295\]"),
        (["demo", "--seed", "4294967296"], r"--seed: must be an integer in \[0, 4294967295\]"),
        (["demo", "--objective", "sharpe"], "--objective: invalid choice: 'sharpe'"),
        ([], "the following arguments are required: command"),
    ],
)
def test_bad_arguments(argv, message, capsys):
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert time.perf_counter() - start < 2  # before any work: no data of that size, no TF
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: keras-softquantile"), err
    assert re.search(f"error: argument {message}" if argv else message, err), err
    assert "invalid" not in err or "invalid choice" in err  # no "invalid _positive_int value"


def test_a_file_is_no_logdir(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--logdir", os.fspath(path)])
    assert exit_info.value.code == 2
    assert (
        "argument --logdir: must be a directory, not a file. Received: " in capsys.readouterr().err
    )


def test_the_rules_match_the_package():
    assert epsilon_minimum("float32") == cli._EPSILON_MINIMUM
    for quantile in (0.5, 0.4, 1 / 3, 0.3, 0.25, 0.2, 0.1, 0.07, 0.01):
        model = QuantileObjectiveModel(quantile=quantile)
        assert cli._smallest_n(quantile) == model._min_length(), quantile
    assert model._max_abs_value() == float(np.finfo(np.float32).max) ** 0.25


# ----------------------------------------------------------------- start-up


def test_every_public_name_resolves_lazily_to_the_eager_object():
    assert set(ksq.__all__) == set(ksq._PUBLIC_NAMES) | ksq._SUBMODULES
    for name in ksq.__all__:
        assert ksq.__getattr__(name) is getattr(ksq, name), name
        if name in ksq._PUBLIC_NAMES:
            module = importlib.import_module(f"keras_softquantile.{ksq._PUBLIC_NAMES[name]}")
            assert getattr(module, name) is getattr(ksq, name), name
    assert set(ksq.__all__) <= set(dir(ksq))
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        ksq.__getattr__("nope")


@pytest.mark.parametrize(
    ("orig_argv", "module"),
    [
        (["python", "-m", "keras_softquantile", "demo"], "keras_softquantile"),
        (["python", "-X", "importtime", "-Im", "keras_softquantile"], "keras_softquantile"),
        (["python", "-mkeras_softquantile.__main__"], "keras_softquantile.__main__"),
        (["python", "-W", "ignore::Warning:m", "-m", "pytest", "-m", "x"], "pytest"),
        (["python", "-c", "pass", "-m", "keras_softquantile"], None),
        (["python", "script.py", "-m", "keras_softquantile"], None),
        (["python"], None),
    ],
)
def test_the_module_run_with_dash_m(orig_argv, module):
    assert ksq._module_run_with_dash_m(orig_argv) == module


@pytest.mark.parametrize(
    ("argv0", "orig_argv", "expected"),
    [
        ("-m", ["python", "-m", "keras_softquantile", "--help"], True),
        ("-m", ["python", "-m", "keras_softquantile.__main__"], True),
        ("-m", ["python", "-m", "pytest"], False),  # another program run with -m
        ("/venv/bin/keras-softquantile", ["python", "/venv/bin/keras-softquantile"], True),
        ("/venv/Scripts/keras-softquantile.exe", [], True),  # os.path of the platform
        ("/venv/bin/pytest", ["python", "/venv/bin/pytest"], False),
        ("-c", ["python", "-c", "import keras_softquantile"], False),
        ("", ["python"], False),
    ],
)
def test_the_command_line_is_recognised(argv0, orig_argv, expected, monkeypatch):
    monkeypatch.setattr(sys, "argv", [argv0])
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    assert ksq._imported_to_run_own_command_line() is expected


def _imported_modules(importtime: str) -> set[str]:
    """The modules named in the `-X importtime` report on standard error."""
    return {
        line.rsplit("|", 1)[-1].strip()
        for line in importtime.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def _heavy(modules: set[str]) -> set[str]:
    roots = {"tensorflow", "keras", "numpy"}
    return {name for name in modules if name.split(".")[0] in roots}


def _console_script() -> str | None:
    """The installed `keras-softquantile` script next to this interpreter, if any."""
    return shutil.which("keras-softquantile", path=os.path.dirname(sys.executable))


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"]], ids=["help", "demo-help"])
def test_help_answers_at_once_without_importing_tensorflow(argv):
    command = [sys.executable, "-m", "keras_softquantile", *argv]
    times = []
    for _ in range(3):  # the best of 3: the machines are shared
        start = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
        times.append(time.perf_counter() - start)
        assert completed.returncode == 0, completed.stderr
        assert completed.stdout.startswith("usage: keras-softquantile"), completed.stdout
    traced = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "keras_softquantile", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    modules = _imported_modules(traced.stderr)
    assert "keras_softquantile" in modules, traced.stderr[-2000:]
    assert not _heavy(modules)
    assert min(times) < 2, times


def test_the_console_script_imports_lazily_too():
    script = _console_script()
    if script is None:
        pytest.skip("the console script keras-softquantile is not installed next to Python")
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")
    completed = subprocess.run(
        [script, "demo", "--help"], capture_output=True, text=True, timeout=120, env=env
    )
    assert completed.returncode == 0, completed.stderr
    assert "--seed SEED" in completed.stdout
    modules = _imported_modules(completed.stderr)
    assert "keras_softquantile.__main__" in modules, completed.stderr[-2000:]
    assert not _heavy(modules)


def test_a_bad_option_fails_before_tensorflow_is_imported():
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "keras_softquantile", "demo", "--n", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert "error: argument --n: must be >= 4 at --quantile 0.25" in completed.stderr
    assert not (_heavy(_imported_modules(completed.stderr)) - {"numpy"})


@pytest.mark.slow
def test_the_library_import_registers_every_serializable_class():
    # Only the import, no attribute access: `keras.saving.load_model` needs no more.
    code = (
        "import keras_softquantile, keras\n"
        "names = ['LinearScorer', 'QuantileObjectiveModel', 'SoftQuantileMasks',\n"
        "         'SoftQuantileSplit', 'SoftQuantiles', 'SoftRank', 'SoftSort', 'SoftTopK',\n"
        "         'spread', 'rank_weighted_spread']\n"
        "missing = [n for n in names\n"
        "           if keras.saving.get_registered_object('keras_softquantile>' + n) is None]\n"
        "print('missing:', missing)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "missing: []" in completed.stdout, completed.stdout


def test_the_registered_names_are_those_the_import_test_checks():
    import keras

    for name in ("LinearScorer", "QuantileObjectiveModel", "SoftTopK", "SoftQuantiles"):
        assert keras.saving.get_registered_name(getattr(ksq, name)) == f"keras_softquantile>{name}"


# ----------------------------------------------------------------- TensorFlow's log lines


@pytest.mark.parametrize(
    ("line", "level", "hidden"),
    [
        (
            "WARNING: All log messages before absl::InitializeLog() is called are written to "
            "STDERR\n",
            3,
            True,
        ),
        (
            "I0000 00:00:1796023749.936402   24746 port.cc:153] oneDNN custom operations are on.\n",
            1,
            True,
        ),
        (
            "I0000 00:00:1796023749.936751   24746 cudart_stub.cc:31] Could not find cuda "
            "drivers on your machine, GPU will not be used.\n",
            0,
            False,
        ),
        (
            "E0000 00:00:1796023752.797215   24746 cuda_platform.cc:52] failed call to cuInit\n",
            2,
            False,
        ),
        ("E0000 00:00:1796023752.797215   24746 cuda_platform.cc:52] failed\n", 3, True),
        ("F0513 19:15:53.300433 4727559616 x.cc:20] check failed\n", 3, False),
        ("2019-08-26 11:45:17.907378: I tensorflow/core/x.cc:44] Successfully opened\n", 1, True),
        ("Traceback (most recent call last):\n", 3, False),
        ("UserWarning: something of ours\n", 3, False),
        ("I0000 is not a log line\n", 3, False),
    ],
)
def test_which_log_lines_are_hidden(line, level, hidden):
    assert _tensorflow_logs.is_hidden_log_line(line, level) is hidden


def test_the_log_filter_forwards_everything_else(capfd):
    with _tensorflow_logs.native_log_lines_hidden(3):
        os.write(2, b"I0000 00:00:1796023749.936402   24746 port.cc:153] oneDNN is on.\n")
        os.write(2, b"a line of ours\n")
        sys.stderr.write("a Python warning\n")  # one write: whole lines cannot interleave
        sys.stderr.flush()
        os.write(2, b"the last line, unterminated")
    os.write(2, b"\nafter\n")
    err = capfd.readouterr().err
    # (capfd captures sys.stderr apart from file descriptor 2: the order between them varies)
    expected = ["a Python warning", "a line of ours", "after", "the last line, unterminated"]
    assert sorted(err.splitlines()) == expected, err


# ----------------------------------------------------------------- same seed, same numbers


def _run_demo(logdir: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    # 8 batches per epoch: an unseeded shuffle changes the table's numbers from run to run.
    options = ["--n", "40", "--features", "3", "--instances", "32", "--epochs", "2"]
    options += ["--batch-size", "4", "--seed", "3"]
    return subprocess.run(
        [sys.executable, "-m", "keras_softquantile", "demo", *options, "--logdir", logdir],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.mark.slow
def test_the_same_seed_gives_the_same_numbers_without_log_noise(tmp_path):
    first = _run_demo(os.fspath(tmp_path / "first"))
    second = _run_demo(os.fspath(tmp_path / "second"))
    tables = []
    for completed in (first, second):
        assert completed.returncode == 0, completed.stderr[-3000:]
        output = completed.stdout + completed.stderr
        assert not TF_LOG_LINE.search(output), output
        tables.append([line for line in completed.stdout.splitlines() if line.startswith("|")])
    assert len(tables[0]) == 6, first.stdout
    assert tables[0] == tables[1]


@pytest.mark.slow
def test_importing_the_package_holds_tensorflow_to_its_log_level():
    """`import keras_softquantile` imports TensorFlow without the C++ start-up lines that
    TF_CPP_MIN_LOG_LEVEL hides (TensorFlow 2.21 prints them on import whatever the level)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    code = "import keras_softquantile, tensorflow as tf; print(float(tf.constant(2.0) + 1))"
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "3.0"
    assert completed.stderr == "", completed.stderr
