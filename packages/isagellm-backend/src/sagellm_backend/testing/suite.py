"""pytest base class: the standard checks as one test each, for a plugin's own test suite.

    from sagellm_backend.testing.suite import BackendConformanceSuite
    from my_backend.testing import MyTarget

    class TestMyBackend(BackendConformanceSuite):
        def make_target(self): return MyTarget()

A check that does not apply is skipped with its reason. ``expected_failures`` (check id to
reason) is the only way to override a standard check; an expected failure that passes fails.
This module imports pytest; :mod:`sagellm_backend.testing` does not.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import pytest

from sagellm_backend.testing.check import Check
from sagellm_backend.testing.checks import STANDARD_CHECKS
from sagellm_backend.testing.runner import (
    Outcome,
    probe_capability,
    run_check,
    validate_expected_failures,
)
from sagellm_backend.testing.target import ConformanceTarget

__all__ = ["BackendConformanceSuite"]


class BackendConformanceSuite(ABC):
    """Subclass (with a name starting with ``Test``) and implement :meth:`make_target`."""

    expected_failures: ClassVar[Mapping[str, str]] = {}
    """Check id -> why this backend cannot keep that promise."""
    seed: ClassVar[int] = 0
    """Seed of the checks' random data; change it to explore other inputs."""

    @abstractmethod
    def make_target(self) -> ConformanceTarget[Any]:
        """The backend under test."""

    @pytest.mark.parametrize("check", STANDARD_CHECKS, ids=lambda check: check.id)
    def test_conformance(self, check: Check) -> None:
        expected = validate_expected_failures(self.expected_failures).get(check.id)
        target = self.make_target()
        result = run_check(
            target,
            check,
            capability=probe_capability(target),
            seed=self.seed,
            expected_failure=expected,
        )
        if result.outcome is Outcome.SKIPPED:
            pytest.skip(result.message)
        if result.outcome is Outcome.XFAILED:
            pytest.xfail(result.message)
        if result.outcome is Outcome.FAILED:
            pytest.fail(f"{check.id}: {result.message}", pytrace=False)
