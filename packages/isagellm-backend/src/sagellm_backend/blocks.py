"""KV block bookkeeping shared by every backend: live handles, validation, all-or-nothing
batches, growth, and stream-ordered reuse of pages.

A :class:`BlockTable` decides *whether* an operation on KV blocks is valid and keeps the table of
live handles; a :class:`BlockStorage` decides *which pages* a block gets (a torch pool's free
list of preallocated pages; the mock's budgeted page ids). Both backends get the same checks and
the same errors:

- ``num_tokens`` that is not an int, not positive, or more than the storage could ever hold:
  InvalidArgumentError; a dtype string that is unknown: InvalidArgumentError; a dtype the
  backend's KV blocks do not hold: CapabilityError.
- A handle that is not an int: InvalidArgumentError (checked where the handle is looked up,
  so a value equal to a live handle, such as a float of it, names that block; likewise, in
  an allocation, a token count equal to an int of the same batch, in any order, counts as
  that int). A block that was freed
  or migrated away (double free, use after free): BlockNotFoundError. Handles are never
  reused, so a stale handle can always be told apart from a live one.
- A block of another provider (or a handle never given out): InvalidBlockError
  ``foreign_block``; a copy between blocks of different page counts or dtypes:
  InvalidBlockError ``kv_block_mismatch``.
- A batch naming a block twice: InvalidArgumentError.
- Any call after :meth:`BlockTable.close`: BackendUnavailableError.

Every batch is validated in full before anything changes, and the storage allocates a whole
batch or nothing, so a failed call leaves the table and the storage as they were.

**Handles and pages.** A handle is an int below ``2**60`` (two 30-bit digits, so making,
hashing and storing one is cheap): the table's tag (17 bits, and a bit above them so that no
handle is a small int) above :data:`HANDLE_BITS` bits of a serial number that only grows. Tags
are taken in turn from a random start per process, skipping those of tables that still exist,
so no two tables of a process share one (a tag comes round again only after ``2**17`` tables;
a process with that many alive is refused another). A table gives out ``2**42 - 2`` handles;
past them it refuses to allocate (ResourceExhaustedError). The table keeps one dict entry per
live block, handle to page ids: one int for a block of one page, a tuple for a
block of several. A page id is ``pool << PAGE_BITS | page``: the index of the page in the tensor
of its *pool*, the (device, dtype) pair the table numbered ``pool``. Pool 0 is the default
device's first dtype, so its page ids are the page indices.

**Stream-ordered reuse.** A freed page may still be read or written by device work queued
before the free. The table orders its reuse after that work:

- the provider issues its data operations (writes, copies, migrations) inside the table's lock
  (the ``issue`` callbacks), so no page can be freed and handed out again between the check of
  an operation and the queueing of its work;
- work the provider queues on the device's default stream needs nothing more: whatever later
  writes a reused page from that stream runs after it (and on the CPU work runs when it is
  issued); work on any other stream first waits for the default stream;
- work on another stream (``stream=``, or inside a ``with stream:`` block) is *in flight* until
  its event is reached. Pages freed while any such work is in flight, the sources of a
  migration on another stream, and pages freed with ``after=`` (work an engine queued itself
  on the cache tensors) wait in a pending-release list. They return to the storage once their
  events are reached: polled on allocation (oldest first), and waited for only when the
  storage would otherwise be short.
  Only pages with work pending on another stream are tracked: the common path records no
  event and keeps no per-block state;
- :meth:`BlockTable.close` waits for every event it still holds before it releases the pages.

**Speed.** An engine allocates and frees blocks from Python while the device runs the previous
step, so host time per block matters. One-page blocks of pool 0 have a real single-block path:
it takes the table's lock with a non-blocking pop of its token (see :class:`_Mutex`), then one
list pop or append in the storage and one dict entry. A batch is handled as whole lists with
C-level builtins: one dict operation per block validates it, and item types are checked only
when a lookup fails.
"""

# Annotations here are evaluated (no postponed annotations): a NamedTuple of annotation
# strings compiles each one when the class is made, at every start-up.
import itertools
import operator
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Container, Iterable, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import NamedTuple, NoReturn, Protocol, TypeVar, cast

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
from sagellm_backend.kv import KVBlock, KVBlockInfo, KVLayout

__all__ = [
    "HANDLE_BITS",
    "PAGE_BITS",
    "BlockStorage",
    "BlockTable",
    "Fence",
    "Give",
    "Issue",
    "Pages",
    "Pool",
    "Take",
    "Transfer",
    "blocks_of",
    "total_pages",
]

R = TypeVar("R")
T = TypeVar("T")

PAGE_BITS = 40
"""Bits of a page id that hold the page index; the pool number is above them."""
_PAGE_MASK = (1 << PAGE_BITS) - 1
HANDLE_BITS = 42
"""Bits of a handle that hold its serial number; the table's tag is above them."""
_TAG_BITS = 17
_SERIALS = (1 << HANDLE_BITS) - 2
"""Handles a table gives out: serial numbers 1 to ``2**42 - 2``."""


class Fence(Protocol):
    """The part of an event the table uses: whether device work is done, and waiting for it."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class Pool(NamedTuple):
    """Pages of one dtype on one device: ``number`` is the pool's number in their page ids."""

    number: int
    device: str
    dtype: DType

    @property
    def base(self) -> int:
        """The page id of the pool's page 0."""
        return self.number << PAGE_BITS


class Transfer(NamedTuple):
    """Page copies from one pool to another: page ``sources[i]`` of ``source`` to page
    ``targets[i]`` of ``target``, as page ids (``pool.base + index``; the storage takes the
    base off, at once for a whole list)."""

    source: Pool
    target: Pool
    sources: list[int]
    targets: list[int]


Pages = int | tuple[int, ...]
"""A block's page ids: the id itself for a one-page block, a tuple of two or more otherwise."""
Take = Callable[[], int]
"""Takes the page id of a new one-page block; IndexError when none is free."""
Give = Callable[[int], None]
"""Gives back the page id of one released one-page block."""
Issue = Callable[[list[Transfer]], Fence | None]
"""Queues page copies. Returns None when the work went to the calling thread's current stream,
else the event recorded after it on the other stream."""

_tags = itertools.count(int.from_bytes(os.urandom(4), "little"))
"""Table tags, in the order tried: from a random start per process."""
_held_tags: set[int] = set()
"""The tags of the tables of this process that still exist: no two share one."""
_tags_lock = threading.Lock()
_handle_range = cast("Callable[[int, int], Sequence[KVBlock]]", range)
"""``range``, typed as the handles it numbers."""
_IN_FLIGHT_KEPT = 64
"""Events of work on other streams the table keeps before it drops those already reached."""
_ONE_PAGE = b"\x01"
"""Times ``n``: the page counts of ``n`` one-page blocks, made by one C call."""


class BlockStorage(Protocol):
    """Which pages a block gets. A BlockTable calls it under its own lock, one call at a time.

    Page ids are ``pool.base + page``: the storage hands them out and takes them back so.
    """

    def max_pages(self, pool: Pool) -> int:
        """The most pages one block of ``pool`` could ever occupy (asked once per pool)."""
        ...

    def allocate(self, requests: Sequence[tuple[Pool, Sequence[int]]]) -> list[list[Pages]]:
        """The page ids of new blocks, per request ``(pool, page_counts)``, all or none.

        Block ``i`` of a request gets ``page_counts[i]`` pages (at least one) of its pool, as
        :data:`Pages`: an int for one page, a tuple for several; the
        page counts of a batch of one-page blocks come as bytes of ones. If the requests do not
        fit together, raise ResourceExhaustedError leaving nothing changed.
        """
        ...

    def release(self, pool: Pool, pages: Sequence[int]) -> None:
        """Take back released pages of ``pool``, by page id. Never fails for ids it gave."""
        ...

    def taker(self, pool: Pool) -> Take | None:
        """The single-block path's allocation of one-page blocks of ``pool``."""
        ...

    def giver(self, pool: Pool) -> Give | None:
        """The single-block path's release of one-page blocks of ``pool``."""
        ...

    def free_ids(self, pool: Pool) -> list[int] | None:
        """The free list of ``pool`` itself, where releasing pages is no more than appending
        their ids to it: the usual batch free extends it in one call, and cuts off what it
        added if the batch turns out invalid. None where a release does more."""
        ...


_Groups = list[tuple[int, list[int]]]
"""Page ids of retired blocks, by pool number: [(pool, page ids)]."""
_Pending = tuple[list[Fence], _Groups]
"""Page ids waiting for events: (events, their groups)."""


class BlockTable:
    """Thread-safe table of the live KV blocks of one provider.

    ``devices`` holds the device names blocks may live on (the provider's devices and usually
    ``"host"``; any container, so a large set need not be listed) and ``devices_hint`` names
    them for an error's hint; ``dtypes`` are the dtypes KV blocks may have, and ``dtype_hint``
    (where ``{dtype}`` stands for the dtype asked for) says how to get another.

    ``guard(operation)`` raises where the provider refuses a host-side call (closed, or a graph
    capture in progress): allocations and frees run it while the table is held (:meth:`holding`
    holds it for a capture, and keeps the single-block calls off their fast path) or closed.
    ``own_event`` returns the :class:`Fence` of an event passed as ``after``, refusing an event
    the provider cannot wait for (on the mock, another provider's; on a torch backend, another
    device's: providers of one device share its streams and events).
    """

    _tag = 0
    """The table's tag; 0 (no tag) until one is given."""

    def __init__(
        self,
        storage: BlockStorage,
        *,
        layout: KVLayout,
        dtypes: Sequence[DType],
        devices: Container[str],
        default_device: str,
        devices_hint: str,
        dtype_hint: str | None = None,
        guard: Callable[[str], None],
        own_event: Callable[[object], Fence],
    ) -> None:
        self._tag = _new_tag()  # first: __del__ gives it back
        if default_device not in devices:
            raise InvalidArgumentError(
                f"default device {default_device!r} is not among the table's devices",
                hint="pass a default device that is one of the devices",
            )
        self._storage = storage
        self._layout = layout
        self._dtypes = tuple(dtypes)
        self._dtype_of: dict[object, DType] = {k: d for d in self._dtypes for k in (d, d.value)}
        """The dtypes blocks may have, by member and by value."""
        self._devices = devices
        self._devices_hint = devices_hint
        self._dtype_hint = dtype_hint or f"use one of {', '.join(d.value for d in self._dtypes)}"
        self._default_device = default_device
        self._token = [True]
        """Held by whoever changes the table: see :class:`_Mutex`."""
        self._mutex = _Mutex(self._token)
        self._live: dict[int, Pages] = {}
        self._elsewhere = 0
        """Live blocks outside pool 0: while there are none, a batch needs no grouping."""
        self._several = 0
        """Live blocks of more than one page: while there are none, every block's pages are its
        page id."""
        self._last = (self._tag + 1 << HANDLE_BITS) - 1
        """The handle after the last this table gives out."""
        self._handles = iter(_handle_range((self._tag << HANDLE_BITS) + 1, self._last))
        """Handles to give out, in order."""
        self._next_handle = self._handles.__next__
        self._tokens_per_page = layout.tokens_per_block
        self._pools: list[Pool] = []
        self._pool_of: dict[tuple[str, DType], Pool] = {}
        self._limits: list[int] = []
        """The most pages a block of each pool could ever have, by the pool's number."""
        self._guard = guard
        self._own_event = own_event
        for dtype in self._dtypes:
            self._pool(default_device, dtype)
        first = self._pools[0]
        take, give = storage.taker(first), storage.giver(first)
        self._one_page: dict[object, Take] = {}
        """The single-block path's allocation in pool 0, by its dtype or the dtype's value."""
        if take is not None:
            self._one_page = {first.dtype: take, first.dtype.value: take}
        self._gives: dict[int, Give] = {} if give is None else {0: give}
        """The single-block path's release, under pool 0's number."""
        self._free_ids = cast("list[Pages] | None", storage.free_ids(first))
        """Pool 0's free list, where the storage hands it out (it holds page ids only)."""
        self._takes = self._one_page
        """``_one_page``, or empty while the single-block path is held."""
        self._gives_now = self._gives
        """``_gives``, or empty while the single-block path is held."""
        self._holds = 0
        self._in_flight: list[Fence] = []
        self._pending: deque[_Pending] = deque()
        self._closed: str | None = None

    def __del__(self) -> None:
        _held_tags.discard(self._tag)  # the tag may be given to a later table

    @property
    def layout(self) -> KVLayout:
        return self._layout

    @property
    def pools(self) -> list[Pool]:
        """The pools blocks have been allocated in so far, by number."""
        return list(self._pools)

    def holding(self, context: AbstractContextManager[R]) -> AbstractContextManager[R]:
        """``context`` (a graph capture) with the single-block calls held off their fast path,
        so that they run the guard, while it is entered."""
        return _Holding(self, context)

    def bind_calls(self, provider: object, base: type) -> None:
        """Make :meth:`alloc_one`, :meth:`free_one`, :meth:`alloc` and :meth:`free` the
        ``kv_block_alloc``, ``kv_block_free``, ``kv_blocks_alloc`` and ``kv_blocks_free`` of
        ``provider`` itself, sparing the forwarding call: an engine makes them for every block
        or step. A subclass of ``base`` that overrides one keeps its own."""
        for name, call in (
            ("kv_block_alloc", self.alloc_one),
            ("kv_block_free", self.free_one),
            ("kv_blocks_alloc", self.alloc),
            ("kv_blocks_free", self.free),
        ):
            if getattr(type(provider), name) is getattr(base, name):
                vars(provider)[name] = call

    @property
    def held(self) -> bool:
        """Whether a :meth:`holding` context is entered."""
        return self._holds > 0

    def hold(self, change: int) -> None:
        """Hold the single-block calls off their fast path (``+1``) or let them back (``-1``)."""
        with self._mutex:
            self._holds += change
            self._reopen()

    # Validation that needs no lock.

    def check_dtype(self, dtype: object, operation: str = "kv_block_alloc") -> DType:
        """``dtype`` as a DType that KV blocks may have (enum member or its string value)."""
        try:
            return self._dtype_of[dtype]
        except (KeyError, TypeError):  # another spelling, or not a dtype
            pass
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

    def alloc_one(self, num_tokens: int, dtype: DType | str) -> KVBlock:
        """One block on the default device; a one-page block of the first dtype takes the
        single-block path."""
        token = self._token
        try:
            token.pop()  # IndexError: another call holds the table
            try:
                take = self._takes[dtype]
                if num_tokens.__class__ is int and 0 < num_tokens <= self._tokens_per_page:
                    handle = self._next_handle()  # StopIteration: no handle left
                    self._live[handle] = take()
                    return handle
            finally:
                token.append(True)
        except (KeyError, TypeError, IndexError, StopIteration):
            pass  # held, another dtype or spelling, no page or handle left: the batch path decides
        return self.alloc([num_tokens], dtype, operation="kv_block_alloc")[0]

    def alloc(
        self,
        num_tokens: Sequence[int],
        dtype: object,
        *,
        device: str | None = None,
        operation: str = "kv_blocks_alloc",
    ) -> list[KVBlock]:
        """Allocate one block per entry of ``num_tokens``, all or none, after the guard."""
        if self._holds or self._closed is not None:
            self._guard(operation)
        member = self.check_dtype(dtype)
        where = self._default_device if device is None else self.check_device(device)
        counts, distinct = _token_counts(num_tokens, "num_tokens")
        with self._mutex:
            if self._closed is not None:
                self._check_open()
            if not counts:
                return []
            pool = self._pool(where, member)
            tokens_per_page = self._tokens_per_page
            smallest, most = min(distinct), max(distinct)
            if smallest <= 0 or -(-most // tokens_per_page) > self._limits[pool.number]:
                for n in counts:
                    self._pages_for(n, pool)
            if most <= tokens_per_page:
                page_counts: Sequence[int] = _ONE_PAGE * len(counts)  # the usual batch
            else:
                page_counts = [-(-int(n) // tokens_per_page) for n in counts]
            handles = self._new_handles(len(counts))
            taken = self._take([(pool, page_counts)])[0]
            self._live.update(zip(handles, taken, strict=True))
            if pool.number:
                self._elsewhere += len(counts)
            if most > tokens_per_page:
                self._several += len(counts) - page_counts.count(1)
        return handles

    def free_one(self, block: KVBlock, *, after: object = None) -> None:
        """Free one block; a live one-page block of pool 0 takes the single-block path.

        With ``after``, the pages are reused only once that event is reached.
        """
        if after is None:
            token = self._token
            try:
                token.pop()  # IndexError: another call holds the table
                try:
                    live = self._live
                    page = live[block]
                    if isinstance(page, int):  # one page
                        give = self._gives_now[page >> PAGE_BITS]  # KeyError: not pool 0, or held
                        del live[block]
                        give(page)
                        return
                finally:
                    token.append(True)
            except (KeyError, TypeError, IndexError):
                pass  # held, or not a live block of pool 0: the batch path decides
        self.free([block], after=after, operation="kv_block_free")

    def free(
        self, blocks: Iterable[KVBlock], *, after: object = None, operation: str = "kv_blocks_free"
    ) -> None:
        """Free every block, all or none, after the guard; a stale, foreign or repeated block is
        refused.

        With ``after`` (an event of the provider), the pages are reused only once that event is
        reached.
        """
        if self._holds or self._closed is not None:
            self._guard(operation)
        fence = None if after is None else self._own_event(after)
        items = blocks if type(blocks) is list else _listed(blocks, "blocks")
        with self._mutex:
            if self._closed is not None:
                self._check_open()
            live = self._live
            # the usual free: one-page blocks of pool 0, nothing to wait for
            usual = fence is None and not (self._elsewhere or self._several or self._in_flight)
            onto = self._free_ids if usual else None
            freed: list[Pages] = [] if onto is None else onto
            mark = len(freed)
            try:
                freed.extend(map(live.pop, items))
            except (KeyError, TypeError):  # put back what was taken; name the first bad item
                live.update(zip(_as_handles(items[: len(freed) - mark]), freed[mark:], strict=True))
                del freed[mark:]
                self._refuse(items, "kv_blocks_free")
            if onto is not None:
                return  # the page ids went straight onto the storage's free list
            if usual:
                if freed:
                    self._storage.release(self._pools[0], cast("list[int]", freed))
                return
            self._release(self._groups(freed), [] if fence is None else [fence])

    def grow(self, blocks: Sequence[KVBlock], num_tokens: Sequence[int]) -> list[KVBlock]:
        """Each block grown to hold ``num_tokens[i]`` tokens by appending pages, all or none.

        A grown block keeps its handle and its pages; the handles are returned.
        """
        items = _listed(blocks, "blocks")
        counts = _int_list(num_tokens, "num_tokens")
        if len(counts) != len(items):
            raise InvalidArgumentError(
                f"kv_blocks_grow got {len(items)} blocks and {len(counts)} token counts",
                hint="pass one token count per block",
            )
        with self._mutex:
            self._check_open()
            current = self._distinct(items, "kv_blocks_grow")
            extra: dict[Pool, tuple[list[int], list[int]]] = {}
            for i, (pages, n) in enumerate(zip(current, counts, strict=True)):
                pool = self._pools[_first_id(pages) >> PAGE_BITS]
                more = self._pages_for(n, pool) - _count(pages)
                if more > 0:
                    indices, page_counts = extra.setdefault(pool, ([], []))
                    indices.append(i)
                    page_counts.append(more)
            if not extra:
                return items
            taken = self._take([(pool, page_counts) for pool, (_, page_counts) in extra.items()])
            live = self._live
            for (indices, _), given in zip(extra.values(), taken, strict=True):
                for i, added in zip(indices, given, strict=True):
                    if isinstance(current[i], int):
                        self._several += 1
                    live[items[i]] = _ids_of(current[i]) + _ids_of(added)
        return items

    def close(self, message: str) -> None:
        """Refuse every later call with ``message``; wait for the events the table still holds
        and release every page. Idempotent."""
        with self._mutex:
            if self._closed is not None:
                return
            self._closed = message
            events = self._in_flight + [e for entry in self._pending for e in entry[0]]
            for event in {id(e): e for e in events}.values():
                event.synchronize()
            self._in_flight.clear()
            for _, groups in self._pending:
                self._give_back(groups)
            self._pending.clear()
            if self._live:
                self._give_back(self._groups(list(self._live.values())))
            self._live.clear()
            self._elsewhere = self._several = 0
            self._reopen()

    # Data operations, issued under the lock.

    def copy(self, pairs: Iterable[tuple[KVBlock, KVBlock]], issue: Issue) -> None:
        """Validate (src, dst) pairs and queue their copy with ``issue``.

        Each pair must match in page count and dtype. A block may be the source of several pairs,
        but a destination may appear only once and never also as a source, so the result does
        not depend on the order the copies run in.
        """
        read, written = _split_pairs(pairs)
        with self._mutex:
            self._check_open()
            self._track(issue(self._check_copy(read, written)))

    def migrate(self, blocks: Iterable[KVBlock], target: object, issue: Issue) -> list[KVBlock]:
        """Give every block a replacement on ``target``, queue the data movement with ``issue``
        and retire the sources, all or none. Returns the replacements."""
        where = self.check_device(target)
        items = _listed(blocks, "blocks")
        with self._mutex:
            self._check_open()
            if not items:
                self._track(issue([]))
                return []
            live = self._live
            sources: list[Pages] = []
            try:
                sources.extend(map(live.pop, items))  # each a live block, named once
            except (KeyError, TypeError):  # put back what was taken; name the first bad item
                live.update(zip(_as_handles(items[: len(sources)]), sources, strict=True))
                self._refuse(items, "kv_blocks_migrate")
            try:
                handles = self._new_handles(len(items))
                plans, taken, event = self._move_out(items, sources, where, issue)
            except BaseException:
                live.update(zip(_as_handles(items), sources, strict=True))
                raise
            replaced = taken[0]  # one source pool: the replacements in the blocks' order
            if len(plans) > 1:
                replaced = [0] * len(items)
                for (_, _, members), given in zip(plans, taken, strict=True):
                    for i, pages in zip(members, given, strict=True):
                        replaced[i] = pages
            live.update(zip(handles, replaced, strict=True))
            several = self._several
            released = self._groups(sources, plans[0][0].number if len(plans) == 1 else None)
            self._several = several  # the replacements have the sources' page counts
            self._elsewhere += sum(len(m) for _, pool, m in plans if pool.number)
            self._release(released, [] if event is None else [event])
            self._track(event)
        return handles

    def _move_out(
        self, items: list[KVBlock], sources: list[Pages], where: str, issue: Issue
    ) -> tuple[list[tuple[Pool, Pool, Sequence[int]]], list[list[Pages]], Fence | None]:
        """Take pages on ``where`` for the blocks ``items`` (with pages ``sources``) and queue
        the copies: the plans (source pool, target pool, members), the pages taken per plan
        and the event of the copies; nothing changed if it raises."""
        groups: dict[int, Sequence[int]] = {}
        one_page = not self._several
        firsts = _firsts(sources, one_page) if self._elsewhere else None
        low = min(firsts) >> PAGE_BITS if firsts else 0
        if firsts is None or low == len(self._pools) - 1 or low == max(firsts) >> PAGE_BITS:
            groups[low] = range(len(items))  # one pool: no pool above the lowest, or the same
        else:
            for i, first in enumerate(firsts):
                cast("list[int]", groups.setdefault(first >> PAGE_BITS, [])).append(i)
        plans: list[tuple[Pool, Pool, Sequence[int]]] = []
        for index, members in groups.items():
            source = self._pools[index]
            if source.device == where:
                raise InvalidArgumentError(
                    f"KV block {items[members[0]]:#x} is already on {where}",
                    hint="migrate it to another device, or keep using it where it is",
                )
            plans.append((source, self._pool(where, source.dtype), members))
        moved = [
            sources if len(members) == len(items) else [sources[i] for i in members]
            for _, _, members in plans
        ]
        requests = [
            (plan[1], _ONE_PAGE * len(m) if one_page else _counts(m))
            for plan, m in zip(plans, moved, strict=True)
        ]
        taken = self._take(requests)
        transfers = [
            Transfer(
                source,
                target_pool,
                _ids(m, one_page),
                _ids(given, one_page),
            )
            for (source, target_pool, _), m, given in zip(plans, moved, taken, strict=True)
        ]
        try:
            event = issue(transfers)
        except BaseException:
            for (pool, _), given in zip(requests, taken, strict=True):
                self._storage.release(pool, _ids(given, one_page))
            raise
        return plans, taken, event

    def use(self, block: KVBlock, work: Callable[[KVBlockInfo], R]) -> R:
        """``work(info)`` for a live block of this table, under the lock (reads)."""
        _check_types([block], "block")
        with self._mutex:
            self._check_open()
            return work(self._info(block, self._lookup(block)))

    def write(self, block: KVBlock, issue: Callable[[KVBlockInfo], Fence | None]) -> None:
        """``issue(info)`` queues device work on a live block, under the lock; the event it
        returns (work on another stream) is kept until reached, as a copy's is."""
        _check_types([block], "block")
        with self._mutex:
            self._check_open()
            self._track(issue(self._info(block, self._lookup(block))))

    # Lookup.

    def info(self, block: KVBlock) -> KVBlockInfo:
        """Where the live ``block`` is, after every check."""
        return self.use(block, _same)

    def check_live(self, blocks: Sequence[KVBlock]) -> None:
        """Refuse ``blocks`` (repeats allowed) unless each is a live block of this table."""
        items = _listed(blocks, "blocks")
        with self._mutex:
            self._check_open()
            self._pages_of(items, "check_live", repeats=True)

    def pages_on(self, blocks: Sequence[KVBlock], device: str) -> list[tuple[int, ...]]:
        """The pages of live ``blocks`` (repeats allowed), each block on ``device``; refused
        otherwise."""
        items = _listed(blocks, "blocks")
        with self._mutex:
            self._check_open()
            found = self._pages_of(items, "plan", repeats=True)
            if not self._elsewhere and self._pools[0].device == device:
                if self._several == len(self._live):  # every block has several pages: tuples
                    return cast("list[tuple[int, ...]]", found)
                return list(map(_ids_of, found))
            for handle, p in zip(items, found, strict=True):
                on = self._pools[_first_id(p) >> PAGE_BITS].device
                if on != device:
                    raise InvalidArgumentError(
                        f"KV block {handle:#x} is on {on}, not on {device}",
                        hint=f"migrate it to {device} (kv_blocks_migrate) first",
                    )
            return [_local(p) for p in found]

    def live_blocks(self, device: str | None = None) -> list[KVBlockInfo]:
        """Where the live blocks are (on ``device`` if given), oldest handle first."""
        with self._mutex:
            self._check_open()
            infos = [self._info(h, p) for h, p in sorted(self._live.items())]
        return infos if device is None else [i for i in infos if i.device == device]

    def blocks_on(self, device: str) -> int:
        """How many live blocks are on ``device``."""
        with self._mutex:
            indices = {p.number for p in self._pools if p.device == device}
            return sum(
                1 for pages in self._live.values() if _first_id(pages) >> PAGE_BITS in indices
            )

    def reclaim(self) -> int:
        """Return to the storage the pending pages whose events were reached; how many freed
        pages still wait for device work (see the module docstring)."""
        with self._mutex:
            self._poll()
            return sum(len(g) for _, groups in self._pending for _, g in groups)

    # Internals; the lock is held.

    def _reopen(self) -> None:
        """Open the single-block path, or hold it: while the table is closed or held, while
        pages are pending (allocation polls them) and while work is in flight on another stream
        (a free must wait for it)."""
        held = self._closed is not None or self._holds > 0
        self._takes = {} if held or self._pending else self._one_page
        self._gives_now = {} if held or self._in_flight else self._gives

    def _check_open(self) -> None:
        if self._closed is not None:
            raise BackendUnavailableError(self._closed, hint="create a new backend")

    def _pool(self, device: str, dtype: DType) -> Pool:
        pool = self._pool_of.get((device, dtype))
        if pool is None:
            pool = Pool(len(self._pools), device, dtype)
            self._pools.append(pool)
            self._pool_of[device, dtype] = pool
            self._limits.append(self._storage.max_pages(pool))
        return pool

    def _info(self, handle: int, pages: Pages) -> KVBlockInfo:
        pool = self._pools[_first_id(pages) >> PAGE_BITS]
        return KVBlockInfo(cast("KVBlock", handle), pool.device, pool.dtype, _local(pages))

    def _new_handles(self, n: int) -> list[KVBlock]:
        """The next ``n`` handles; the single-block path goes on after them."""
        last = self._last
        upcoming = last - operator.length_hint(self._handles)
        if n > last - upcoming:
            raise ResourceExhaustedError(
                f"this provider has given out all its {_SERIALS} KV block handles",
                hint="create a new backend; handles are never reused",
            )
        self._handles = handles = iter(_handle_range(upcoming + n, last))
        self._next_handle = handles.__next__
        return list(_handle_range(upcoming, upcoming + n))

    def _take(self, requests: Sequence[tuple[Pool, Sequence[int]]]) -> list[list[Pages]]:
        """Pages from the storage, after the pending pages whose events were reached; waits for
        the oldest pending events while the storage is short of pages."""
        if self._pending:
            self._poll()
        while True:
            try:
                return self._storage.allocate(requests)
            except ResourceExhaustedError:
                if not self._pending:
                    raise
                events, groups = self._pending.popleft()
                for event in events:
                    event.synchronize()
                self._give_back(groups)
                self._reopen()

    def _poll(self) -> None:
        """Release pending pages whose events were reached, oldest first."""
        pending = self._pending
        while pending and all(event.query() for event in pending[0][0]):
            self._give_back(pending.popleft()[1])
        self._reopen()

    def _track(self, event: Fence | None) -> None:
        """Keep the event of work on another stream until it is reached."""
        if event is not None:
            # Those reached are dropped now and then, not on every call (nor in a capture,
            # which cannot ask events), so that tracking work asks the device little.
            if len(self._in_flight) >= _IN_FLIGHT_KEPT and not self._holds:
                self._in_flight = [e for e in self._in_flight if not e.query()]
            self._in_flight.append(event)
            self._reopen()

    def _groups(self, pages: list[Pages], pool: int | None = None) -> _Groups:
        """The page ids of retired blocks by pool (all of pool number ``pool`` where the caller
        knows it); counts the blocks out of ``_elsewhere`` and ``_several``."""
        one_page = not self._several
        blocks: list[tuple[int, list[Pages]]] = [(pool or 0, pages)]
        if pool:
            self._elsewhere -= len(pages)
        elif pool is None and self._elsewhere and pages:
            firsts = _firsts(pages, one_page)
            low, high = min(firsts) >> PAGE_BITS, max(firsts) >> PAGE_BITS
            if low == high:
                blocks = [(low, pages)]
            else:
                by_pool: dict[int, list[Pages]] = {}
                for first, p in zip(firsts, pages, strict=True):
                    by_pool.setdefault(first >> PAGE_BITS, []).append(p)
                blocks = list(by_pool.items())
            self._elsewhere -= sum(len(group) for number, group in blocks if number)
        if one_page:
            return cast("_Groups", blocks)  # every block has one page: its id
        groups: _Groups = []
        for number, group in blocks:
            self._several -= len(group) - list(map(type, group)).count(int)
            groups.append((number, _flat(group)))
        return groups

    def _release(self, groups: _Groups, events: list[Fence]) -> None:
        """Give back the pages of retired blocks, or keep them pending on the events that
        reusing them must follow: ``events`` and the work still in flight on other streams."""
        if not events and not self._in_flight:  # the usual free: nothing to wait for
            self._give_back(groups)
            return
        if not any(group for _, group in groups):
            return
        if self._in_flight:
            self._in_flight = [e for e in self._in_flight if not e.query()]
        waiting = [e for e in events if not e.query()] + self._in_flight
        if waiting:
            self._pending.append((waiting, groups))
        else:
            self._give_back(groups)
        self._reopen()

    def _give_back(self, groups: _Groups) -> None:
        for number, pages in groups:
            if pages:
                self._storage.release(self._pools[number], pages)

    def _distinct(self, handles: list[KVBlock], operation: str) -> list[Pages]:
        """The pages of ``handles``, each a live block of this table named once."""
        pages = self._pages_of(handles, operation)
        if len(set(handles)) != len(handles):
            self._refuse(handles, operation)
        return pages

    def _pages_of(
        self, handles: list[KVBlock], operation: str, *, repeats: bool = False
    ) -> list[Pages]:
        """The page ids of live ``handles``; otherwise the error of the first that is not."""
        live = self._live
        try:
            if len(handles) > 1:
                return list(operator.itemgetter(*handles)(live))  # one C loop of lookups
            return [live[handle] for handle in handles]
        except (KeyError, TypeError):  # not live, or unhashable
            self._refuse(handles, operation, repeats=repeats)

    def _refuse(
        self, handles: Sequence[object], operation: str, *, repeats: bool = False
    ) -> NoReturn:
        """Raise the error of the first item that is not a live handle, or of a repeated one."""
        _check_types(handles, "blocks")
        seen: set[object] = set()
        for handle in cast("Sequence[int]", handles):
            self._lookup(handle)
            if handle in seen and not repeats:
                raise InvalidArgumentError(
                    f"{operation} names KV block {handle:#x} more than once",
                    hint="pass each block once per batch",
                )
            seen.add(handle)
        raise AssertionError("every handle is live and named once")  # pragma: no cover

    def _lookup(self, handle: int) -> Pages:
        """The pages of the live block ``handle``, after every check."""
        pages = self._live.get(handle)
        if pages is not None:
            return pages
        if handle >> HANDLE_BITS != self._tag:
            raise InvalidBlockError(
                f"KV block {handle:#x} belongs to another provider",
                hint="pass a block to the provider that allocated it; move KV between "
                "processes with send and recv",
            )
        upcoming = self._last - operator.length_hint(self._handles)
        if handle < upcoming and handle & ((1 << HANDLE_BITS) - 1):
            raise BlockNotFoundError(
                f"KV block {handle:#x} was already freed or migrated away",
                hint="drop the handle after kv_block_free; after a migrate, use the handle it "
                "returned",
            )
        raise InvalidBlockError(
            f"KV block {handle:#x} was never allocated by this provider",
            hint="use handles returned by kv_block_alloc",
        )

    def _check_copy(self, read: list[KVBlock], written: list[KVBlock]) -> list[Transfer]:
        """The page copies of valid pairs (``read[i]``, ``written[i]``)."""
        srcs = self._pages_of(read, "kv_blocks_copy", repeats=True)
        dsts = self._pages_of(written, "kv_blocks_copy", repeats=True)
        n = len(read)
        targets = set(dsts)  # a live block's pages are its own: distinct pages, distinct blocks
        if len(targets) != n or not targets.isdisjoint(srcs):
            seen: set[int] = set()
            for handle in written:
                if handle in seen or handle in read:
                    raise InvalidArgumentError(
                        f"KV block {handle:#x} is written more than once, or both read and "
                        "written, in one copy",
                        hint="split the copy into batches whose destinations are distinct",
                    )
                seen.add(handle)
        if not srcs:
            return []
        if self._several:
            same = _counts(srcs) == _counts(dsts)
            src_ids, dst_ids = _flat(srcs), _flat(dsts)
        else:  # every block has one page: its id
            same = True
            src_ids, dst_ids = cast("list[int]", srcs), cast("list[int]", dsts)
        if same:
            if not self._elsewhere:  # every block in pool 0
                pool = self._pools[0]
                return [Transfer(pool, pool, src_ids, dst_ids)]
            low = min(min(src_ids), min(dst_ids)) >> PAGE_BITS
            if low == max(max(src_ids), max(dst_ids)) >> PAGE_BITS:
                pool = self._pools[low]
                return [Transfer(pool, pool, src_ids, dst_ids)]
        groups: dict[tuple[int, int], tuple[list[Pages], list[Pages]]] = {}
        for src, dst, s, d in zip(read, written, srcs, dsts, strict=True):
            source = self._pools[_first_id(s) >> PAGE_BITS]
            target = self._pools[_first_id(d) >> PAGE_BITS]
            if _count(s) != _count(d) or source.dtype != target.dtype:
                raise InvalidBlockError(
                    f"cannot copy KV block {src:#x} ({_count(s)} pages, {source.dtype.value}) "
                    f"into block {dst:#x} ({_count(d)} pages, {target.dtype.value})",
                    hint="copy between blocks of the same page count and dtype",
                    code=ErrorCode.KV_BLOCK_MISMATCH,
                )
            group = groups.setdefault((source.number, target.number), ([], []))
            group[0].append(s)
            group[1].append(d)
        transfers = []
        for (i, j), (read_pages, written_pages) in groups.items():
            source, target = self._pools[i], self._pools[j]
            transfers.append(Transfer(source, target, _flat(read_pages), _flat(written_pages)))
        return transfers

    def _pages_for(self, num_tokens: int, pool: Pool) -> int:
        if num_tokens <= 0:
            raise InvalidArgumentError(
                f"num_tokens must be positive, got {num_tokens}",
                hint="allocate a block for at least one token",
            )
        pages = self._layout.pages_for(num_tokens)
        limit = self._limits[pool.number]
        if pages > limit:
            raise InvalidArgumentError(
                f"a block of {num_tokens} tokens needs {pages} pages, more than {pool.device} "
                f"could ever hold in {pool.dtype.value} ({limit} pages, "
                f"{limit * self._layout.tokens_per_block} tokens)",
                hint="allocate several smaller blocks, or configure more memory",
            )
        return pages


def _new_tag() -> int:
    """A tag that no table of this process that still exists holds, now held."""
    with _tags_lock:
        for _ in range(1 << _TAG_BITS):
            tag = next(_tags) & ((1 << _TAG_BITS) - 1) | 1 << _TAG_BITS
            if tag not in _held_tags:
                _held_tags.add(tag)
                return tag
    raise ResourceExhaustedError(
        f"this process holds {1 << _TAG_BITS} KV block tables, as many as there are tags",
        hint="close providers that are no longer used and drop every reference to them",
    )


class _Mutex:
    """A block table's lock, with a try-acquire cheap enough for one call per block.

    Holding the table means holding its token, the one item of a list: the single-block path
    pops it without blocking (a list pop is atomic) and falls back to the batch path when it is
    held; it never waits for anything while it holds the token. Every other call enters this
    context: it takes the token if it is free and no call is queued, and otherwise queues on a
    lock, then takes the token, yielding the interpreter while another call still holds it. A
    queued call is so served before the calls that come after it.
    """

    def __init__(self, token: list[bool]) -> None:
        self._token = token
        self._queue = threading.Lock()
        self._queued = False
        """Whether the token's holder queued for it (read and written by the holder only)."""

    def __enter__(self) -> None:
        token = self._token
        if not self._queue.locked():
            try:
                token.pop()
            except IndexError:
                pass
            else:
                self._queued = False
                return
        self._queue.acquire()
        while True:
            try:
                token.pop()
            except IndexError:
                time.sleep(0)
            else:
                self._queued = True
                return

    def __exit__(self, *exc_info: object) -> None:
        queued = self._queued
        self._token.append(True)
        if queued:
            self._queue.release()


class _Holding(AbstractContextManager[R]):
    """A context entered with a table's single-block calls held (see BlockTable.holding)."""

    def __init__(self, table: BlockTable, context: AbstractContextManager[R]) -> None:
        self._table = table
        self._context = context

    def __enter__(self) -> R:
        self._table.hold(1)
        try:
            return self._context.__enter__()
        except BaseException:
            self._table.hold(-1)
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        try:
            return self._context.__exit__(exc_type, exc, tb)
        finally:
            self._table.hold(-1)


def _same(info: KVBlockInfo) -> KVBlockInfo:
    return info


def blocks_of(ids: list[int], page_counts: Sequence[int]) -> list[Pages]:
    """Page ids handed out in order, as the pages of blocks of ``page_counts`` pages: ``ids``
    itself when each block has one page."""
    if len(ids) == len(page_counts):
        return cast("list[Pages]", ids)
    ends = itertools.accumulate(page_counts)
    return [
        ids[end - 1] if n == 1 else tuple(ids[end - n : end])
        for n, end in zip(page_counts, ends, strict=True)
    ]


def total_pages(page_counts: Sequence[int]) -> int:
    """The pages of blocks of ``page_counts`` pages, quickly when each has one."""
    n = len(page_counts)
    return n if page_counts.count(1) == n else sum(page_counts)


def _first_id(pages: Pages) -> int:
    return pages if isinstance(pages, int) else pages[0]


def _count(pages: Pages) -> int:
    return 1 if isinstance(pages, int) else len(pages)


def _ids_of(pages: Pages) -> tuple[int, ...]:
    return (pages,) if isinstance(pages, int) else pages


def _local(pages: Pages) -> tuple[int, ...]:
    """Page ids as page indices of their pool."""
    ids = _ids_of(pages)
    if ids[0] <= _PAGE_MASK:
        return ids
    return tuple(p & _PAGE_MASK for p in ids)


def _counts(pages: Sequence[Pages]) -> list[int]:
    """The page count of each block."""
    try:
        return list(map(len, cast("Sequence[tuple[int, ...]]", pages)))
    except TypeError:  # a one-page block among them: its page id
        return list(map(_count, pages))


def _flat(pages: Sequence[Pages]) -> list[int]:
    """The page ids of blocks, in order, as one list."""
    try:
        return list(itertools.chain.from_iterable(cast("Sequence[tuple[int, ...]]", pages)))
    except TypeError:  # a one-page block among them: its page id
        return list(itertools.chain.from_iterable(map(_ids_of, pages)))


def _ids(pages: list[Pages], one_page: bool) -> list[int]:
    """The page ids of blocks, in order, as one list; ``one_page``: each block has one, and
    ``pages`` is that list."""
    return cast("list[int]", pages) if one_page else _flat(pages)


def _firsts(pages: list[Pages], one_page: bool) -> list[int]:
    """The first page id of each block; ``one_page``: each block has one, and ``pages`` is that
    list."""
    return cast("list[int]", pages) if one_page else list(map(_first_id, pages))


def _listed(blocks: Iterable[KVBlock], what: str) -> list[KVBlock]:
    """``blocks`` as a list; its items are checked where they are looked up."""
    if isinstance(blocks, int):
        raise InvalidArgumentError(
            f"{what} must be an iterable of KVBlock handles, got one int",
            hint="wrap a single block in a list, or use the single-block call",
        )
    return _iterable(blocks, what)


def _check_types(items: Iterable[object], what: str) -> None:
    """InvalidArgumentError unless every item is an int (a KVBlock handle)."""
    for item in items:
        if type(item) is not int:
            raise InvalidArgumentError(
                f"{what} must be KVBlock handles (ints), got {type(item).__name__}",
                hint="pass handles returned by kv_block_alloc",
            )


def _as_handles(items: Sequence[KVBlock]) -> list[KVBlock]:
    """The handles that ``items``, each equal to a handle, name: an item that is not an int
    (such as a float of the handle) as that int, so that blocks put back keep their keys."""
    handles = []
    for item in items:
        if item.__class__ is not int:
            try:
                if int(item) == item:
                    item = KVBlock(int(item))
            except (TypeError, ValueError, OverflowError):
                pass  # equal to a handle, yet no int: kept as it is
        handles.append(item)
    return handles


def _split_pairs(pairs: Iterable[tuple[KVBlock, KVBlock]]) -> tuple[list[KVBlock], list[KVBlock]]:
    """The sources and the destinations of (src, dst) pairs, else InvalidArgumentError (the
    handles themselves are checked where they are looked up)."""
    items = _iterable(pairs, "pairs")
    if not items:
        return [], []
    try:
        read, written = zip(*items, strict=True)
    except (TypeError, ValueError):
        for pair in items:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise InvalidArgumentError(
                    f"each copy must be a (src, dst) tuple of KVBlock, got {pair!r}",
                    hint="pass (src, dst) tuples of KVBlock handles returned by kv_block_alloc",
                ) from None
        raise
    return list(read), list(written)


def _token_counts(values: Sequence[int], what: str) -> tuple[list[int], set[int]]:
    """``values`` as a list and its distinct values, else InvalidArgumentError. A value equal
    to an int that is also given (``8.0`` beside ``8``) counts as that int."""
    out = values if type(values) is list else _iterable(values, what)
    if out:
        first = out[0]
        if first.__class__ is int and out.count(first) == len(out):
            return out, {first}  # the usual batch: one count for every block
    try:
        distinct = set(out)
    except TypeError:  # an unhashable item
        distinct = set()
    if (not distinct and out) or not set(map(type, distinct)) <= {int}:
        ints = {n for n in out if n.__class__ is int}  # the set kept the first of equal items
        if not distinct or not all(n in ints for n in distinct):
            _int_list(out, what)  # names the item that is not an int
        distinct = ints
    return out, distinct


def _int_list(values: Sequence[int], what: str) -> list[int]:
    out = _iterable(values, what)
    if not set(map(type, out)) <= {int}:
        for value in out:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgumentError(
                    f"{what} must be an int, got {value!r}", hint="pass a token count such as 128"
                )
    return out


def _iterable(values: Iterable[T], what: str) -> list[T]:
    if values.__class__ is list:  # the usual argument, without the ABC check
        return list(values)
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InvalidArgumentError(
            f"{what} must be an iterable, got {type(values).__name__}",
            hint="pass a list",
        )
    return list(values)
