"""KV block bookkeeping shared by every backend: live handles, validation, all-or-nothing
batches, growth, and stream-ordered reuse of pages.

A :class:`BlockTable` decides *whether* an operation on KV blocks is valid and keeps the table of
live handles; a :class:`BlockStorage` decides *which pages* a block gets (a torch pool's free
list of preallocated pages; the mock's budgeted page ids). A handle says where its data is
(``device`` and ``pages``), so the table keeps nothing per block but the handle it gave out.
Both backends get the same checks and the same errors:

- ``num_tokens`` that is not an int, not positive, or more than the storage could ever hold:
  InvalidArgumentError; a dtype string that is unknown: InvalidArgumentError; a dtype the
  backend's KV blocks do not hold: CapabilityError.
- A block that was freed, migrated away or grown (double free, use after free, a handle
  replaced by the one ``grow`` returned): BlockNotFoundError. Handles are never reused, so a
  stale handle can always be told apart from a live one.
- A block of another provider (or a forged handle): InvalidBlockError ``foreign_block``; a copy
  between blocks of different page counts or dtypes: InvalidBlockError ``kv_block_mismatch``.
- A batch naming a block twice: InvalidArgumentError. Growing a block to fewer tokens than it
  holds: InvalidArgumentError.
- Any call after :meth:`BlockTable.close`: BackendUnavailableError.

Every batch is validated in full before anything changes, and the storage allocates a whole
batch or nothing, so a failed call leaves the table and the storage as they were.

**Stream-ordered reuse.** A freed page may still be read or written by device work queued
before the free. The table orders its reuse after that work:

- the provider issues its data operations (writes, copies, migrations) inside the table's lock
  (the ``issue`` callbacks), so no page can be freed and handed out again between the check of
  an operation and the queueing of its work;
- work queued on the calling thread's current stream needs nothing more: whatever later writes
  a reused page from that stream runs after it (and on the CPU work runs when it is issued);
- work on another stream (``stream=``) is *in flight* until its event is reached. Pages freed
  while any such work is in flight, the sources of a migration on another stream, and pages
  freed with ``after=`` (work an engine queued itself on the cache tensors) wait in a
  pending-release list. They return to the storage once their events are reached: polled on
  allocation (oldest first), and waited for only when the storage would otherwise be short.
  Only pages with work pending on another stream are tracked: the common path records no
  event and keeps no per-block state;
- :meth:`BlockTable.close` waits for every event it still holds before it releases the pages.

**Speed.** An engine allocates and frees blocks from Python while the device runs the previous
step, so host time per block matters. One-page blocks of the default device have a real
single-block path (one dict lookup checks the dtype, one lock, one list pop or append in the
storage, one dict entry per live block); a batch is handled as whole lists with C-level
builtins, validated by one identity test per block for the handles this table gave out (a copy
that came through pickle, a forged or stale handle takes the full check).
"""

from __future__ import annotations

import functools
import operator
import threading
from collections import deque
from collections.abc import Callable, Container, Iterable, Sequence
from itertools import repeat
from typing import Protocol, TypeVar, cast

from sagellm_backend.device import DeviceRef
from sagellm_backend.dtypes import DType, coerce
from sagellm_backend.errors import (
    BackendUnavailableError,
    BlockNotFoundError,
    CapabilityError,
    ErrorCode,
    InvalidArgumentError,
    InvalidBlockError,
    ResourceExhaustedError,
)
from sagellm_backend.kv import KVBlock, KVLayout

__all__ = [
    "BlockStorage",
    "BlockTable",
    "Fence",
    "Give",
    "Issue",
    "Take",
    "check_block",
]

R = TypeVar("R")


class Fence(Protocol):
    """The part of an event the table uses: whether device work is done, and waiting for it."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


Pages = tuple[int, ...]
Take = Callable[[], Pages]
"""Takes the page of a new one-page block: ``(index,)``; IndexError when none is free."""
Give = Callable[[Pages], None]
"""Gives back the pages of one released block."""
Issue = Callable[[list[KVBlock], list[KVBlock]], Fence | None]
"""Queues the data movement of ``sources[i]`` to ``destinations[i]``. Returns None when the work
went to the calling thread's current stream, else the event recorded after it on the other
stream."""

_tuple_new = tuple.__new__
"""``_tuple_new(KVBlock, fields)`` makes a ``KVBlock`` from a tuple of its fields without the
Python-level ``__new__`` of a NamedTuple; ``map(_tuple_new, repeat(KVBlock), rows)`` makes many."""


def _new_blocks(rows: Iterable[tuple[object, ...]]) -> list[KVBlock]:
    """``KVBlock``s from tuples of their fields, in one C-level pass."""
    return cast("list[KVBlock]", list(map(_tuple_new, repeat(KVBlock), rows)))


_handle = operator.attrgetter("handle")
_pages = operator.attrgetter("pages")
_device = operator.attrgetter("device")
_dtype = operator.attrgetter("dtype")
_num_tokens = operator.attrgetter("num_tokens")
_exhaust: Callable[[Iterable[object]], object] = functools.partial(deque, maxlen=0)
"""Runs an iterator to its end, keeping nothing."""
_first = operator.itemgetter(0)
_second = operator.itemgetter(1)


class BlockStorage(Protocol):
    """Which pages a block gets. A BlockTable calls it under its own lock, one call at a time."""

    def max_pages(self, device: str, dtype: DType) -> int:
        """The most pages one block of ``dtype`` on ``device`` could ever occupy."""
        ...

    def allocate(
        self, device: str, dtypes: Sequence[DType], page_counts: Sequence[int]
    ) -> list[Pages]:
        """The pages on ``device`` of new blocks, all or none.

        Block ``i`` gets ``page_counts[i]`` pages (at least one) of ``dtypes[i]``. If the batch
        does not fit, raise ResourceExhaustedError leaving nothing changed.
        """
        ...

    def release(self, device: str, pages: Sequence[Pages]) -> None:
        """Give back the pages of released blocks of ``device``. Never fails for pages it gave."""
        ...

    def taker(self, device: str, dtype: DType) -> Take | None:
        """The single-block path's allocation of one-page blocks of ``dtype`` on ``device``."""
        ...

    def giver(self, device: str) -> Give | None:
        """The single-block path's release of one-page blocks of ``device``."""
        ...


_Pending = tuple[list[Fence], list[tuple[str, list[Pages]]]]
"""Pages waiting for events: (events, [(device, pages of each block)])."""


class BlockTable:
    """Thread-safe table of the live KV blocks of one provider.

    ``devices`` holds the device names blocks may live on (the provider's devices and usually
    ``"host"``; any container, so a large set need not be listed) and ``devices_hint`` names
    them for an error's hint; ``dtypes`` are the dtypes KV blocks may have, and ``dtype_hint``
    (where ``{dtype}`` stands for the dtype asked for) says how to get another. ``owner`` is
    stamped into every handle and must be unique across providers and processes.
    """

    def __init__(
        self,
        storage: BlockStorage,
        *,
        layout: KVLayout,
        dtypes: Sequence[DType],
        devices: Container[str],
        default_device: str,
        owner: str,
        devices_hint: str,
        dtype_hint: str | None = None,
    ) -> None:
        if default_device not in devices:
            raise InvalidArgumentError(
                f"default device {default_device!r} is not among the table's devices",
                hint="pass a default device that is one of the devices",
            )
        self._storage = storage
        self._layout = layout
        self._dtypes = tuple(dtypes)
        self._devices = devices
        self._devices_hint = devices_hint
        self._dtype_hint = dtype_hint or f"use one of {', '.join(d.value for d in self._dtypes)}"
        self._default_device = default_device
        self._owner = owner
        self._lock = threading.Lock()
        self._live: dict[int, KVBlock] = {}
        self._next_handle = 1
        self._tokens_per_page = layout.tokens_per_block
        self._one_page: dict[object, tuple[DType, Take]] = {}
        for dtype in self._dtypes:
            take = storage.taker(default_device, dtype)
            if take is not None:
                self._one_page[dtype] = (dtype, take)
        self._give: dict[str, Give] = {}
        self._add_giver(default_device)
        self._in_flight: list[Fence] = []
        self._pending: deque[_Pending] = deque()
        self._closed: str | None = None

    @property
    def owner(self) -> str:
        return self._owner

    @property
    def layout(self) -> KVLayout:
        return self._layout

    # Validation that needs no lock.

    def check_dtype(self, dtype: object, operation: str = "kv_block_alloc") -> DType:
        """``dtype`` as a DType that KV blocks may have (enum member or its string value)."""
        member = coerce(DType, dtype, "dtype")
        if member not in self._dtypes:
            raise CapabilityError(
                f"{operation} needs KV blocks of {member.value}, which this backend does not hold",
                hint=self._dtype_hint.format(dtype=member.value),
            )
        return member

    def check_device(self, target: object) -> str:
        """``target`` as one of this table's devices; a malformed or unknown name is refused."""
        name = str(DeviceRef.parse(target))
        if name != target:
            raise InvalidArgumentError(
                f"malformed device {target!r}",
                hint="write a device as 'kind' or 'kind:N' with nothing around it, such as "
                "'host' or 'cuda:0'",
            )
        if name not in self._devices:
            raise InvalidArgumentError(f"unknown device {name!r}", hint=self._devices_hint)
        return name

    # Allocation, release and growth.

    def alloc_one(self, num_tokens: int, dtype: object) -> KVBlock:
        """One block on the default device; one-page blocks take the single-block path."""
        try:
            member, take = self._one_page[dtype]
        except (KeyError, TypeError):
            return self.alloc([num_tokens], dtype)[0]
        if (
            type(num_tokens) is not int
            or not 0 < num_tokens <= self._tokens_per_page
            or self._pending
        ):
            return self.alloc([num_tokens], member)[0]
        lock = self._lock
        lock.acquire()
        try:
            if self._closed is None:
                pages = take()
                handle = self._next_handle
                self._next_handle = handle + 1
                block: KVBlock = _tuple_new(
                    KVBlock, (handle, num_tokens, member, self._default_device, pages, self._owner)
                )
                self._live[handle] = block
                return block
        except IndexError:
            pass  # none free: the batch path waits for pending pages or says it is exhausted
        finally:
            lock.release()
        return self.alloc([num_tokens], member)[0]

    def alloc(
        self, num_tokens: Sequence[int], dtype: object, *, device: str | None = None
    ) -> list[KVBlock]:
        """Allocate one block per entry of ``num_tokens``, all or none."""
        member = self.check_dtype(dtype)
        where = self._default_device if device is None else self.check_device(device)
        counts = _int_list(num_tokens, "num_tokens")
        with self._lock:
            self._check_open()
            if not counts:
                return []
            tokens_per_page = self._tokens_per_page
            smallest, most = min(counts), max(counts)
            limit = self._storage.max_pages(where, member)
            if smallest <= 0 or -(-most // tokens_per_page) > limit:
                for n in counts:
                    self._pages_for(n, limit, where, member)
            if most <= tokens_per_page:
                pages = [1] * len(counts)  # the usual batch: every block one page
            else:
                pages = [-(-n // tokens_per_page) for n in counts]
            taken = self._take(where, [member] * len(counts), pages)
            handles = range(self._next_handle, self._next_handle + len(counts))
            self._next_handle = handles.stop
            fields = zip(handles, counts, repeat(member), repeat(where), taken, repeat(self._owner))
            blocks = _new_blocks(fields)
            self._live.update(zip(handles, blocks, strict=True))
        return blocks

    def free_one(self, block: KVBlock, after: Fence | None = None) -> None:
        """Free one block; a live one-page block of this table takes the single-block path."""
        if after is None and not self._in_flight:
            lock = self._lock
            lock.acquire()
            try:
                live = self._live
                try:
                    handle = block.handle
                    mine = live.get(handle) is block
                except Exception:  # not a KVBlock: the full check below says what is wrong
                    mine = False
                if mine:
                    pages = block.pages
                    give = self._give.get(block.device)
                    if give is not None and len(pages) == 1:
                        del live[handle]
                        give(pages)
                        return
            finally:
                lock.release()
        self.free([check_block(block)], after)

    def free(self, blocks: Iterable[KVBlock], after: Fence | None = None) -> None:
        """Free every block, all or none; a stale, foreign or repeated block is refused.

        With ``after``, the pages are reused only once that event is reached.
        """
        items = _block_list(blocks, "blocks")
        with self._lock:
            self._check_open()
            _exhaust(map(self._live.__delitem__, self._distinct(items, "kv_blocks_free")))
            self._release(items, [] if after is None else [after])

    def grow(self, blocks: Sequence[KVBlock], num_tokens: Sequence[int]) -> list[KVBlock]:
        """Each block grown to ``num_tokens[i]`` tokens by appending pages, all or none.

        A grown block keeps its handle number and its pages; the handle passed in is refused
        from then on (a block whose count does not change is returned as it is).
        """
        items = _block_list(blocks, "blocks")
        counts = _int_list(num_tokens, "num_tokens")
        if len(counts) != len(items):
            raise InvalidArgumentError(
                f"kv_blocks_grow got {len(items)} blocks and {len(counts)} token counts",
                hint="pass one token count per block",
            )
        with self._lock:
            self._check_open()
            self._distinct(items, "kv_blocks_grow")
            live = list(map(self._live.__getitem__, map(_handle, items)))
            extra: dict[str, tuple[list[DType], list[int]]] = {}
            for block, n in zip(live, counts, strict=True):
                if n < block.num_tokens:
                    raise InvalidArgumentError(
                        f"KV block {block.handle} holds {block.num_tokens} tokens; it cannot "
                        f"grow to {n}",
                        hint="grow to at least the current count; to shrink, allocate a new "
                        "block and free this one",
                    )
                limit = self._storage.max_pages(block.device, block.dtype)
                more = self._pages_for(n, limit, block.device, block.dtype) - block.num_pages
                if more > 0:
                    dtypes, page_counts = extra.setdefault(block.device, ([], []))
                    dtypes.append(block.dtype)
                    page_counts.append(more)
            taken: dict[str, list[Pages]] = {}
            try:
                for device, (dtypes, page_counts) in extra.items():
                    taken[device] = self._take(device, dtypes, page_counts)
            except BaseException:
                for device, given in taken.items():
                    self._storage.release(device, given)
                raise
            appended = {key: iter(given) for key, given in taken.items()}
            grown = []
            for block, n in zip(live, counts, strict=True):
                if n == block.num_tokens:
                    grown.append(block)
                    continue
                pages = block.pages
                if self._layout.pages_for(n) > len(pages):
                    pages = pages + next(appended[block.device])
                new = KVBlock(block.handle, n, block.dtype, block.device, pages, block.owner)
                self._live[block.handle] = new
                grown.append(new)
        return grown

    def close(self, message: str) -> None:
        """Refuse every later call with ``message``; wait for the events the table still holds
        and release every page. Idempotent."""
        with self._lock:
            if self._closed is not None:
                return
            self._closed = message
            self._one_page.clear()
            events = self._in_flight + [e for entry in self._pending for e in entry[0]]
            for event in {id(e): e for e in events}.values():
                event.synchronize()
            self._in_flight.clear()
            for _, groups in self._pending:
                for device, pages in groups:
                    self._storage.release(device, pages)
            self._pending.clear()
            blocks = list(self._live.values())
            self._live.clear()
            self._release(blocks, [])

    # Data operations, issued under the lock.

    def copy(self, pairs: Iterable[tuple[KVBlock, KVBlock]], issue: Issue) -> None:
        """Validate (src, dst) pairs and queue their copy with ``issue``.

        Each pair must match in page count and dtype. A block may be the source of several pairs,
        but a destination may appear only once and never also as a source, so the result does
        not depend on the order the copies run in.
        """
        items = _pair_list(pairs)
        with self._lock:
            self._check_open()
            srcs, dsts = self._check_copy(items)
            self._track(issue(srcs, dsts))

    def migrate(self, blocks: Iterable[KVBlock], target: object, issue: Issue) -> list[KVBlock]:
        """Give every block a replacement on ``target``, queue the data movement with ``issue``
        and retire the sources, all or none. Returns the replacements."""
        where = self.check_device(target)
        items = _block_list(blocks, "blocks")
        with self._lock:
            self._check_open()
            if not items:
                self._track(issue([], []))
                return []
            handles = self._distinct(items, "kv_blocks_migrate")
            if where in set(map(_device, items)):
                block = next(b for b in items if b.device == where)
                raise InvalidArgumentError(
                    f"KV block {block.handle} is already on {where}",
                    hint="migrate it to another device, or keep using it where it is",
                )
            taken = self._take(where, list(map(_dtype, items)), list(map(len, map(_pages, items))))
            start = self._next_handle
            new_handles = range(start, start + len(items))
            fields = zip(
                new_handles,
                map(_num_tokens, items),
                map(_dtype, items),
                repeat(where),
                taken,
                repeat(self._owner),
            )
            replacements = _new_blocks(fields)
            try:
                event = issue(items, replacements)
            except BaseException:
                self._storage.release(where, taken)
                raise
            self._next_handle = new_handles.stop
            _exhaust(map(self._live.__delitem__, handles))
            self._live.update(zip(new_handles, replacements, strict=True))
            self._release(items, [] if event is None else [event])
            self._track(event)
        return replacements

    def use(self, block: KVBlock, work: Callable[[KVBlock], R]) -> R:
        """``work(block)`` for a live block of this table, under the lock (writes and reads)."""
        check_block(block)
        with self._lock:
            self._check_open()
            return work(self._lookup(block))

    # Lookup.

    def lookup(self, block: KVBlock) -> KVBlock:
        """The live block of ``block``'s handle, after every check."""
        check_block(block)
        with self._lock:
            self._check_open()
            return self._lookup(block)

    def lookup_all(self, blocks: Iterable[KVBlock]) -> list[KVBlock]:
        """The live blocks of ``blocks`` (repeats allowed), after every check."""
        items = _block_list(blocks, "blocks")
        with self._lock:
            self._check_open()
            try:
                if all(map(operator.is_, map(self._live.get, map(_handle, items)), items)):
                    return items
            except TypeError:  # an unhashable handle: the full check refuses it
                pass
            return [self._lookup(block) for block in items]

    def live_blocks(self, device: str | None = None) -> list[KVBlock]:
        """Live blocks (on ``device`` if given), oldest handle first."""
        with self._lock:
            self._check_open()
            blocks = sorted(self._live.values(), key=_handle)
        return blocks if device is None else [b for b in blocks if b.device == device]

    def blocks_on(self, device: str) -> int:
        """How many live blocks are on ``device``."""
        with self._lock:
            return operator.countOf(map(_device, self._live.values()), device)

    def reclaim(self) -> int:
        """Return to the storage the pending pages whose events were reached; how many freed
        pages still wait for device work (see the module docstring)."""
        with self._lock:
            self._poll()
            return sum(len(p) for _, groups in self._pending for _, pages in groups for p in pages)

    # Internals; the lock is held.

    def _check_open(self) -> None:
        if self._closed is not None:
            raise BackendUnavailableError(self._closed, hint="create a new backend")

    def _take(
        self, device: str, dtypes: Sequence[DType], page_counts: Sequence[int]
    ) -> list[Pages]:
        """Pages from the storage, after the pending pages whose events were reached; waits for
        the oldest pending events while the storage is short of pages."""
        if self._pending:
            self._poll()
        while True:
            try:
                return self._storage.allocate(device, dtypes, page_counts)
            except ResourceExhaustedError:
                if not self._pending:
                    raise
                events, groups = self._pending.popleft()
                for event in events:
                    event.synchronize()
                self._give_back(groups)

    def _poll(self) -> None:
        """Release pending pages whose events were reached, oldest first."""
        pending = self._pending
        while pending and all(event.query() for event in pending[0][0]):
            self._give_back(pending.popleft()[1])

    def _track(self, event: Fence | None) -> None:
        """Keep the event of work on another stream until it is reached."""
        if event is not None:
            self._in_flight = [e for e in self._in_flight if not e.query()]
            self._in_flight.append(event)

    def _release(self, blocks: list[KVBlock], events: list[Fence]) -> None:
        """Give back the pages of retired blocks, or keep them pending on the events that
        reusing them must follow: ``events`` and the work still in flight on other streams."""
        if not blocks:
            return
        devices = set(map(_device, blocks))
        if len(devices) == 1:
            groups = [(devices.pop(), list(map(_pages, blocks)))]
        else:
            groups = [(d, [b.pages for b in blocks if b.device == d]) for d in devices]
        if self._in_flight:
            self._in_flight = [e for e in self._in_flight if not e.query()]
        waiting = [e for e in events if not e.query()] + self._in_flight
        if waiting:
            self._pending.append((waiting, groups))
        else:
            self._give_back(groups)

    def _give_back(self, groups: list[tuple[str, list[Pages]]]) -> None:
        for device, pages in groups:
            self._storage.release(device, pages)
            if device not in self._give:
                self._add_giver(device)

    def _add_giver(self, device: str) -> None:
        give = self._storage.giver(device)
        if give is not None:
            self._give[device] = give

    def _distinct(self, blocks: list[KVBlock], operation: str) -> list[int]:
        """The handles of ``blocks``, each a live block of this table named once."""
        handles = list(map(_handle, blocks))
        try:
            mine = all(map(operator.is_, map(self._live.get, handles), blocks))
        except TypeError:  # an unhashable handle: the full check refuses it
            mine = False
        if not mine:
            for block in blocks:
                self._lookup(block)
        if len(set(handles)) != len(handles):
            seen: set[int] = set()
            for handle in handles:
                if handle in seen:
                    raise InvalidArgumentError(
                        f"{operation} names KV block {handle} more than once",
                        hint="pass each block once per batch",
                    )
                seen.add(handle)
        return handles

    def _lookup(self, block: KVBlock) -> KVBlock:
        """The live block of ``block``'s handle, after every check."""
        if block.owner != self._owner:
            raise InvalidBlockError(
                f"KV block {block.handle} belongs to another provider ({block.owner or 'none'})",
                hint="pass a block to the provider that allocated it; move KV between "
                "processes with send and recv",
            )
        live = self._live.get(block.handle) if type(block.handle) is int else None
        if live is None:
            if type(block.handle) is int and 0 < block.handle < self._next_handle:
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
            if _grown_from(live, block):
                raise BlockNotFoundError(
                    f"KV block {block.handle} was grown to {live.num_tokens} tokens; this "
                    f"handle ({block.num_tokens} tokens) is stale",
                    hint="use the handle kv_block_grow returned",
                )
            raise InvalidBlockError(
                f"KV block {block.handle} does not match the live block of that handle",
                hint="use handles exactly as the provider returned them",
            )
        return live

    def _check_copy(
        self, pairs: list[tuple[KVBlock, KVBlock]]
    ) -> tuple[list[KVBlock], list[KVBlock]]:
        """The sources and destinations of valid copy pairs."""
        srcs, dsts = list(map(_first, pairs)), list(map(_second, pairs))
        get, same = self._live.get, operator.is_
        try:
            read, written_handles = list(map(_handle, srcs)), list(map(_handle, dsts))
            mine = all(map(same, map(get, read), srcs)) and all(
                map(same, map(get, written_handles), dsts)
            )
        except Exception:  # not all KVBlocks: the full check says what is wrong
            mine = False
        if mine:
            n = len(dsts)
            written = set(written_handles)
            if (
                len(written) == n
                and written.isdisjoint(read)
                and (
                    sum(map(len, map(_pages, srcs))) == n == sum(map(len, map(_pages, dsts)))
                    or list(map(len, map(_pages, srcs))) == list(map(len, map(_pages, dsts)))
                )
                and (len(self._dtypes) == 1 or list(map(_dtype, srcs)) == list(map(_dtype, dsts)))
            ):
                return srcs, dsts
        for src, dst in pairs:
            check_block(src, "src")
            check_block(dst, "dst")
        sources = {src.handle for src, _ in pairs}
        destinations: set[int] = set()
        for src, dst in pairs:
            src_block, dst_block = self._lookup(src), self._lookup(dst)
            if dst.handle in destinations or dst.handle in sources:
                raise InvalidArgumentError(
                    f"KV block {dst.handle} is written more than once, or both read and "
                    "written, in one copy",
                    hint="split the copy into batches whose destinations are distinct",
                )
            destinations.add(dst.handle)
            if src_block.num_pages != dst_block.num_pages or src.dtype != dst.dtype:
                raise InvalidBlockError(
                    f"cannot copy KV block {src.handle} ({src_block.num_pages} pages, "
                    f"{src.dtype.value}) into block {dst.handle} ({dst_block.num_pages} pages, "
                    f"{dst.dtype.value})",
                    hint="copy between blocks of the same page count and dtype",
                    code=ErrorCode.KV_BLOCK_MISMATCH,
                )
        return srcs, dsts

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


def _grown_from(live: KVBlock, block: KVBlock) -> bool:
    """True if ``live`` is ``block`` after a grow: same identity, more tokens, its pages first."""
    return (
        live.owner == block.owner
        and live.device == block.device
        and live.dtype == block.dtype
        and live.num_tokens > block.num_tokens
        and live.pages[: len(block.pages)] == block.pages
    )


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
    if not set(map(type, items)) <= {KVBlock}:
        for item in items:
            check_block(item, f"each of {what}")
    return cast("list[KVBlock]", items)


def _pair_list(pairs: Iterable[tuple[KVBlock, KVBlock]]) -> list[tuple[KVBlock, KVBlock]]:
    """``pairs`` as a list of 2-tuples, else InvalidArgumentError (their items are checked
    with the blocks)."""
    items = _iterable(pairs, "pairs")
    if set(map(type, items)) <= {tuple} and set(
        map(len, cast("list[tuple[object, ...]]", items))
    ) <= {2}:
        return cast("list[tuple[KVBlock, KVBlock]]", items)
    for pair in items:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise InvalidArgumentError(
                f"each copy must be a (src, dst) tuple of KVBlock, got {pair!r}",
                hint="pass (src, dst) tuples of KVBlock handles returned by kv_block_alloc",
            )
    return cast("list[tuple[KVBlock, KVBlock]]", items)


def _int_list(values: Sequence[int], what: str) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InvalidArgumentError(
            f"{what} must be a sequence of ints, got {type(values).__name__}",
            hint="pass a list such as [128, 64]",
        )
    out = list(values)
    if not set(map(type, out)) <= {int}:
        for value in out:
            if isinstance(value, bool) or not isinstance(value, int):
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
