"""Every notebook in `notebooks/` runs top to bottom, within its time budget.

Notebooks are found by globbing, so a new one is executed as soon as it is added. Each runs in
a fresh kernel of the current interpreter, in a temporary working directory, and fails on the
first cell that raises. The committed notebooks carry no outputs.
"""

from __future__ import annotations

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


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    notebook = nbformat.read(path, as_version=4)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    client = nbclient.NotebookClient(
        notebook,
        timeout=TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    assert elapsed < TIMEOUT_S, f"{path.name} took {elapsed:.0f} s (budget {TIMEOUT_S} s)"
