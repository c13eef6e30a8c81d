"""The KV page pool: page tensors preallocated once per device, and a free list of page indices.

Each device of a provider (its accelerator devices and ``"host"``) has one tensor of shape
``[num_layers, num_pages, 2, tokens_per_block, num_kv_heads, head_size]``: one page of one
layer is contiguous, K at index 0 and V at index 1, as paged-attention kernels read it. A block
gets page ids (:mod:`sagellm_backend.blocks`: the page index plus its pool's base); allocating
and freeing only moves ids, never device memory, and the pool keeps nothing per block. When a
freed page may be reused is the block table's concern: the pool gets pages back only once
reusing them is safe.

Data moves as one indexed gather and one indexed scatter per (source device, target device)
pair and batch, over every layer at once, never one copy per block.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from sagellm_backend.blocks import Give, Pages, Pool, Take, Transfer, blocks_of, total_pages
from sagellm_backend.dtypes import DType
from sagellm_backend.errors import InvalidArgumentError, ResourceExhaustedError
from sagellm_backend.kv import KVBlockInfo, KVLayout

__all__ = ["DevicePages", "KVPagePool", "PageMover", "int64s"]


class DevicePages:
    """One device's page tensor and its free list of pages.

    The free list is a LIFO stack, so hot pages are reused first. It holds page ids,
    ``base + index``: a one-page block's pages are its page id, handed out and taken back as it
    is, so the usual batch, one page per block, creates no object per block. ``base`` is set
    once, by the first pool the block table names for this device.
    """

    def __init__(
        self,
        layout: KVLayout,
        num_pages: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        pin: bool,
    ) -> None:
        shape = (
            layout.num_layers,
            num_pages,
            2,
            layout.tokens_per_block,
            layout.num_kv_heads,
            layout.head_size,
        )
        self.device = device
        self.pinned = pin
        self.tensor = torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin)
        self.num_pages = num_pages
        self.base: int | None = None
        self.free: list[int] = []
        """The free list; ``free.pop`` and ``free.append`` are the single-block path."""

    def bind(self, base: int) -> DevicePages:
        """Number this device's page ids from ``base`` (once; the same base again is a no-op)."""
        if self.base is None:
            self.base = base
            self.free = list(range(base + self.num_pages - 1, base - 1, -1))
        elif self.base != base:
            raise InvalidArgumentError(
                f"the pages of {self.device} are numbered from {self.base}, not {base}",
                hint="a torch KV pool holds one dtype per device",
            )
        return self

    @property
    def free_pages(self) -> int:
        """Pages on the free list; every page, before the pages are numbered."""
        return len(self.free) if self.base is not None else self.num_pages

    def take(self, counts: Sequence[int], total: int) -> list[Pages]:
        """The pages of one block per entry of ``counts`` (each at least 1, ``total`` in all).

        The caller has checked that ``total`` pages are free.
        """
        free = self.free
        taken = free[len(free) - total :]
        del free[len(free) - total :]
        taken.reverse()
        return blocks_of(taken, counts)

    def index(self, pages: Sequence[int], *, ids: bool = False) -> torch.Tensor:
        """Page indices (from page ids of this device with ``ids``) as an int64 tensor on it."""
        host = int64s(pages)
        if ids and self.base:
            host = host - self.base
        return host if self.device.type == "cpu" else host.to(self.device)


def int64s(*parts: Sequence[int]) -> torch.Tensor:
    """The values of ``parts``, back to back, as a new int64 tensor on the host, packed by one
    ``struct`` call per part."""
    total = sum(map(len, parts))
    if not total:
        return torch.empty(0, dtype=torch.int64)
    buffer = bytearray(8 * total)
    offset = 0
    for part in parts:
        struct.pack_into(f"{len(part)}q", buffer, offset, *part)
        offset += 8 * len(part)
    return torch.frombuffer(buffer, dtype=torch.int64)


def _exhausted(device: str, wanted: int, pages: DevicePages) -> ResourceExhaustedError:
    return ResourceExhaustedError(
        f"{device} is out of KV pages: {wanted} requested, "
        f"{pages.free_pages} of {pages.num_pages} free",
        hint="free or migrate blocks first, or configure a larger pool (num_blocks, kv_memory_mb)",
    )


class PageMover(Protocol):
    """A device's own batched page copy, used by :meth:`KVPagePool.move` before its reference."""

    def move_pages(
        self,
        source: DevicePages,
        target: DevicePages,
        src_pages: Sequence[int],
        dst_pages: Sequence[int],
    ) -> bool:
        """Queue the copy of page ``src_pages[i]`` of ``source`` to ``dst_pages[i]`` of ``target``
        (every layer) on the current stream and return True, or return False, having done
        nothing, to leave this pair of pools to the reference. Pages are given as page ids: a
        pool's page index plus its ``base``."""
        ...


class KVPagePool:
    """The page pools of one provider, as a :class:`~sagellm_backend.blocks.BlockStorage`."""

    def __init__(
        self, layout: KVLayout, pools: dict[str, DevicePages], mover: PageMover | None = None
    ) -> None:
        if layout.dtype is None:
            raise InvalidArgumentError(
                "a torch KV pool needs a layout with a dtype", hint="set KVLayout(dtype=...)"
            )
        self.layout = layout
        self.dtype: DType = layout.dtype
        self.pools = pools
        self._mover = mover
        self._numbered: dict[int, DevicePages] = {}
        """The pages of each pool the table has numbered, by the pool's number."""

    # BlockStorage.

    def max_pages(self, pool: Pool) -> int:
        return self.pools[pool.device].num_pages

    def allocate(self, requests: Sequence[tuple[Pool, Sequence[int]]]) -> list[list[Pages]]:
        """Page ids for new blocks per ``(pool, page_counts)``, all or none; each dtype is its
        device's (the table checks)."""
        if len(requests) == 1:  # the usual request: one pool
            pool, page_counts = requests[0]
            pages, total = self._pages(pool), total_pages(page_counts)
            if total > len(pages.free):  # the pages are numbered: every free one is listed
                raise _exhausted(pool.device, total, pages)
            return [pages.take(page_counts, total)]
        totals = [total_pages(page_counts) for _, page_counts in requests]
        wanted: dict[str, int] = {}
        for (pool, _), total in zip(requests, totals, strict=True):
            wanted[pool.device] = wanted.get(pool.device, 0) + total
        for pool, _ in requests:
            pages = self._pages(pool)
            if wanted[pool.device] > pages.free_pages:
                raise _exhausted(pool.device, wanted[pool.device], pages)
        return [
            self._pages(pool).take(page_counts, total)
            for (pool, page_counts), total in zip(requests, totals, strict=True)
        ]

    def release(self, pool: Pool, pages: Sequence[int]) -> None:
        self._numbered[pool.number].free.extend(pages)  # pages came from a numbered pool

    def taker(self, pool: Pool) -> Take:
        return self._pages(pool).free.pop

    def giver(self, pool: Pool) -> Give:
        return self._pages(pool).free.append

    def free_ids(self, pool: Pool) -> list[int]:
        return self._pages(pool).free

    def _pages(self, pool: Pool) -> DevicePages:
        try:
            return self._numbered[pool.number]
        except KeyError:
            pages = self._numbered[pool.number] = self.pools[pool.device].bind(pool.base)
            return pages

    # Accounting.

    def pages_in_use(self, device: str) -> int:
        """Pages not on the free list: those of live blocks and those waiting to be reused."""
        pool = self.pools[device]
        return pool.num_pages - pool.free_pages

    # Data movement.

    def move(
        self,
        transfers: Sequence[Transfer],
        *,
        non_blocking: bool,
        wait_for_host: Callable[[], None],
    ) -> None:
        """Copy pages: one gather and one scatter per transfer (a pair of devices), over every
        layer.

        Runs on the current stream. A device's :class:`PageMover`, where one is plugged in, gets
        each pair of pools first. Between devices the gathered pages cross in one copy, staged
        in pinned memory when ``non_blocking``; a device-to-host move then calls
        ``wait_for_host`` before scattering on the host, which cannot wait on a stream itself.
        """
        for transfer in transfers:
            if not transfer.sources:
                continue
            source = self.pools[transfer.source.device]
            target = self.pools[transfer.target.device]
            src_pages, dst_pages = transfer.sources, transfer.targets
            if self._mover is not None and self._mover.move_pages(
                source, target, src_pages, dst_pages
            ):
                continue
            src_index = source.index(src_pages, ids=True)
            if source.pinned and source.device != target.device:
                shape = (source.tensor.shape[0], len(src_pages), *source.tensor.shape[2:])
                staging = torch.empty(shape, dtype=source.tensor.dtype, pin_memory=True)
                gathered = torch.index_select(source.tensor, 1, src_index, out=staging)
            else:
                gathered = source.tensor.index_select(1, src_index)
            if source.device != target.device:
                gathered = gathered.to(target.device, non_blocking=non_blocking)
                if non_blocking and target.device.type == "cpu":
                    wait_for_host()
            target.tensor.index_copy_(1, target.index(dst_pages, ids=True), gathered)

    def write(self, block: KVBlockInfo, data: bytes) -> None:
        """Fill the pages of ``block`` from ``data`` (layer-major, as :meth:`read` returns them)."""
        pool = self.pools[block.device]
        host = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        pages = host.view(pool.tensor.dtype).view(self._block_shape(len(block.pages)))
        pool.tensor.index_copy_(1, pool.index(block.pages), pages.to(pool.device))

    def read(self, block: KVBlockInfo) -> bytes:
        """The pages of ``block`` as bytes: ``[num_layers, pages, 2, tokens, heads, head_size]``."""
        pool = self.pools[block.device]
        pages = pool.tensor.index_select(1, pool.index(block.pages)).cpu()
        out = bytearray(pages.numel() * pages.element_size())
        torch.frombuffer(out, dtype=torch.uint8).copy_(pages.reshape(-1).view(torch.uint8))
        return bytes(out)

    def _block_shape(self, num_pages: int) -> tuple[int, ...]:
        layout = self.layout
        return (
            layout.num_layers,
            num_pages,
            2,
            layout.tokens_per_block,
            layout.num_kv_heads,
            layout.head_size,
        )
