"""Benchmarks that apply to any backend, reported as ratios measured in the same run.

``sagellm-backend bench SPEC`` runs them; :func:`run_benchmarks` is the API. A device wheel
gets its figures in the same tables by implementing the protocols (a faster ``kv_blocks_copy``
shows up as a better ratio) and, for the roofline columns, by registering :class:`Baselines`
for its provider type with :func:`register_baselines`.
"""

from __future__ import annotations

from sagellm_backend.bench.baselines import Baselines, baselines_for, register_baselines
from sagellm_backend.bench.cases import BenchReport, Comparison, run_benchmarks

__all__ = [
    "BenchReport",
    "Baselines",
    "Comparison",
    "baselines_for",
    "register_baselines",
    "run_benchmarks",
]
