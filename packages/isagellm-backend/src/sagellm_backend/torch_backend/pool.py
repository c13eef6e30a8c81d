"""The KV page pool: page tensors preallocated once per device, and a free list of page indices.

Each device of a provider (its accelerator devices and ``"host"``) has one tensor of shape
``[num_layers, num_pages, 2, tokens_per_block, num_kv_heads, head_size]``: one page of one
layer is contiguous, K at index 0 and V at index 1, as paged-attention kernels read it. A block
is a tuple of page indices; allocating and freeing only moves indices, never device memory.
A block's handle says where its data is (``device`` and ``pages``), so the pool keeps nothing
per block. When a freed page may be reused is the block table's concern
(:mod:`sagellm_backend.blocks`): the pool gets pages back only once reusing them is safe.

Data moves as one indexed gather and one indexed scatter per (source device, target device)
pair and batch, over every layer at once, never one copy per block.
"""

from __future__ import annotations

import itertools
import operator
from array import array
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from sagellm_backend.blocks import Give, Take
from sagellm_backend.dtypes import DType
from sagellm_backend.errors import InvalidArgumentError, ResourceExhaustedError
from sagellm_backend.kv import KVBlock, KVLayout

__all__ = ["DevicePages", "KVPagePool", "PageMover"]


class DevicePages:
    """One device's page tensor and its free list of pages.

    The free list is a LIFO stack, so hot pages are reused first. It holds one-page tuples,
    ``(index,)``: the ``pages`` of a one-page block are handed out and taken back as they are,
    so the usual batch, one page per block, creates no tuple per block.
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
        self.free: list[tuple[int, ...]] = [(page,) for page in range(num_pages - 1, -1, -1)]
        """The free list; ``free.pop`` and ``free.append`` are the single-block path."""

    @property
    def free_pages(self) -> int:
        return len(self.free)

    def take(self, counts: Sequence[int], total: int) -> list[tuple[int, ...]]:
        """The pages of one block per entry of ``counts`` (each at least 1, ``total`` in all).

        The caller has checked that ``total`` pages are free.
        """
        free = self.free
        taken = free[len(free) - total :]
        del free[len(free) - total :]
        taken.reverse()
        if total == len(counts):
            return taken  # one page per block: the tuples from the free list
        flat = tuple(itertools.chain.from_iterable(taken))
        ends = itertools.accumulate(counts)
        return [flat[end - count : end] for count, end in zip(counts, ends, strict=True)]

    def give_back(self, pages: Sequence[tuple[int, ...]]) -> None:
        """Put the pages of released blocks (each at least one page) back on the free list."""
        if sum(map(len, pages)) == len(pages):
            self.free.extend(pages)
        else:
            # zip over one iterable yields one-tuples: (index,) per page.
            self.free.extend(zip(itertools.chain.from_iterable(pages)))

    def index(self, pages: Sequence[int]) -> torch.Tensor:
        """Page indices as an int64 tensor on this device."""
        host = torch.frombuffer(array("q", pages), dtype=torch.int64) if pages else _NO_PAGES
        return host if self.device.type == "cpu" else host.to(self.device)


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
        nothing, to leave this pair of pools to the reference."""
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

    # BlockStorage.

    def max_pages(self, device: str, dtype: DType) -> int:
        return self.pools[device].num_pages

    def allocate(
        self, device: str, dtypes: Sequence[DType], page_counts: Sequence[int]
    ) -> list[tuple[int, ...]]:
        """Pages for new blocks on ``device``; every dtype is the pool's (the table checks)."""
        pool = self.pools[device]
        total = sum(page_counts)
        if total > pool.free_pages:
            raise ResourceExhaustedError(
                f"{device} is out of KV pages: {total} requested, {pool.free_pages} of "
                f"{pool.num_pages} free",
                hint="free or migrate blocks first, or configure a larger pool "
                "(num_blocks, kv_memory_mb)",
            )
        return pool.take(page_counts, total)

    def release(self, device: str, pages: Sequence[tuple[int, ...]]) -> None:
        self.pools[device].give_back(pages)

    def taker(self, device: str, dtype: DType) -> Take:
        return self.pools[device].free.pop

    def giver(self, device: str) -> Give:
        return self.pools[device].free.append

    # Accounting.

    def pages_in_use(self, device: str) -> int:
        """Pages not on the free list: those of live blocks and those waiting to be reused."""
        pool = self.pools[device]
        return pool.num_pages - pool.free_pages

    # Data movement.

    def move(
        self,
        sources: Sequence[KVBlock],
        destinations: Sequence[KVBlock],
        *,
        non_blocking: bool,
        wait_for_host: Callable[[], None],
    ) -> None:
        """Copy the pages of ``sources[i]`` to ``destinations[i]``: one gather and one scatter
        per (source device, target device) pair, over every layer.

        Runs on the current stream. A device's :class:`PageMover`, where one is plugged in, gets
        each pair of pools first. Between devices the gathered pages cross in one copy, staged
        in pinned memory when ``non_blocking``; a device-to-host move then calls
        ``wait_for_host`` before scattering on the host, which cannot wait on a stream itself.
        """
        if not sources:
            return
        from_devices, to_devices = set(map(_device, sources)), set(map(_device, destinations))
        groups: dict[tuple[str, str], tuple[list[int], list[int]]]
        if len(from_devices) == len(to_devices) == 1:
            route = (from_devices.pop(), to_devices.pop())
            groups = {route: (_flat_pages(sources), _flat_pages(destinations))}
        else:
            groups = {}
            for src, dst in zip(sources, destinations, strict=True):
                src_pages, dst_pages = groups.setdefault((src.device, dst.device), ([], []))
                src_pages.extend(src.pages)
                dst_pages.extend(dst.pages)
        for (src_device, dst_device), (src_pages, dst_pages) in groups.items():
            source, target = self.pools[src_device], self.pools[dst_device]
            if self._mover is not None and self._mover.move_pages(
                source, target, src_pages, dst_pages
            ):
                continue
            src_index = source.index(src_pages)
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
            target.tensor.index_copy_(1, target.index(dst_pages), gathered)

    def write(self, block: KVBlock, data: bytes) -> None:
        """Fill the pages of ``block`` from ``data`` (layer-major, as :meth:`read` returns them)."""
        pool = self.pools[block.device]
        host = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        pages = host.view(pool.tensor.dtype).view(self._block_shape(len(block.pages)))
        pool.tensor.index_copy_(1, pool.index(block.pages), pages.to(pool.device))

    def read(self, block: KVBlock) -> bytes:
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


_device = operator.attrgetter("device")
_pages = operator.attrgetter("pages")
_NO_PAGES = torch.empty(0, dtype=torch.int64)


def _flat_pages(blocks: Sequence[KVBlock]) -> list[int]:
    return list(itertools.chain.from_iterable(map(_pages, blocks)))
