"""Shared pytest set-up, kept minimal: a Hypothesis profile for slow shared CI machines.

Tests run on a 2-core CPU with no GPU and no network. Under ``CI=true`` Hypothesis runs derandomised (the
same examples every run) and without per-example deadlines, so a busy machine cannot turn into a flaky test.
"""

from __future__ import annotations

import os

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is in the `test` extra; plain pytest still runs the non-property tests
    pass
else:
    settings.register_profile("ci", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("dev", deadline=None)
    settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))
