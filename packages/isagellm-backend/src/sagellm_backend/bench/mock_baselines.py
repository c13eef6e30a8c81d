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

    def paged_copy(self, src_pages: list[int], dst_pages: list[int]) -> Callable[[], None]:
        """Page by page between the bytes of a dict, as the mock's memory keeps them."""
        size = self._provider.kv_layout.page_bytes(self._provider.capability().kv_dtypes[0])
        pages = dict.fromkeys(src_pages + dst_pages, b"\x5a" * size)

        def copy() -> None:
            for src, dst in zip(src_pages, dst_pages, strict=True):
                pages[dst] = pages[src]

        return copy

    def paged_swap(self, pages: list[int]) -> Callable[[], None]:
        size = self._provider.kv_layout.page_bytes(self._provider.capability().kv_dtypes[0])
        device = dict.fromkeys(pages, b"\x5a" * size)
        host: dict[int, bytes] = {}
        slots = range(len(pages))

        def swap() -> None:
            for page, slot in zip(pages, slots, strict=True):
                host[slot] = device[page]
            for page, slot in zip(pages, slots, strict=True):
                device[page] = host[slot]

        return swap

    def index_tensor(self, values: list[Any], *, wide: bool) -> MockTensor:
        nested = bool(values) and isinstance(values[0], list)
        return MockTensor([v for row in values for v in row] if nested else values, DType.FP32)
