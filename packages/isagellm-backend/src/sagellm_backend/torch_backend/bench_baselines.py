"""The torch layer's benchmark baselines: plain tensor copies and the adapter's raw events."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch

from sagellm_backend.device import HOST
from sagellm_backend.torch_backend.provider import TorchBackendProvider

__all__ = ["TorchBaselines"]

S = TypeVar("S")
E = TypeVar("E")


class TorchBaselines(Generic[S, E]):
    def __init__(self, provider: TorchBackendProvider[S, E]) -> None:
        self._provider = provider

    def contiguous_copy(self, nbytes: int) -> Callable[[], None]:
        device = self._provider.torch_device
        src = torch.full((nbytes,), 0x5A, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)

        def copy() -> None:
            dst.copy_(src)

        return copy

    def contiguous_swap(self, nbytes: int) -> Callable[[], None]:
        adapter = self._provider.adapter
        on_device = torch.full(
            (nbytes,), 0x5A, dtype=torch.uint8, device=self._provider.torch_device
        )
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=adapter.pins_host_memory)
        non_blocking = adapter.pins_host_memory

        def swap() -> None:
            host.copy_(on_device, non_blocking=non_blocking)
            on_device.copy_(host, non_blocking=non_blocking)

        return swap

    def raw_event_pair(self) -> Callable[[], float]:
        adapter, index = self._provider.adapter, self._provider.index

        def pair() -> float:
            stream = adapter.current_stream(index)
            start, end = adapter.new_event(True), adapter.new_event(True)
            adapter.event_record(start, stream)
            adapter.event_record(end, stream)
            adapter.event_synchronize(end)
            return adapter.event_elapsed_ms(start, end)

        return pair

    def index_tensor(self, values: list[Any], *, wide: bool) -> torch.Tensor:
        dtype = torch.int64 if wide else torch.int32
        return torch.tensor(values, dtype=dtype, device=self._provider.torch_device)

    def paged_copy(self, src_pages: list[int], dst_pages: list[int]) -> Callable[[], None]:
        pool = self._provider.kv_pool()
        src = torch.tensor(src_pages, dtype=torch.int64, device=pool.device)
        dst = torch.tensor(dst_pages, dtype=torch.int64, device=pool.device)

        def copy() -> None:
            pool.index_copy_(1, dst, pool.index_select(1, src))

        return copy

    def paged_swap(self, pages: list[int]) -> Callable[[], None]:
        """Host pages ``0..n-1``; with pinned host memory the copies are asynchronous, one a
        layer each way, so that the host only issues them, as the backend's own swap does."""
        pool, host = self._provider.kv_pool(), self._provider.kv_pool(HOST)
        on_device = torch.tensor(pages, dtype=torch.int64, device=pool.device)
        n = len(pages)
        if not self._provider.adapter.pins_host_memory:
            on_host = torch.arange(n, dtype=torch.int64)

            def swap() -> None:
                host.index_copy_(1, on_host, pool.index_select(1, on_device).to(host.device))
                pool.index_copy_(1, on_device, host.index_select(1, on_host).to(pool.device))

            return swap
        back = torch.empty(
            (pool.shape[0], n, *pool.shape[2:]), dtype=pool.dtype, device=pool.device
        )

        def swap_pinned() -> None:
            out = pool.index_select(1, on_device)
            for layer in range(pool.shape[0]):
                host[layer, :n].copy_(out[layer], non_blocking=True)
            for layer in range(pool.shape[0]):
                back[layer].copy_(host[layer, :n], non_blocking=True)
            pool.index_copy_(1, on_device, back)

        return swap_pinned
