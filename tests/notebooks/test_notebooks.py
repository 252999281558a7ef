"""Every notebook in `notebooks/` runs top to bottom, within its time budget.

Notebooks are found by globbing, so a new one is executed as soon as it is added. Each runs in
a fresh kernel of the current interpreter, in a temporary working directory, and fails on the
first cell that raises. The committed notebooks carry no outputs.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import nbclient  # the `notebooks` extra, part of `dev`: missing, this fails instead of skipping
import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))
# Each notebook must finish within this many seconds on 2 CPU cores (the budget).
TIMEOUT_S = 120


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, f"{path.name}: cell {index} has outputs; strip them"
            assert cell.execution_count is None, f"{path.name}: cell {index} has a count"


# What a reader must not see in a notebook's outputs: TensorFlow's C++ log lines (and Abseil's
# banner about them), and its Python loggers' lines.
NOISE = re.compile(
    r"^([IWEF]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl|INFO:tensorflow"
    r"|WARNING:tensorflow|WARNING:absl)",
    re.MULTILINE,
)
# Keras's per-epoch timings ("12/12 - 0s - 13ms/step - ") and the notebooks' own timing
# columns differ from run to run; everything else must not.
TIMINGS = re.compile(r"\d+/\d+ - \d+m?s - [\d.]+[mu]?s/step - ")
_OUTPUTS: dict[str, list[str]] = {}


def _execute(path: Path, directory: Path) -> tuple[list[str], float]:
    """Runs a notebook in a fresh kernel: its stdout, its stderr and its other text outputs,
    and the seconds it took."""
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(directory)}},
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    # Streams concatenated (kernels split them into chunks at varying points), then the rest.
    streams = {"stdout": "", "stderr": ""}
    results = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                streams[output.name] += output.text
            elif "text/plain" in output.get("data", {}):
                results.append(output.data["text/plain"])
    return [streams["stdout"], streams["stderr"], *results], elapsed


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_with_clean_outputs(path, tmp_path, monkeypatch):
    # The notebooks set TF_CPP_MIN_LOG_LEVEL themselves, as a reader's kernel would run them.
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    texts, elapsed = _execute(path, tmp_path)
    assert elapsed < TIMEOUT_S, f"{path.name} took {elapsed:.0f} s (budget {TIMEOUT_S} s)"
    noise = [line for text in texts for line in text.splitlines() if NOISE.match(line)]
    assert not noise, f"{path.name} prints log lines: {noise[:5]}"
    assert not texts[1], f"{path.name} writes to stderr: {texts[1][:500]}"
    _OUTPUTS[path.name] = texts


@pytest.mark.slow
def test_the_training_notebook_gives_the_same_numbers_twice(tmp_path, monkeypatch):
    """Same seed, same numbers: notebook 02 trains a model; a second run prints exactly the
    same losses, metrics and results (Keras's per-epoch timings aside)."""
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    name = "02_minimise_quartile_objective.ipynb"
    path = next(p for p in NOTEBOOKS if p.name == name)
    first = _OUTPUTS.get(name)
    if first is None:  # run alone
        (tmp_path / "first").mkdir()
        first = _execute(path, tmp_path / "first")[0]
    (tmp_path / "second").mkdir()
    second, _ = _execute(path, tmp_path / "second")

    def numbers(texts):
        return TIMINGS.sub("", "".join(texts))

    assert numbers(first) == numbers(second)
    assert "learned theta" in numbers(first)  # the comparison covers the results
