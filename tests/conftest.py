"""Hypothesis settings for the property-based tests (tests/ops/test_properties.py).

Profiles, chosen with the environment variable HYPOTHESIS_PROFILE:
  * "ci" (default): derandomized (the same examples on every run and machine), no example
    database, 30 examples per test, no deadline (TensorFlow's first calls are slow), the
    reproduction blob printed with every falsifying example, only the first distinct bug
    shrunk and reported, and no "explain" phase (its line tracing slows TensorFlow down).
  * "thorough": random examples, ten times as many, for a local hunt.
"""

import os

try:
    from hypothesis import HealthCheck, Phase, settings
except ImportError:  # only the property tests need hypothesis (the `test` extra installs it)
    settings = None

if settings is not None:
    settings.register_profile(
        "ci",
        derandomize=True,
        database=None,
        max_examples=30,
        deadline=None,
        print_blob=True,
        report_multiple_bugs=False,
        phases=[phase for phase in Phase if phase is not Phase.explain],  # no line tracing
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile(
        "thorough", settings.get_profile("ci"), derandomize=False, max_examples=300
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
