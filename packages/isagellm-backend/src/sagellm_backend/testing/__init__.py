"""The conformance kit: checks that a backend keeps every promise of the protocols and of its
own capability matrix.

A backend author supplies a :class:`ConformanceTarget` (how to make a provider, build tensors
and run a world of ranks) and runs the checks with :func:`run_conformance`, with the pytest
base class in :mod:`sagellm_backend.testing.suite`, or with ``sagellm-backend check SPEC``.
Checks are plain callables; nothing here imports pytest.
"""

from __future__ import annotations

from sagellm_backend.testing.check import (
    Area,
    Check,
    CheckContext,
    CheckSkipped,
    ConformanceFailure,
    claims,
    claims_op,
    expect_refusal,
    lacks,
    lacks_op,
)
from sagellm_backend.testing.checks import STANDARD_CHECKS
from sagellm_backend.testing.mock_target import MockTarget, MockTensors
from sagellm_backend.testing.runner import (
    CheckResult,
    ConformanceReport,
    Outcome,
    probe_capability,
    run_check,
    run_conformance,
    select_checks,
    validate_expected_failures,
)
from sagellm_backend.testing.target import (
    ConformanceTarget,
    RankFn,
    RankOutcome,
    TensorAdapter,
    run_rank,
)

__all__ = [
    "STANDARD_CHECKS",
    "Area",
    "Check",
    "CheckContext",
    "CheckResult",
    "CheckSkipped",
    "ConformanceFailure",
    "ConformanceReport",
    "ConformanceTarget",
    "MockTarget",
    "MockTensors",
    "Outcome",
    "RankFn",
    "RankOutcome",
    "TensorAdapter",
    "claims",
    "claims_op",
    "expect_refusal",
    "lacks",
    "lacks_op",
    "probe_capability",
    "run_check",
    "run_conformance",
    "run_rank",
    "select_checks",
    "validate_expected_failures",
]
