"""Memory of the mock devices: budgeted pages whose bytes exist only once written.

Each mock device has a budget of ``max_memory_mb``; host memory is not budgeted. A block gets
page ids as from a device's pool: freed ids are handed out again, last freed first. Nothing is
reserved up front and a page keeps no bytes until something writes it. Accounting is exact all
the same: a page counts ``page_bytes(dtype)`` against its device's budget from allocation to
release, and a batch that does not fit raises ResourceExhaustedError before anything changes.

A written page keeps its bytes tagged with the handle of the block that wrote them, until the
page is written again; stream work reads and writes pages when it runs, as a device does. Fresh
blocks are poisoned: a page its block has not written reads as :data:`POISON` bytes (``0xFF``:
NaN in every float dtype, -1 in int8), as a device hands out memory holding whatever was there,
so engine code that reads KV before writing it fails on the mock too. Device work that wrote a
page after its block was freed would leave the next owner's page reading as poison.
"""

from __future__ import annotations

import functools
import itertools
import operator
from collections.abc import Sequence

from sagellm_backend.blocks import Give, Take
from sagellm_backend.device import HOST, MemoryStats
from sagellm_backend.dtypes import DType
from sagellm_backend.errors import ResourceExhaustedError
from sagellm_backend.kv import KVBlock, KVLayout

__all__ = ["MAX_PAGES", "POISON", "MockMemory"]

POISON = 0xFF
"""The byte a page reads as before anything wrote it."""

MAX_PAGES = 1 << 22
"""Pages one mock device keeps track of at once: its bookkeeping lives in host memory, so a
larger allocation is refused as resource_exhausted however large the budget."""

_UNBOUNDED_PAGES = 1 << 62
"""Host memory is not budgeted: no block is too large for it ever to hold."""


class DeviceMemory:
    """One mock device: its budget, page ids and the bytes of written pages."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self.sizes: dict[int, int] = {}
        """Bytes of each live page."""
        self.data: dict[int, tuple[int, bytes]] = {}
        """Each written page: the handle of the block that wrote it, and its bytes."""
        self._free: list[int] = []
        self._fresh = itertools.count()

    def take_one(self, size: int) -> tuple[int, ...]:
        """The page of a new one-page block of ``size`` bytes; IndexError if it does not fit."""
        used = self.used + size
        if (self.capacity is not None and used > self.capacity) or len(self.sizes) >= MAX_PAGES:
            raise IndexError("no page left")
        page = self._free.pop() if self._free else next(self._fresh)
        self.sizes[page] = size
        self.used = used
        if used > self.peak:
            self.peak = used
        return (page,)

    def take(
        self, device: str, sizes: Sequence[int], page_counts: Sequence[int]
    ) -> list[tuple[int, ...]]:
        """The pages of new blocks whose pages are ``sizes[i]`` bytes, all or none."""
        total = sum(page_counts)
        uniform = len(set(sizes)) == 1
        nbytes = total * sizes[0] if uniform else sum(map(operator.mul, sizes, page_counts))
        if self.capacity is not None and self.used + nbytes > self.capacity:
            raise ResourceExhaustedError(
                f"{device} is out of KV memory: {nbytes} bytes requested, "
                f"{self.capacity - self.used} of {self.capacity} free",
                hint="free or migrate blocks first, or raise max_memory_mb",
            )
        if len(self.sizes) + total > MAX_PAGES:
            raise ResourceExhaustedError(
                f"{device} would track {len(self.sizes) + total} pages, more than the mock's "
                f"{MAX_PAGES}",
                hint="allocate fewer or smaller blocks, or raise tokens_per_block",
            )
        reused = min(total, len(self._free))
        ids = self._free[len(self._free) - reused :]
        del self._free[len(self._free) - reused :]
        ids.reverse()
        ids.extend(itertools.islice(self._fresh, total - reused))
        if uniform:
            self.sizes.update(zip(ids, itertools.repeat(sizes[0])))
        else:
            per_page = itertools.chain.from_iterable(map(itertools.repeat, sizes, page_counts))
            self.sizes.update(zip(ids, per_page, strict=True))
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        if total == len(page_counts):
            return list(zip(ids))
        ends = itertools.accumulate(page_counts)
        return [tuple(ids[end - n : end]) for n, end in zip(page_counts, ends, strict=True)]

    def give(self, pages: tuple[int, ...]) -> None:
        """Take back the pages of one block."""
        sizes = self.sizes
        for page in pages:
            self.used -= sizes.pop(page)
        self._free.extend(pages)


class MockMemory:
    """A :class:`~sagellm_backend.blocks.BlockStorage` of budgeted mock pages.

    The table serialises every call that allocates or releases; the data operations run as
    stream work, under the mock's stream lock.
    """

    def __init__(self, layout: KVLayout, capacity_bytes: int) -> None:
        self._layout = layout
        self._capacity = capacity_bytes
        self._devices: dict[str, DeviceMemory] = {}
        self._poison: dict[int, bytes] = {}

    def device(self, name: str) -> DeviceMemory:
        """The memory of device ``name`` (a name the table has checked), made on first use."""
        memory = self._devices.get(name)
        if memory is None:
            memory = DeviceMemory(None if name == HOST else self._capacity)
            memory = self._devices.setdefault(name, memory)
        return memory

    # BlockStorage.

    def max_pages(self, device: str, dtype: DType) -> int:
        if device == HOST:
            return _UNBOUNDED_PAGES
        return self._capacity // self._layout.page_bytes(dtype)

    def allocate(
        self, device: str, dtypes: Sequence[DType], page_counts: Sequence[int]
    ) -> list[tuple[int, ...]]:
        distinct = set(dtypes)
        if len(distinct) == 1:
            sizes = [self._layout.page_bytes(distinct.pop())] * len(page_counts)
        else:
            sizes = list(map(self._layout.page_bytes, dtypes))
        return self.device(device).take(device, sizes, page_counts)

    def release(self, device: str, pages: Sequence[tuple[int, ...]]) -> None:
        give = self.device(device).give
        for block_pages in pages:
            give(block_pages)

    def taker(self, device: str, dtype: DType) -> Take:
        return functools.partial(self.device(device).take_one, self._layout.page_bytes(dtype))

    def giver(self, device: str) -> Give:
        return self.device(device).give

    # Data, run as stream work.

    def write(self, block: KVBlock, payload: bytes) -> None:
        data, size = self.device(block.device).data, self._layout.page_bytes(block.dtype)
        for i, page in enumerate(block.pages):
            data[page] = (block.handle, payload[i * size : (i + 1) * size])

    def read(self, block: KVBlock) -> bytes:
        data, size = self.device(block.device).data, self._layout.page_bytes(block.dtype)
        poison = self._poisoned(size)
        return b"".join(_content(data.get(page), block.handle, poison) for page in block.pages)

    def move(self, sources: Sequence[KVBlock], destinations: Sequence[KVBlock]) -> None:
        """Copy the pages of ``sources[i]`` to ``destinations[i]``; a page its block did not
        write stays so."""
        for src, dst in zip(sources, destinations, strict=True):
            source, target = self.device(src.device).data, self.device(dst.device).data
            for page, to in zip(src.pages, dst.pages, strict=True):
                entry = source.get(page)
                if entry is not None and entry[0] == src.handle:
                    target[to] = (dst.handle, entry[1])
                else:
                    target.pop(to, None)

    def stats(self, device: str, blocks: int) -> MemoryStats:
        memory = self.device(device)
        return MemoryStats(
            total_bytes=memory.capacity or 0,
            used_bytes=memory.used,
            peak_used_bytes=memory.peak,
            kv_blocks_in_use=blocks,
            kv_pages_in_use=len(memory.sizes),
        )

    def _poisoned(self, size: int) -> bytes:
        page = self._poison.get(size)
        if page is None:
            page = self._poison.setdefault(size, bytes([POISON]) * size)
        return page


def _content(entry: tuple[int, bytes] | None, handle: int, poison: bytes) -> bytes:
    return entry[1] if entry is not None and entry[0] == handle else poison
