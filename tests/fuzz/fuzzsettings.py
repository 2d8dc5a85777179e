"""The fuzz tests' fixed hypothesis profile: deterministic (derandomized: the same inputs on every run), no
example database, and a budget that keeps tests/fuzz/ well under a minute.  TRACEVISOR_FUZZ_EXAMPLES
raises the budget of every fuzz test (see README.md)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("TRACEVISOR_FUZZ_EXAMPLES", "0") or 0)

settings.register_profile(
    "tracevisor-fuzz",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.function_scoped_fixture],
)


def budget(ci_default: int) -> settings:
    """Settings for one fuzz test: ``ci_default`` examples, or TRACEVISOR_FUZZ_EXAMPLES when set."""
    return settings(settings.get_profile("tracevisor-fuzz"), max_examples=EXAMPLES or ci_default)
