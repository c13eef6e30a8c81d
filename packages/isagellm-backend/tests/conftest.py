"""Shared test configuration: the fixed hypothesis profile and the reliability counts.

Tests add to :func:`reliability_counts` (sequences run, steps, threads, faults injected, ...);
the totals are printed in a "reliability counts" section at the end of the run.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "sagellm",
    derandomize=True,
    deadline=None,
    database=None,
    max_examples=100,
    stateful_step_count=50,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("sagellm")

RELIABILITY_COUNTS = pytest.StashKey["Counter[str]"]()

SwitchingThreads = Callable[[Callable[[int], None], int], None]
"""Runs ``worker(seed)`` for seeds ``0`` to ``n - 1``, each on a thread of its own."""


def pytest_configure(config: pytest.Config) -> None:
    config.stash[RELIABILITY_COUNTS] = Counter()


@pytest.fixture(scope="session")
def reliability_counts(pytestconfig: pytest.Config) -> Counter[str]:
    """Counts that the end-of-run summary reports; add to them with ``counts[name] += n``."""
    return pytestconfig.stash[RELIABILITY_COUNTS]


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    counts = config.stash.get(RELIABILITY_COUNTS, None)
    if not counts:
        return
    terminalreporter.section("reliability counts")
    for name, value in sorted(counts.items()):
        terminalreporter.write_line(f"{name}: {value}")


@pytest.fixture
def switching_threads() -> SwitchingThreads:
    """Run ``worker(seed)`` on ``n`` threads at once while the interpreter switches threads every
    microsecond, and wait for them (at most two minutes each)."""

    def run(worker: Callable[[int], None], n: int) -> None:
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(n)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
        finally:
            sys.setswitchinterval(interval)

    return run
