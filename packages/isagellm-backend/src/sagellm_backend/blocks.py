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

The table keeps one entry per live block: the handle it gave out. A storage keeps per-block
state only where the handle does not already say where the data is (the mock's bytes; a page
pool keeps none). Allocating and freeing a million blocks a second is a target, so a batch is
handled as whole lists, with C-level builtins where they beat a loop, and creates as few
objects as it can: the cyclic garbage collector's passes grow with the objects created.

Storage is released at once when a block is freed or migrated away, while device work that
reads it may still be queued. A storage that reuses memory (a page free-list) therefore has the
stream-ordered semantics of the caching allocators: reuse is ordered after work already queued.
"""

from __future__ import annotations

import functools
import operator
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
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
    "BlockStorage",
    "BlockTable",
    "Move",
    "check_block",
    "check_pairs",
]

S = TypeVar("S")
S_co = TypeVar("S_co", covariant=True)

_new_block = functools.partial(tuple.__new__, KVBlock)
"""``KVBlock`` from a tuple of its fields, without the Python-level ``__new__`` of a NamedTuple."""

_handle = operator.attrgetter("handle")


class BlockStorage(Protocol[S_co]):
    """Where block data lives. A BlockTable calls it under its own lock, one call at a time.

    ``S_co`` is the storage's *slot*: what the provider's data operations use to reach a live
    block's data. A storage whose blocks are fully described by their handles (device and
    pages) uses the KVBlock itself as the slot and keeps nothing per block.
    """

    def max_pages(self, device: str, dtype: DType) -> int:
        """The most pages one block of ``dtype`` on ``device`` could ever occupy."""
        ...

    def allocate(
        self,
        device: str,
        dtypes: Sequence[DType],
        page_counts: Sequence[int],
        handles: Sequence[int],
    ) -> list[tuple[int, ...]]:
        """The pages on ``device`` of new blocks, all or none.

        Block ``i`` gets ``page_counts[i]`` pages (at least one) of ``dtypes[i]`` and will have
        the handle ``handles[i]``. If the batch does not fit, raise ResourceExhaustedError
        leaving nothing changed.
        """
        ...

    def release(self, blocks: Sequence[KVBlock]) -> None:
        """Give back the storage of these live blocks. Never fails for blocks it allocated."""
        ...

    def slot(self, block: KVBlock) -> S_co:
        """The slot of a live block."""
        ...


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
        self._live: dict[int, KVBlock] = {}
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
        if not counts:
            return []
        tokens_per_block = self._layout.tokens_per_block
        most = max(counts)
        if most <= tokens_per_block:
            pages = [1] * len(counts)  # the usual batch: every block one page
        else:
            pages = [-(-n // tokens_per_block) for n in counts]
        with self._lock:
            limit = self._storage.max_pages(where, member)
            if min(counts) <= 0 or -(-most // tokens_per_block) > limit:
                for n in counts:
                    self._pages_for(n, limit, where, member)
            handles = range(self._next_handle, self._next_handle + len(counts))
            taken = self._storage.allocate(where, [member] * len(counts), pages, handles)
            self._next_handle = handles.stop
            fields = zip(handles, counts, repeat(member), repeat(where), taken, repeat(self._owner))
            blocks = list(map(_new_block, fields))
            self._live.update(zip(handles, blocks, strict=True))
        return blocks

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Free every block, all or none; a stale, foreign or repeated block is refused."""
        items = _block_list(blocks, "blocks")
        with self._lock:
            handles, entries = self._lookup_distinct(items, "kv_blocks_free")
            self._storage.release(entries)
            live = self._live
            for handle in handles:
                del live[handle]

    def migrate(self, blocks: Iterable[KVBlock], target: object) -> list[Move[S]]:
        """Give every block a replacement on ``target`` and retire the sources, all or none.

        The caller moves the data (``src_slot`` to ``dst_slot``); the sources are no longer live.
        """
        where = self.check_device(target)
        items = _block_list(blocks, "blocks")
        with self._lock:
            handles, sources = self._lookup_distinct(items, "kv_blocks_migrate")
            for block in sources:
                if block.device == where:
                    raise InvalidArgumentError(
                        f"KV block {block.handle} is already on {where}",
                        hint="migrate it to another device, or keep using it where it is",
                    )
            storage = self._storage
            new_handles = range(self._next_handle, self._next_handle + len(sources))
            taken = storage.allocate(
                where,
                [block.dtype for block in sources],
                [block.num_pages for block in sources],
                new_handles,
            )
            self._next_handle = new_handles.stop
            replacements = [
                KVBlock(handle, old.num_tokens, old.dtype, where, pages, old.owner)
                for handle, old, pages in zip(new_handles, sources, taken, strict=True)
            ]
            moves = [
                Move(old, storage.slot(old), new, storage.slot(new))
                for old, new in zip(sources, replacements, strict=True)
            ]
            storage.release(sources)
            for handle in handles:
                del self._live[handle]
            self._live.update(zip(new_handles, replacements, strict=True))
        return moves

    def release_all(self) -> None:
        """Free every live block (when the provider closes)."""
        with self._lock:
            self._storage.release(list(self._live.values()))
            self._live.clear()

    # Lookup.

    def slot(self, block: KVBlock) -> S:
        """The storage slot of a live block of this table."""
        with self._lock:
            return self._storage.slot(self._lookup(block))

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
                src_block, dst_block = self._lookup(src), self._lookup(dst)
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
                slots.append((self._storage.slot(src_block), self._storage.slot(dst_block)))
        return slots

    def live_blocks(self, device: str | None = None) -> list[KVBlock]:
        """Live blocks (on ``device`` if given), oldest first."""
        with self._lock:
            return [b for b in self._live.values() if device is None or b.device == device]

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

    def _lookup(self, block: KVBlock) -> KVBlock:
        """The live block of ``block``'s handle, after every check."""
        if block.owner != self._owner:
            raise InvalidBlockError(
                f"KV block {block.handle} belongs to another provider ({block.owner or 'none'})",
                hint="pass a block to the provider that allocated it; move KV between "
                "processes with send and recv",
            )
        live = self._live.get(block.handle)
        if live is None:
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
        if live is not block and live != block:
            raise InvalidBlockError(
                f"KV block {block.handle} does not match the live block of that handle",
                hint="use handles exactly as the provider returned them",
            )
        return live

    def _lookup_distinct(
        self, blocks: list[KVBlock], operation: str
    ) -> tuple[list[int], list[KVBlock]]:
        """The handles and the live blocks of ``blocks``, each of which must be named once."""
        handles = list(map(_handle, blocks))
        # The handle objects this table gave out are live and ours: one identity test each.
        # Anything else (a copy that came through pickle, a stale or forged handle) takes the
        # full check.
        if all(map(operator.is_, map(self._live.get, handles), blocks)):
            entries = blocks
        else:
            entries = [self._lookup(block) for block in blocks]
        if len(set(handles)) != len(handles):
            seen: set[int] = set()
            for handle in handles:
                if handle in seen:
                    raise InvalidArgumentError(
                        f"{operation} names KV block {handle} more than once",
                        hint="pass each block once per batch",
                    )
                seen.add(handle)
        return handles, entries


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
