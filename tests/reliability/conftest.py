"""Hypothesis profiles for the fuzz tests: `ci` (default, a few hundred inputs per command, fast) and
`big` (HYPOTHESIS_PROFILE=big: 20x as many, run by hand; the figures are in docs/reliability.md)."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
settings.register_profile("big", deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
