"""Test-wide settings. Unit tests need no root and no kernel: the dataplane is FakeDataplane.

Hypothesis runs the `kproxy` profile (quick, for every run); `--hypothesis-profile=deep` runs
many more examples when hunting for a bug."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

# Planning, applying and tracing a generated cluster takes a few milliseconds, sometimes more on
# a loaded machine: judge properties by their examples, not by a per-example deadline.
settings.register_profile(
    "kproxy", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "deep", deadline=None, max_examples=2000, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("kproxy")
