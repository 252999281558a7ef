"""Fixtures of the model tests; the problem generators live in `problems.py`."""

import keras
import pytest
from problems import planted_problem


@pytest.fixture
def problem():
    return planted_problem()


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
