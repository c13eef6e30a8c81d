"""Memory of the mock devices: budgeted pages whose bytes exist only once written.

Each mock device has a budget of ``max_memory_mb``; host memory is not budgeted. A block gets
page ids as from a device's pool, one pool per (device, dtype): freed ids are handed out again,
last freed first. Nothing is reserved up front and a page keeps no bytes until something writes
it. Accounting is exact all the same: a page counts ``page_bytes(dtype)`` against its device's
budget from allocation to release, and a batch that does not fit raises ResourceExhaustedError
before anything changes.

A page gets a new stamp when it is first handed out and again whenever it is released, so no
two owners of a page see the same stamp; a written page keeps its bytes tagged with the stamp
its page had when the write was issued, and stream work reads and writes pages when it runs, as
a device does. Fresh blocks are poisoned: a page its block has not written reads as
:data:`POISON` bytes (``0xFF``: NaN in every float dtype, -1 in int8), as a device hands out
memory holding whatever was there, so engine code that reads KV before writing it fails on the
mock too. Device work that wrote a page after its block was freed leaves the next owner's page
reading as poison.
"""

# Annotations here are evaluated (no postponed annotations): a NamedTuple of annotation
# strings compiles each one when the class is made, at every start-up.
import functools
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from sagellm_backend.blocks import Give, Pages, Pool, Take, Transfer, blocks_of, total_pages
from sagellm_backend.device import HOST, MemoryStats
from sagellm_backend.dtypes import DType
from sagellm_backend.errors import ResourceExhaustedError
from sagellm_backend.kv import KVBlockInfo, KVLayout

__all__ = ["MAX_PAGES", "POISON", "MockMemory"]

POISON = 0xFF
"""The byte a page reads as before anything wrote it."""

MAX_PAGES = 1 << 22
"""Pages one mock device keeps track of at once: its bookkeeping lives in host memory, so a
larger allocation is refused as resource_exhausted however large the budget."""

_UNBOUNDED_PAGES = 1 << 62
"""Host memory is not budgeted: no block is too large for it ever to hold."""
_UNBOUNDED_BYTES = 1 << 62
"""The budget of host memory, which is not budgeted."""


class DeviceMemory:
    """One mock device: its budget, the stamps of its pages and the bytes of written pages, by
    page id."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.limit = _UNBOUNDED_BYTES if capacity is None else capacity
        """The most bytes of pages that may be in use at once."""
        self.used = 0
        self.peak = 0
        self.pages = 0
        """Pages of live blocks."""
        self.stamps: dict[int, int] = {}
        """The stamp of each page handed out so far (new on release, so the next owner's)."""
        self.data: dict[int, tuple[int, bytes]] = {}
        """Each written page: the stamp it had when the write was issued, and its bytes."""
        self.stamp = itertools.count().__next__
        """A new stamp."""


class PoolPages:
    """The page ids of one (device, dtype) pool: ``base + n``, freed ones reused first."""

    def __init__(self, memory: DeviceMemory, pool: Pool, size: int) -> None:
        self.memory = memory
        self.size = size
        self.free: list[int] = []
        self._fresh = itertools.count(pool.base)

    def take_one(self) -> int:
        """The page of a new one-page block; IndexError if it does not fit."""
        memory = self.memory
        used = memory.used + self.size
        if used > memory.limit or memory.pages >= MAX_PAGES:
            raise IndexError("no page left")
        free = self.free
        if free:
            page = free.pop()
        else:
            page = next(self._fresh)
            memory.stamps[page] = memory.stamp()
        memory.pages += 1
        memory.used = used
        if used > memory.peak:
            memory.peak = used
        return page

    def take(self, page_counts: Sequence[int], total: int) -> list[Pages]:
        """The pages of new blocks, ``total`` in all; the caller checked that they fit."""
        memory, free = self.memory, self.free
        nbytes = total * self.size
        reused = min(total, len(free))
        pages = free[len(free) - reused :]
        del free[len(free) - reused :]
        pages.reverse()
        if reused < total:
            fresh = list(itertools.islice(self._fresh, total - reused))
            memory.stamps.update(zip(fresh, itertools.repeat(memory.stamp())))
            pages.extend(fresh)
        memory.pages += total
        memory.used += nbytes
        memory.peak = max(memory.peak, memory.used)
        return blocks_of(pages, page_counts)

    def give_one(self, page: int) -> None:
        """Take back the page of a one-page block."""
        memory = self.memory
        memory.stamps[page] = memory.stamp()
        memory.pages -= 1
        memory.used -= self.size
        self.free.append(page)

    def give_all(self, pages: Sequence[int]) -> None:
        """Take back released pages, by page id."""
        memory = self.memory
        memory.stamps.update(zip(pages, itertools.repeat(memory.stamp())))
        memory.pages -= len(pages)
        self.free.extend(pages)
        memory.used -= self.size * len(pages)


class PageCopies(NamedTuple):
    """Copies from ``source`` to ``target``: (page id, its stamp, target page id, its stamp)."""

    source: str
    target: str
    pages: list[tuple[int, int, int, int]]


class MockMemory:
    """A :class:`~sagellm_backend.blocks.BlockStorage` of budgeted mock pages.

    The table serialises every call that allocates or releases; the data operations run as
    stream work, under the mock's stream lock.
    """

    def __init__(self, layout: KVLayout, capacity_bytes: int) -> None:
        self._layout = layout
        self._capacity = capacity_bytes
        self._devices: dict[str, DeviceMemory] = {}
        self._pools: dict[int, PoolPages] = {}
        self._bases: dict[tuple[str, DType], int] = {}
        self._poison: dict[int, bytes] = {}

    def device(self, name: str) -> DeviceMemory:
        """The memory of device ``name`` (a name the table has checked), made on first use."""
        memory = self._devices.get(name)
        if memory is None:
            memory = DeviceMemory(None if name == HOST else self._capacity)
            memory = self._devices.setdefault(name, memory)
        return memory

    def _pages(self, pool: Pool) -> PoolPages:
        pages = self._pools.get(pool.number)
        if pages is None:
            size = self._layout.page_bytes(pool.dtype)
            pages = PoolPages(self.device(pool.device), pool, size)
            self._pools[pool.number] = pages
            self._bases[pool.device, pool.dtype] = pool.base
        return pages

    # BlockStorage.

    def max_pages(self, pool: Pool) -> int:
        if pool.device == HOST:
            return _UNBOUNDED_PAGES
        return self._capacity // self._layout.page_bytes(pool.dtype)

    def allocate(self, requests: Sequence[tuple[Pool, Sequence[int]]]) -> list[list[Pages]]:
        totals = [total_pages(page_counts) for _, page_counts in requests]
        pages = [self._pages(pool) for pool, _ in requests]
        wanted: dict[str, tuple[int, int]] = {}
        for (pool, _), total, p in zip(requests, totals, pages, strict=True):
            nbytes, count = wanted.get(pool.device, (0, 0))
            wanted[pool.device] = (nbytes + total * p.size, count + total)
        for device, (nbytes, count) in wanted.items():
            memory = self.device(device)
            if memory.capacity is not None and memory.used + nbytes > memory.capacity:
                raise ResourceExhaustedError(
                    f"{device} is out of KV memory: {nbytes} bytes requested, "
                    f"{memory.capacity - memory.used} of {memory.capacity} free",
                    hint="free or migrate blocks first, or raise max_memory_mb",
                )
            if memory.pages + count > MAX_PAGES:
                raise ResourceExhaustedError(
                    f"{device} would track {memory.pages + count} pages, more than the "
                    f"mock's {MAX_PAGES}",
                    hint="allocate fewer or smaller blocks, or raise tokens_per_block",
                )
        return [
            p.take(page_counts, total)
            for p, (_, page_counts), total in zip(pages, requests, totals, strict=True)
        ]

    def release(self, pool: Pool, pages: Sequence[int]) -> None:
        self._pages(pool).give_all(pages)

    def taker(self, pool: Pool) -> Take:
        return self._pages(pool).take_one

    def giver(self, pool: Pool) -> Give:
        return self._pages(pool).give_one

    def free_ids(self, pool: Pool) -> None:
        return None  # a release stamps each page

    # Data, run as stream work; what it reads and writes is tagged with stamps taken when it
    # was issued.

    def page_ids(self, block: KVBlockInfo) -> list[int]:
        """The page ids of a live block."""
        base = self._bases[block.device, block.dtype]
        return [base + page for page in block.pages]

    def stamps(self, device: str, ids: Sequence[int]) -> list[int]:
        """The stamps of pages of ``device`` now."""
        return list(map(self.device(device).stamps.__getitem__, ids))

    def write(self, device: str, ids: Sequence[int], stamps: list[int], payload: bytes) -> None:
        data = self.device(device).data
        size = len(payload) // len(ids)
        for i, (page, stamp) in enumerate(zip(ids, stamps, strict=True)):
            data[page] = (stamp, payload[i * size : (i + 1) * size])

    def read(self, block: KVBlockInfo) -> bytes:
        memory, size = self.device(block.device), self._layout.page_bytes(block.dtype)
        poison = self._poisoned(size)
        return b"".join(
            _content(memory.data.get(page), memory.stamps.get(page), poison)
            for page in self.page_ids(block)
        )

    def move(self, copies: Sequence[PageCopies]) -> None:
        """Copy pages; a page its block did not write (by the stamps) stays so."""
        for source_device, target_device, pages in copies:
            source = self.device(source_device).data
            target = self.device(target_device).data
            for src, src_stamp, dst, dst_stamp in pages:
                entry = source.get(src)
                if entry is not None and entry[0] == src_stamp:
                    target[dst] = (dst_stamp, entry[1])
                else:
                    target.pop(dst, None)

    def copies(self, transfers: Sequence[Transfer]) -> list[PageCopies]:
        """The page copies of ``transfers`` with the pages' stamps now, to run later."""
        out = []
        for t in transfers:
            stamps = zip(
                t.sources,
                self.stamps(t.source.device, t.sources),
                t.targets,
                self.stamps(t.target.device, t.targets),
                strict=True,
            )
            out.append(PageCopies(t.source.device, t.target.device, list(stamps)))
        return out

    def stats(self, device: str, blocks: int) -> MemoryStats:
        memory = self.device(device)
        return MemoryStats(
            total_bytes=memory.capacity or 0,
            used_bytes=memory.used,
            peak_used_bytes=memory.peak,
            kv_blocks_in_use=blocks,
            kv_pages_in_use=memory.pages,
        )

    def _poisoned(self, size: int) -> bytes:
        page = self._poison.get(size)
        if page is None:
            page = self._poison.setdefault(size, bytes([POISON]) * size)
        return page


_exhaust: Callable[[Iterable[object]], object] = functools.partial(deque, maxlen=0)


def _content(entry: tuple[int, bytes] | None, stamp: int | None, poison: bytes) -> bytes:
    return entry[1] if entry is not None and entry[0] == stamp else poison
