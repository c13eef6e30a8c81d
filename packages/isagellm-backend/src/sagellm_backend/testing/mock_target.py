"""The mock backend's conformance target: ranks are threads of one simulated world."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from typing_extensions import Unpack

from sagellm_backend.dtypes import DType
from sagellm_backend.errors import DeadlineExceededError, InvalidArgumentError
from sagellm_backend.mock import MockBackendProvider, MockOptions, MockTensor, MockWorld
from sagellm_backend.mock.sampling import (
    SAMPLE_DTYPES,
    SampleComparison,
    SampleInputs,
    reference_sample,
)
from sagellm_backend.protocols import BackendProvider
from sagellm_backend.testing.target import (
    ConformanceTarget,
    OpOracle,
    RankFn,
    RankOutcome,
    run_rank,
)

__all__ = ["MockTarget", "MockTensors", "mock_options_of"]

DEFAULT_MAX_MEMORY_MB = 64
"""Pool size of the target's providers unless given: small enough to exhaust quickly."""


class MockTensors:
    """Builds and reads MockTensors; the oracle of the mock's one kernel op, ``sample``."""

    dtypes = frozenset(DType)

    def tensor(
        self, provider: BackendProvider[MockTensor], values: Sequence[float], dtype: DType
    ) -> MockTensor:
        return MockTensor(values, dtype)

    def values(self, tensor: MockTensor) -> list[float]:
        return tensor.tolist()

    def oracle(self, provider: BackendProvider[MockTensor], name: str) -> OpOracle | None:
        """``sample``'s pure-Python reference (a Gumbel-max in log space) and inputs; tokens are
        compared once ``provider`` has synchronized."""
        if name != "sample":
            return None
        return OpOracle(
            name,
            reference_sample,
            SampleInputs(),
            SampleComparison(provider.synchronize),
            frozenset(SAMPLE_DTYPES),
        )


class MockTarget(ConformanceTarget[MockTensor]):
    """Mock providers built with ``options`` (MockBackendProvider's keyword arguments).

    Collectives run on simulated worlds of ``world_sizes`` ranks, one thread per rank.
    ``provider_class`` may be a subclass of MockBackendProvider (to check a variant of the
    mock); ``make_provider`` replaces how single providers are made (the ``check`` command
    passes one that goes through the registry).
    """

    tensors = MockTensors()

    def __init__(
        self,
        *,
        name: str = "mock",
        world_sizes: Sequence[int] = (1, 2, 4),
        make_provider: Callable[[], MockBackendProvider] | None = None,
        provider_class: type[MockBackendProvider] = MockBackendProvider,
        **options: Unpack[MockOptions],
    ) -> None:
        sizes = tuple(world_sizes)
        if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
            raise InvalidArgumentError(
                f"world_sizes must be positive ints, got {world_sizes!r}",
                hint="for example world_sizes=(1, 2, 4)",
            )
        options.setdefault("max_memory_mb", DEFAULT_MAX_MEMORY_MB)
        self.name = name
        self.options = options
        self._world_sizes = sizes
        self._make = make_provider
        self._class = provider_class

    @classmethod
    def from_provider(
        cls, make_provider: Callable[[], MockBackendProvider], *, name: str = "mock"
    ) -> MockTarget:
        """A target whose providers come from ``make_provider`` and whose worlds share their
        capability matrix and KV layout."""
        provider = make_provider()
        try:
            options = mock_options_of(provider)
        finally:
            provider.close()
        return cls(name=name, make_provider=make_provider, **options)

    def make_provider(self) -> MockBackendProvider:
        if self._make is not None:
            return self._make()
        return self._class(**self.options)

    @property
    def launches_worlds(self) -> bool:
        return True

    def world_sizes(self) -> tuple[int, ...]:
        return self._world_sizes

    def run_world(
        self, world_size: int, fn: RankFn[MockTensor], *, timeout: float
    ) -> list[RankOutcome]:
        """Run ``fn`` on one thread per rank; a rank still running after ``timeout`` seconds is
        reported as DeadlineExceededError and its thread abandoned."""
        world = MockWorld(world_size)
        providers = [
            self._class(world=world, rank=rank, **self.options) for rank in range(world_size)
        ]
        outcomes: dict[int, RankOutcome] = {}

        def rank_main(provider: MockBackendProvider) -> None:
            outcomes[provider.rank] = run_rank(provider.rank, fn, self, provider)

        threads = [
            threading.Thread(target=rank_main, args=(p,), name=f"mock-rank-{p.rank}", daemon=True)
            for p in providers
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for provider in providers:
            provider.close()
        return [
            outcomes.get(
                rank,
                RankOutcome(
                    rank,
                    error=DeadlineExceededError(
                        f"rank {rank} did not finish within {timeout} s",
                        hint="a collective hung: every collective must honour its timeout",
                    ),
                    seconds=timeout,
                ),
            )
            for rank in range(world_size)
        ]


def mock_options_of(provider: MockBackendProvider) -> MockOptions:
    """The constructor options ``provider`` was made with, those every rank of a world shares."""
    return MockOptions(**provider.options)
