"""README.md's Python examples run, and print what the README says they print."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"```(python|text)\n(.*?)```", re.DOTALL)
NUMBER = re.compile(r"-?\d+\.\d+|-?\d+")


def _examples() -> list[tuple[str, str | None]]:
    """Each ```python block, with the ```text block that follows it before the next python
    block (its expected output), or None."""
    examples = []
    for kind, body in BLOCK.findall(README.read_text()):
        if kind == "python":
            examples.append((body, None))
        elif examples and examples[-1][1] is None:
            examples[-1] = (examples[-1][0], body)
    return examples


EXAMPLES = _examples()


def test_the_readme_has_examples_with_expected_output():
    assert len(EXAMPLES) >= 2
    assert any(expected for _, expected in EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("code", "expected"), EXAMPLES, ids=[f"block{i}" for i in range(len(EXAMPLES))]
)
def test_example(code, expected, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    if expected is None:
        return
    lines, wanted = completed.stdout.strip().splitlines(), expected.strip().splitlines()
    assert len(lines) == len(wanted), completed.stdout
    for line, want in zip(lines, wanted, strict=True):
        # The same words, and numbers within the last printed digit's rounding (machines with
        # other CPUs may round float32 sums differently).
        assert NUMBER.sub("#", line) == NUMBER.sub("#", want), (line, want)
        for got, number in zip(NUMBER.findall(line), NUMBER.findall(want), strict=True):
            decimals = len(number.split(".")[1]) if "." in number else 0
            assert abs(float(got) - float(number)) <= 2 * 10.0**-decimals, (line, want)
