"""The standard checks, grouped by area, in the order the kit runs them."""

from __future__ import annotations

from sagellm_backend.testing.check import Check
from sagellm_backend.testing.checks import (
    collectives,
    graph,
    inputs,
    kernels,
    kv,
    ops,
    provider,
    streams,
    threads,
)

__all__ = ["STANDARD_CHECKS"]

STANDARD_CHECKS: tuple[Check, ...] = (
    *provider.CHECKS,
    *streams.CHECKS,
    *kv.CHECKS,
    *inputs.CHECKS,
    *kernels.CHECKS,
    *ops.CHECKS,
    *graph.CHECKS,
    *threads.CHECKS,
    *collectives.CHECKS,
)
"""Every standard check; collectives last, since a missing-rank check may break a real group."""
