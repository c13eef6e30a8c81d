"""Memory of the mock devices: one ``bytearray`` per KV block, allocated when the block is.

Nothing is reserved up front. Each mock device has a budget of ``max_memory_mb``; host memory is
not budgeted. A batch that does not fit raises ResourceExhaustedError before anything is
allocated, so the pool is exactly as it was. Blocks get page ids as from a pool (unique among
the live blocks of a device, so ``KVBlock.num_pages`` is right); the mock never reuses them.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from sagellm_backend.device import HOST, MemoryStats
from sagellm_backend.dtypes import DType
from sagellm_backend.errors import ResourceExhaustedError
from sagellm_backend.kv import KVBlock, KVLayout

__all__ = ["BlockBytes", "MockMemory"]

_UNBOUNDED_PAGES = 1 << 40


@dataclass(eq=False)
class BlockBytes:
    """The storage of one block: where it lives, its page count and its bytes."""

    device: str
    num_pages: int
    data: bytearray


class MockMemory:
    """A :class:`~sagellm_backend.blocks.BlockStorage` of per-block bytearrays, with accounting.

    A block's slot is its :class:`BlockBytes`, kept by handle. The BlockTable serialises
    allocation and release; the lock here keeps ``stats`` consistent.
    """

    def __init__(self, layout: KVLayout, devices: Sequence[str], capacity_bytes: int) -> None:
        self._layout = layout
        self._lock = threading.Lock()
        self._capacity = {d: capacity_bytes for d in devices if d != HOST}
        self._used = dict.fromkeys(devices, 0)
        self._peak = dict.fromkeys(devices, 0)
        self._blocks = dict.fromkeys(devices, 0)
        self._pages = dict.fromkeys(devices, 0)
        self._next_page = dict.fromkeys(devices, 0)
        self._slots: dict[int, BlockBytes] = {}

    def max_pages(self, device: str, dtype: DType) -> int:
        capacity = self._capacity.get(device)
        if capacity is None:
            return _UNBOUNDED_PAGES
        return capacity // self._layout.page_bytes(dtype)

    def allocate(
        self,
        device: str,
        dtypes: Sequence[DType],
        page_counts: Sequence[int],
        handles: Sequence[int],
    ) -> list[tuple[int, ...]]:
        sizes = [self._nbytes(d, n) for d, n in zip(dtypes, page_counts, strict=True)]
        nbytes = sum(sizes)
        with self._lock:
            capacity = self._capacity.get(device)
            if capacity is not None and self._used[device] + nbytes > capacity:
                free = capacity - self._used[device]
                raise ResourceExhaustedError(
                    f"{device} is out of KV memory: {nbytes} bytes requested, {free} of "
                    f"{capacity} free",
                    hint="free or migrate blocks first, or raise max_memory_mb",
                )
            bounds = list(itertools.accumulate(page_counts, initial=self._next_page[device]))
            pages = [tuple(range(start, end)) for start, end in itertools.pairwise(bounds)]
            self._next_page[device] = bounds[-1]
            self._slots.update(
                (handle, BlockBytes(device, n, bytearray(size)))
                for handle, n, size in zip(handles, page_counts, sizes, strict=True)
            )
            self._used[device] += nbytes
            self._peak[device] = max(self._peak[device], self._used[device])
            self._blocks[device] += len(page_counts)
            self._pages[device] += bounds[-1] - bounds[0]
        return pages

    def release(self, blocks: Sequence[KVBlock]) -> None:
        with self._lock:
            for block in blocks:
                slot = self._slots.pop(block.handle)
                self._used[slot.device] -= len(slot.data)
                self._blocks[slot.device] -= 1
                self._pages[slot.device] -= slot.num_pages

    def slot(self, block: KVBlock) -> BlockBytes:
        with self._lock:
            return self._slots[block.handle]

    def stats(self, device: str) -> MemoryStats:
        with self._lock:
            return MemoryStats(
                total_bytes=self._capacity.get(device, 0),
                used_bytes=self._used[device],
                peak_used_bytes=self._peak[device],
                kv_blocks_in_use=self._blocks[device],
                kv_pages_in_use=self._pages[device],
            )

    def _nbytes(self, dtype: DType, num_pages: int) -> int:
        return num_pages * self._layout.page_bytes(dtype)
