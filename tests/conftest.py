"""Shared pytest set-up, kept minimal: a Hypothesis profile for slow shared CI machines.

Tests run on a 2-core CPU with no GPU and no network. Under ``CI=true`` Hypothesis runs derandomised (the
same examples every run) and without per-example deadlines, so a busy machine cannot turn into a flaky test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is in the `test` extra; plain pytest still runs the non-property tests
    pass
else:
    settings.register_profile("ci", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("dev", deadline=None)
    settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a module single-threaded and restore the setting afterwards. Its tests run many small tensor ops;
    on a busy 2-core machine torch's intra-op threads spin against each other (50-100x slowdowns seen).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
