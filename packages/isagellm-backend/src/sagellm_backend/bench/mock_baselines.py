"""The mock's baselines: its device memory is host bytes, and its raw events are its own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sagellm_backend.dtypes import DType
from sagellm_backend.mock.provider import MockBackendProvider
from sagellm_backend.mock.tensor import MockTensor

__all__ = ["MockBaselines"]


class MockBaselines:
    def __init__(self, provider: MockBackendProvider) -> None:
        self._provider = provider

    def contiguous_copy(self, nbytes: int) -> Callable[[], None]:
        src, dst = bytearray(b"\x5a" * nbytes), bytearray(nbytes)

        def copy() -> None:
            dst[:] = src

        return copy

    def contiguous_swap(self, nbytes: int) -> Callable[[], None]:
        device, host = bytearray(b"\x5a" * nbytes), bytearray(nbytes)

        def swap() -> None:
            host[:] = device
            device[:] = host

        return swap

    def raw_event_pair(self) -> Callable[[], float]:
        provider = self._provider

        def pair() -> float:
            start, end = provider.create_event(), provider.create_event()
            start.record()
            end.record()
            end.synchronize()
            return end.elapsed_ms(start)

        return pair

    def index_tensor(self, values: list[Any], *, wide: bool) -> MockTensor:
        nested = bool(values) and isinstance(values[0], list)
        return MockTensor([v for row in values for v in row] if nested else values, DType.FP32)
