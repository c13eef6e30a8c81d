"""KV block bookkeeping shared by every backend: live handles, validation, all-or-nothing batches.

A :class:`BlockTable` decides *whether* an operation on KV blocks is valid and keeps the table of
live handles; a :class:`BlockStorage` decides *where* the data lives. The mock's storage gives each
block its own ``bytearray``; a torch pool hands out pages of a preallocated tensor. Both get the
same checks and the same errors:

- ``num_tokens`` that is not an int, not positive, or more than the storage could ever hold:
  InvalidArgumentError; a dtype string that is unknown: InvalidArgumentError; a dtype outside
  the capability: CapabilityError.
- A block that was freed or migrated away (double free, use after free): BlockNotFoundError.
  Handles are never reused, so a stale handle can always be told apart from a live one.
- A block of another provider (or a forged handle): InvalidBlockError ``foreign_block``; a copy
  between blocks of different page counts or dtypes: InvalidBlockError ``kv_block_mismatch``.
- A batch naming a block twice: InvalidArgumentError.

Every batch is validated in full before the storage is touched, and the storage allocates a
whole batch or nothing, so a failed call leaves the table and the storage as they were.

Storage is released at once when a block is freed or migrated away, while device work that
reads it may still be queued. A storage that reuses memory (a page free-list) therefore has the
stream-ordered semantics of the caching allocators: reuse is ordered after work already queued.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, cast

from sagellm_backend.capability import CapabilityDescriptor
from sagellm_backend.device import DeviceRef
from sagellm_backend.dtypes import DType, coerce
from sagellm_backend.errors import (
    BlockNotFoundError,
    ErrorCode,
    InvalidArgumentError,
    InvalidBlockError,
)
from sagellm_backend.kv import KVBlock, KVLayout

__all__ = [
    "Allocation",
    "BlockStorage",
    "BlockTable",
    "Move",
    "PageRequest",
    "check_block",
    "check_pairs",
]

S = TypeVar("S")

_new_block = functools.partial(tuple.__new__, KVBlock)
"""``KVBlock`` built without its Python-level ``__new__``: a third of the cost of a batch."""


PageRequest = tuple[str, DType, int]
"""Storage for one block: ``(device, dtype, num_pages)``. Plain tuples keep batches cheap."""

Allocation = tuple[tuple[int, ...], S]
"""What a storage hands back for one request: ``(page indices, slot)``; pages may be empty."""


class BlockStorage(Protocol[S]):
    """Where block data lives. A BlockTable calls it under its own lock, one call at a time."""

    def max_pages(self, device: str, dtype: DType) -> int:
        """The most pages one block of ``dtype`` on ``device`` could ever occupy."""
        ...

    def allocate(self, requests: Sequence[PageRequest]) -> list[Allocation[S]]:
        """Allocate every request or none; raise ResourceExhaustedError leaving nothing changed."""
        ...

    def release(self, slots: Sequence[S]) -> None:
        """Give the storage of these slots back. Never fails for slots it handed out."""


@dataclass(frozen=True)
class Move(Generic[S]):
    """One block of a migration: the retired source and its replacement on the target."""

    src: KVBlock
    src_slot: S
    dst: KVBlock
    dst_slot: S


class BlockTable(Generic[S]):
    """Thread-safe table of the live KV blocks of one provider.

    ``devices`` lists where blocks may live (the provider's devices and usually ``"host"``);
    ``owner`` is stamped into every handle and must be unique across providers and processes.
    """

    def __init__(
        self,
        storage: BlockStorage[S],
        *,
        layout: KVLayout,
        capability: CapabilityDescriptor,
        devices: Sequence[str],
        default_device: str,
        owner: str,
    ) -> None:
        if default_device not in devices:
            raise InvalidArgumentError(
                f"default device {default_device!r} is not among the devices {list(devices)}"
            )
        self._storage = storage
        self._layout = layout
        self._capability = capability
        self._devices = tuple(devices)
        self._default_device = default_device
        self._owner = owner
        self._lock = threading.Lock()
        self._live: dict[int, tuple[KVBlock, S]] = {}
        self._next_handle = 1

    @property
    def owner(self) -> str:
        return self._owner

    @property
    def layout(self) -> KVLayout:
        return self._layout

    @property
    def devices(self) -> tuple[str, ...]:
        return self._devices

    # Validation that needs no lock.

    def check_dtype(self, dtype: object, operation: str = "kv_block_alloc") -> DType:
        """``dtype`` as a DType the capability supports (enum member or its string value)."""
        return self._capability.require_dtype(coerce(DType, dtype, "dtype"), operation)

    def check_device(self, target: object) -> str:
        """``target`` as one of this table's devices; a malformed or unknown name is refused."""
        name = str(DeviceRef.parse(target))
        if name not in self._devices:
            raise InvalidArgumentError(
                f"unknown device {name!r}",
                hint=f"use one of {', '.join(self._devices)}",
            )
        return name

    # Allocation and release.

    def alloc(
        self, num_tokens: Sequence[int], dtype: object, *, device: str | None = None
    ) -> list[KVBlock]:
        """Allocate one block per entry of ``num_tokens``, all or none."""
        member = self.check_dtype(dtype)
        where = self._default_device if device is None else self.check_device(device)
        counts = _int_sequence(num_tokens, "num_tokens")
        tokens_per_block = self._layout.tokens_per_block
        pages = [-(-n // tokens_per_block) for n in counts]
        with self._lock:
            if pages:
                limit = self._storage.max_pages(where, member)
                if min(counts) <= 0 or max(pages) > limit:
                    for n in counts:
                        self._pages_for(n, limit, where, member)
            allocations = self._storage.allocate([(where, member, p) for p in pages])
            handles = range(self._next_handle, self._next_handle + len(counts))
            self._next_handle = handles.stop
            owner = self._owner
            blocks = [
                _new_block((handle, n, member, where, allocation[0], owner))
                for handle, n, allocation in zip(handles, counts, allocations, strict=True)
            ]
            self._live.update(
                zip(handles, zip(blocks, [a[1] for a in allocations], strict=True), strict=True)
            )
        return blocks

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Free every block, all or none; a stale, foreign or repeated block is refused."""
        items = _block_list(blocks, "blocks")
        with self._lock:
            entries = self._lookup_distinct(items, "kv_blocks_free")
            self._storage.release([slot for _, slot in entries])
            for block, _ in entries:
                del self._live[block.handle]

    def migrate(self, blocks: Iterable[KVBlock], target: object) -> list[Move[S]]:
        """Give every block a replacement on ``target`` and retire the sources, all or none.

        The caller moves the data (``src_slot`` to ``dst_slot``); the sources are no longer live.
        """
        where = self.check_device(target)
        items = _block_list(blocks, "blocks")
        with self._lock:
            entries = self._lookup_distinct(items, "kv_blocks_migrate")
            for block, _ in entries:
                if block.device == where:
                    raise InvalidArgumentError(
                        f"KV block {block.handle} is already on {where}",
                        hint="migrate it to another device, or keep using it where it is",
                    )
            requests = [
                (where, block.dtype, self._layout.pages_for(block.num_tokens))
                for block, _ in entries
            ]
            allocations = self._storage.allocate(requests)
            self._storage.release([slot for _, slot in entries])
            moves = []
            for (old, old_slot), (pages, slot) in zip(entries, allocations, strict=True):
                new = KVBlock(self._next_handle, old.num_tokens, old.dtype, where, pages, old.owner)
                self._next_handle += 1
                del self._live[old.handle]
                self._live[new.handle] = (new, slot)
                moves.append(Move(old, old_slot, new, slot))
        return moves

    def release_all(self) -> None:
        """Free every live block (when the provider closes)."""
        with self._lock:
            self._storage.release([slot for _, slot in self._live.values()])
            self._live.clear()

    # Lookup.

    def slot(self, block: KVBlock) -> S:
        """The storage slot of a live block of this table."""
        with self._lock:
            return self._lookup(block)[1]

    def copy_pairs(self, pairs: Iterable[tuple[KVBlock, KVBlock]]) -> list[tuple[S, S]]:
        """Validate (src, dst) pairs for a copy and return their slots.

        Each pair must match in page count and dtype. A block may be the source of several pairs,
        but a destination may appear only once and never also as a source, so the result does
        not depend on the order the copies run in.
        """
        items = check_pairs(pairs)
        with self._lock:
            slots = []
            sources = {src.handle for src, _ in items}
            destinations: set[int] = set()
            for src, dst in items:
                (_, src_slot), (_, dst_slot) = self._lookup(src), self._lookup(dst)
                if dst.handle in destinations or dst.handle in sources:
                    raise InvalidArgumentError(
                        f"KV block {dst.handle} is written more than once, or both read and "
                        "written, in one copy",
                        hint="split the copy into batches whose destinations are distinct",
                    )
                destinations.add(dst.handle)
                src_pages = self._layout.pages_for(src.num_tokens)
                dst_pages = self._layout.pages_for(dst.num_tokens)
                if src_pages != dst_pages or src.dtype != dst.dtype:
                    raise InvalidBlockError(
                        f"cannot copy KV block {src.handle} ({src_pages} pages, "
                        f"{src.dtype.value}) into block {dst.handle} ({dst_pages} pages, "
                        f"{dst.dtype.value})",
                        hint="copy between blocks of the same page count and dtype",
                        code=ErrorCode.KV_BLOCK_MISMATCH,
                    )
                slots.append((src_slot, dst_slot))
        return slots

    def live_blocks(self, device: str | None = None) -> list[KVBlock]:
        """Live blocks (on ``device`` if given), oldest first."""
        with self._lock:
            return [b for b, _ in self._live.values() if device is None or b.device == device]

    def _pages_for(self, num_tokens: int, limit: int, device: str, dtype: DType) -> int:
        if num_tokens <= 0:
            raise InvalidArgumentError(
                f"num_tokens must be positive, got {num_tokens}",
                hint="allocate a block for at least one token",
            )
        pages = self._layout.pages_for(num_tokens)
        if pages > limit:
            raise InvalidArgumentError(
                f"a block of {num_tokens} tokens needs {pages} pages, more than {device} could "
                f"ever hold in {dtype.value} ({limit} pages, "
                f"{limit * self._layout.tokens_per_block} tokens)",
                hint="allocate several smaller blocks, or configure more memory",
            )
        return pages

    def _lookup(self, block: KVBlock) -> tuple[KVBlock, S]:
        if block.owner != self._owner:
            raise InvalidBlockError(
                f"KV block {block.handle} belongs to another provider ({block.owner or 'none'})",
                hint="pass a block to the provider that allocated it; move KV between "
                "processes with send and recv",
            )
        entry = self._live.get(block.handle)
        if entry is None:
            if 0 < block.handle < self._next_handle:
                raise BlockNotFoundError(
                    f"KV block {block.handle} was already freed or migrated away",
                    hint="drop the handle after kv_block_free; after a migrate, use the "
                    "handle it returned",
                )
            raise InvalidBlockError(
                f"KV block {block.handle} was never allocated by this provider",
                hint="use handles returned by kv_block_alloc",
            )
        if entry[0] is not block and entry[0] != block:
            raise InvalidBlockError(
                f"KV block {block.handle} does not match the live block of that handle",
                hint="use handles exactly as the provider returned them",
            )
        return entry

    def _lookup_distinct(
        self, blocks: Sequence[KVBlock], operation: str
    ) -> list[tuple[KVBlock, S]]:
        live = self._live
        entries = []
        for block in blocks:
            entry = live.get(block.handle)
            # The handle object this table gave out is live and ours; anything else (a copy
            # that came through pickle, a stale or forged handle) takes the full check.
            entries.append(
                entry if entry is not None and entry[0] is block else self._lookup(block)
            )
        if len({block.handle for block in blocks}) != len(blocks):
            seen: set[int] = set()
            for block in blocks:
                if block.handle in seen:
                    raise InvalidArgumentError(
                        f"{operation} names KV block {block.handle} more than once",
                        hint="pass each block once per batch",
                    )
                seen.add(block.handle)
        return entries


def check_block(value: object, what: str = "block") -> KVBlock:
    """``value`` if it is a KVBlock, else InvalidArgumentError."""
    if not isinstance(value, KVBlock):
        raise InvalidArgumentError(
            f"{what} must be a KVBlock, got {type(value).__name__}",
            hint="pass a handle returned by kv_block_alloc",
        )
    return value


def _block_list(blocks: Iterable[KVBlock], what: str) -> list[KVBlock]:
    if isinstance(blocks, KVBlock):
        raise InvalidArgumentError(
            f"{what} must be an iterable of KVBlock, got one KVBlock",
            hint="wrap a single block in a list, or use the single-block call",
        )
    items = _iterable(blocks, what)
    for item in items:
        if type(item) is not KVBlock:
            check_block(item, f"each of {what}")
    return cast("list[KVBlock]", items)


def check_pairs(pairs: Iterable[tuple[KVBlock, KVBlock]]) -> list[tuple[KVBlock, KVBlock]]:
    """``pairs`` as a list of (src, dst) KVBlock tuples, else InvalidArgumentError."""
    out = []
    for pair in _iterable(pairs, "pairs"):
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise InvalidArgumentError(
                f"each copy must be a (src, dst) tuple of KVBlock, got {pair!r}"
            )
        out.append((check_block(pair[0], "src"), check_block(pair[1], "dst")))
    return out


def _int_sequence(values: Sequence[int], what: str) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InvalidArgumentError(
            f"{what} must be a sequence of ints, got {type(values).__name__}",
            hint="pass a list such as [128, 64]",
        )
    out = list(values)
    for value in out:
        if type(value) is not int and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidArgumentError(
                f"{what} must be an int, got {value!r}", hint="pass a token count such as 128"
            )
    return out


def _iterable(values: object, what: str) -> list[object]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InvalidArgumentError(
            f"{what} must be an iterable, got {type(values).__name__}",
            hint="pass a list",
        )
    return list(values)
