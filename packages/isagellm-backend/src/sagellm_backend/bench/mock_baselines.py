"""The mock's baselines: the plain way to do what its copies and swaps do, page references in a
dict queued on its stream. It moves no bytes to move a page and has no events beside its own,
so it has no copy floor and no raw events to compare with."""

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

    def contiguous_copy(self, nbytes: int) -> None:
        return None

    def contiguous_swap(self, nbytes: int) -> None:
        return None

    def raw_event_pair(self) -> None:
        return None

    def paged_copy(self, src_pages: list[int], dst_pages: list[int]) -> Callable[[], None]:
        """Page by page between the bytes of a dict, as the mock's memory keeps them."""
        size = self._provider.kv_layout.page_bytes(self._provider.capability().kv_dtypes[0])
        pages = dict.fromkeys(src_pages + dst_pages, b"\x5a" * size)

        def run() -> None:
            for src, dst in zip(src_pages, dst_pages, strict=True):
                pages[dst] = pages[src]

        return self._queued(run)

    def paged_swap(self, pages: list[int]) -> Callable[[], None]:
        size = self._provider.kv_layout.page_bytes(self._provider.capability().kv_dtypes[0])
        device = dict.fromkeys(pages, b"\x5a" * size)
        host: dict[int, bytes] = {}
        slots = range(len(pages))

        def run() -> None:
            for page, slot in zip(pages, slots, strict=True):
                host[slot] = device[page]
            for page, slot in zip(pages, slots, strict=True):
                device[page] = host[slot]

        return self._queued(run)

    def _queued(self, work: Callable[[], None]) -> Callable[[], None]:
        """``work`` queued on the current stream, where the mock queues its own (it runs when
        the stream is waited for, off the clock, as the mock's copies do)."""
        provider = self._provider
        return lambda: provider.current_stream().launch(work)

    def index_tensor(self, values: list[Any], *, wide: bool) -> MockTensor:
        nested = bool(values) and isinstance(values[0], list)
        return MockTensor([v for row in values for v in row] if nested else values, DType.FP32)
