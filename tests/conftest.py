"""Shared fixtures. Hypothesis profiles: "dev" (default, fast) and "ci" (same size, derandomised)."""

import os

import jax
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci", max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def _float64():
    """Float64 while the fixture lives (tight tolerances); restores the previous setting."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


x64 = pytest.fixture(scope="module", name="x64")(_float64)  # for every test of one module
x64_class = pytest.fixture(scope="class", name="x64_class")(_float64)  # for the tests of one class
