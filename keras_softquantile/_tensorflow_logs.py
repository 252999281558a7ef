"""TensorFlow's C++ log lines on import, held to TF_CPP_MIN_LOG_LEVEL.

TensorFlow's C++ libraries log through Abseil, which writes every message to standard error
until its logging is initialized, whatever TF_CPP_MIN_LOG_LEVEL says: on import, a machine
without a GPU gets "oneDNN custom operations are on", "Could not find cuda drivers" and a
banner about `absl::InitializeLog()`, twice. `import_tensorflow` imports TensorFlow and Keras
with the lines that the environment's TF_CPP_MIN_LOG_LEVEL hides removed; with the variable
unset (or 0) it changes nothing. Standard library only: the command line uses it before it
imports anything heavy.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator

# A C++ log line of TensorFlow (Abseil/glog format), e.g.
# "I0000 00:00:1796023749.936402   24746 port.cc:153] oneDNN custom operations are on. ...",
# or of older TensorFlow releases, "2024-01-01 12:00:00.000000: I tensorflow/...:44] ...".
_NATIVE_LOG_LINE = re.compile(
    r"^(?:(?P<severity>[IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+\s+"
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: (?P<old_severity>[IWEF]) )\S+:\d+\] "
)
_ABSL_BANNER = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
)
_SEVERITIES = "IWEF"


def min_log_level() -> int:
    """TF_CPP_MIN_LOG_LEVEL as an int: 0 shows all, 1 hides INFO, 2 WARNING too, 3 ERROR too."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def is_hidden_log_line(line: str, level: int) -> bool:
    """Whether `line` is a TensorFlow C++ log line that `level` (TF_CPP_MIN_LOG_LEVEL) hides.

    Args:
        line: one line of standard error.
        level: the minimum log level.

    Returns:
        True for Abseil's banner "All log messages before absl::InitializeLog() ..." when
        `level >= 1`, and for a log line whose severity (I, W, E, F = 0 to 3) is below `level`.
    """
    if level >= 1 and line.rstrip("\r\n") == _ABSL_BANNER:
        return True
    match = _NATIVE_LOG_LINE.match(line)
    if match is None:
        return False
    severity = match.group("severity") or match.group("old_severity")
    return _SEVERITIES.index(severity) < level


def _forward_lines(source: int, destination: int, keep: Callable[[str], bool]) -> None:
    """Copies the lines read from file descriptor `source` that `keep` accepts to `destination`."""
    with open(source, "rb") as pipe:
        for line in pipe:
            if keep(line.decode(errors="replace")):
                while line:
                    line = line[os.write(destination, line) :]


@contextlib.contextmanager
def native_log_lines_hidden(level: int) -> Iterator[None]:
    """Hides, from the process's standard error, TensorFlow's C++ log lines below `level`.

    TensorFlow's C++ libraries log through Abseil, which writes every message to file
    descriptor 2 until its logging is initialized, whatever TF_CPP_MIN_LOG_LEVEL says: on
    import, a machine without a GPU gets "oneDNN custom operations are on", "Could not find
    cuda drivers" and a banner about `absl::InitializeLog()`. Inside this context, file
    descriptor 2 is a pipe, and a thread forwards to the real standard error every line but
    those (`is_hidden_log_line`), as it comes: Python's warnings and tracebacks pass.

    Args:
        level: TF_CPP_MIN_LOG_LEVEL; with 0 nothing is hidden (and nothing redirected).

    Yields:
        None.
    """
    if level <= 0:
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:  # no standard error to filter
        yield
        return
    if sys.stderr is not None:
        sys.stderr.flush()
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    forwarder = threading.Thread(
        target=_forward_lines,
        args=(read_end, saved, lambda line: not is_hidden_log_line(line, level)),
        daemon=True,
    )
    forwarder.start()
    try:
        yield
    finally:
        if sys.stderr is not None:
            sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the forwarder reads to its end
        forwarder.join(timeout=10)
        if not forwarder.is_alive():
            os.close(saved)


def import_tensorflow() -> None:
    """Imports Keras and, when Keras runs on TensorFlow, TensorFlow, hiding the C++ log lines
    below TF_CPP_MIN_LOG_LEVEL.

    Under the JAX and PyTorch backends TensorFlow is not imported here (it is imported later
    only by what needs it, such as `SelectionMonitor`'s summaries). Does nothing when
    TensorFlow is already imported.
    """
    if "tensorflow" in sys.modules:
        return
    with native_log_lines_hidden(min_log_level()):
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow  # noqa: F401
