"""Fixtures of the loss and metric tests, which run under the Keras backend that
`KERAS_BACKEND` selects, through the helpers of tests/backends/harness.py."""

import sys
from pathlib import Path

# `import harness` (tests/backends/harness.py) from the test files of this directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends"))

from harness import float32_policy_and_seed, rng  # noqa: F401  (the shared fixtures)
