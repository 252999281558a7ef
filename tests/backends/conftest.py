"""Fixtures of the cross-backend tests (tests/backends), which run under the Keras backend that
`KERAS_BACKEND` selects: TensorFlow in the main `python -m pytest` run, JAX and PyTorch in the
separate runs of `.ci/other_backends`. See `harness.py` for the per-backend helpers.

Under TensorFlow the tests marked `slow` here are skipped, except the cross-backend `.keras`
test: they repeat, through `keras.ops`, checks that the TensorFlow suite (tests/ops,
tests/layers, tests/models) already makes on TensorFlow, and would only lengthen the main run.
"""

from pathlib import Path

import pytest
from harness import backend, float32_policy_and_seed, float64_available, rng  # noqa: F401

HERE = Path(__file__).resolve().parent
# Slow tests that run under TensorFlow too (files, or single tests): what the TensorFlow suite
# does not check itself.
RUN_SLOW_UNDER_TENSORFLOW = (
    "test_backend_saving.py",
    "test_perturbed_estimator_is_reproducible_and_reaches_the_planted_theta",
    "test_every_output_mode_trains",
    "test_backup_and_restore_resumes_fit_to_the_same_theta",
)


def pytest_report_header(config):
    return (
        f"keras_softquantile cross-backend tests: KERAS_BACKEND={backend()}, "
        f"float64 {'available' if float64_available() else 'unavailable (JAX without x64)'}"
    )


def pytest_collection_modifyitems(config, items):
    if backend() != "tensorflow":
        return
    skip = pytest.mark.skip(
        reason="slow, and checked under TensorFlow by tests/ops, tests/layers and tests/models "
        "(runs under KERAS_BACKEND=jax and torch)"
    )
    for item in items:
        path = Path(str(item.path)).resolve()
        if (
            HERE in path.parents
            and item.get_closest_marker("slow")
            and path.name not in RUN_SLOW_UNDER_TENSORFLOW
            and item.originalname not in RUN_SLOW_UNDER_TENSORFLOW
        ):
            item.add_marker(skip)
