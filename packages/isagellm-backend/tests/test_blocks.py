"""BlockTable, the shared KV block bookkeeping, over a page free-list storage like a torch pool."""

from __future__ import annotations

import pickle
import threading
from collections.abc import Sequence

import pytest

from sagellm_backend.blocks import BlockTable, Give, Take
from sagellm_backend.dtypes import DType
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

LAYOUT = KVLayout(tokens_per_block=16)
DTYPES = (DType.FP16, DType.BF16)


class PageListStorage:
    """A fixed pool of pages per device with a free-list: what a preallocated torch pool does.

    It has no single-block path, so every call takes the table's batch path."""

    def __init__(self, pages_per_device: dict[str, int]) -> None:
        self.free = {d: list(range(n)) for d, n in pages_per_device.items()}
        self.size = dict(pages_per_device)

    def max_pages(self, device: str, dtype: DType) -> int:
        return self.size[device]

    def allocate(
        self, device: str, dtypes: Sequence[DType], page_counts: Sequence[int]
    ) -> list[tuple[int, ...]]:
        assert len(dtypes) == len(page_counts) and min(page_counts) >= 1
        if sum(page_counts) > len(self.free[device]):
            raise ResourceExhaustedError(
                f"{device}: {sum(page_counts)} pages needed", hint="free some"
            )
        free = self.free[device]
        return [tuple(free.pop(0) for _ in range(n)) for n in page_counts]

    def release(self, device: str, pages: Sequence[tuple[int, ...]]) -> None:
        for block_pages in pages:
            self.free[device].extend(block_pages)

    def taker(self, device: str, dtype: DType) -> Take | None:
        return None

    def giver(self, device: str) -> Give | None:
        return None


def make_table(pages: int = 16, owner: str = "p1") -> tuple[BlockTable, PageListStorage]:
    storage = PageListStorage({"dev:0": pages, "dev:1": pages, "host": 4 * pages})
    table = BlockTable(
        storage,
        layout=LAYOUT,
        dtypes=DTYPES,
        devices={"dev:0", "dev:1", "host"},
        default_device="dev:0",
        owner=owner,
        devices_hint="use one of dev:0, dev:1, host",
    )
    return table, storage


def no_work(sources: list[KVBlock], destinations: list[KVBlock]) -> None:
    """The data movement of a table without data: nothing, on the current stream."""


def state(table: BlockTable, storage: PageListStorage) -> object:
    return table.live_blocks(), {d: sorted(f) for d, f in storage.free.items()}


def test_alloc_hands_out_pages_and_monotonic_handles() -> None:
    table, _ = make_table()
    a, b = table.alloc([16, 17], DType.FP16)
    assert (a.num_pages, b.num_pages) == (1, 2)
    assert a.pages == (0,) and b.pages == (1, 2)
    assert a.owner == b.owner == "p1" and a.device == "dev:0"
    table.free([a])
    (c,) = table.alloc([1], "bf16")
    assert c.handle > b.handle, "handles are never reused"
    assert c.pages == (3,) and c.dtype is DType.BF16
    assert table.live_blocks() == [b, c]


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "16", None])
def test_num_tokens_that_is_not_a_positive_int_is_refused(bad: object) -> None:
    table, storage = make_table()
    before = state(table, storage)
    with pytest.raises(InvalidArgumentError) as info:
        table.alloc([16, bad], DType.FP16)  # type: ignore[list-item]  # deliberately wrong type
    assert info.value.code is ErrorCode.INVALID_ARGUMENT and info.value.hint
    assert state(table, storage) == before


def test_num_tokens_beyond_what_the_storage_could_ever_hold_is_invalid_not_exhausted() -> None:
    table, _ = make_table(pages=4)
    with pytest.raises(InvalidArgumentError, match="could ever hold") as info:
        table.alloc([4 * 16 + 1], DType.FP16)
    assert not isinstance(info.value, ResourceExhaustedError)
    assert table.alloc([4 * 16], DType.FP16)[0].num_pages == 4


def test_dtype_outside_capability_is_a_capability_error_as_enum_or_string() -> None:
    table, _ = make_table()
    for dtype in (DType.FP32, "fp32", "INT8"):
        with pytest.raises(CapabilityError) as info:
            table.alloc([16], dtype)
        assert info.value.code is ErrorCode.NOT_IMPLEMENTED
        assert isinstance(info.value, NotImplementedError)
    with pytest.raises(InvalidArgumentError, match="unknown dtype"):
        table.alloc([16], "fp64")
    assert table.live_blocks() == []


def test_double_free_and_use_after_free_are_block_not_found() -> None:
    table, storage = make_table()
    (a,) = table.alloc([16], DType.FP16)
    table.free([a])
    before = state(table, storage)
    with pytest.raises(BlockNotFoundError) as info:
        table.free([a])
    assert info.value.code is ErrorCode.BLOCK_NOT_FOUND and isinstance(info.value, LookupError)
    with pytest.raises(BlockNotFoundError):
        table.lookup(a)
    assert state(table, storage) == before


def test_foreign_forged_and_altered_blocks_are_refused() -> None:
    table, storage = make_table(owner="p1")
    other, _ = make_table(owner="p2")
    (mine,) = table.alloc([16], DType.FP16)
    (theirs,) = other.alloc([16], DType.FP16)
    before = state(table, storage)
    with pytest.raises(InvalidBlockError) as info:
        table.free([theirs])
    assert info.value.code is ErrorCode.FOREIGN_BLOCK
    forged = KVBlock(99, 16, DType.FP16, "dev:0", (0,), "p1")
    with pytest.raises(InvalidBlockError, match="never allocated"):
        table.lookup(forged)
    altered = KVBlock(mine.handle, 32, mine.dtype, mine.device, mine.pages, mine.owner)
    with pytest.raises(InvalidBlockError, match="does not match"):
        table.free([altered])
    assert state(table, storage) == before


def test_batch_free_is_all_or_nothing_and_refuses_duplicates() -> None:
    table, storage = make_table()
    a, b = table.alloc([16, 16], DType.FP16)
    before = state(table, storage)
    with pytest.raises(InvalidArgumentError, match="more than once"):
        table.free([a, b, a])
    table.free([a])
    with pytest.raises(BlockNotFoundError):
        table.free([b, a])
    assert table.live_blocks() == [b]
    table.free([b])
    assert state(table, storage) != before and table.live_blocks() == []


def test_exhaustion_allocates_nothing() -> None:
    table, storage = make_table(pages=4)
    table.alloc([16], DType.FP16)
    before = state(table, storage)
    with pytest.raises(ResourceExhaustedError) as info:
        table.alloc([16, 16, 32], DType.FP16)
    assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED and isinstance(info.value, MemoryError)
    assert state(table, storage) == before
    assert len(table.alloc([16, 16, 16], DType.FP16)) == 3


def test_copy_checks_shape_dtype_and_distinct_destinations_before_issuing() -> None:
    table, _ = make_table()
    a, b, c, d = table.alloc([16, 16, 32, 16], DType.FP16)
    (h,) = table.alloc([16], DType.BF16)
    issued: list[tuple[list[KVBlock], list[KVBlock]]] = []
    table.copy([(a, b), (a, d)], lambda srcs, dsts: issued.append((srcs, dsts)))
    assert issued == [([a, a], [b, d])]
    with pytest.raises(InvalidBlockError) as info:
        table.copy([(a, c)], no_work)
    assert info.value.code is ErrorCode.KV_BLOCK_MISMATCH
    with pytest.raises(InvalidBlockError) as info:
        table.copy([(a, h)], no_work)
    assert info.value.code is ErrorCode.KV_BLOCK_MISMATCH
    with pytest.raises(InvalidArgumentError, match="more than once"):
        table.copy([(a, b), (h, b)], no_work)
    with pytest.raises(InvalidArgumentError, match="more than once"):
        table.copy([(a, a)], no_work)
    with pytest.raises(InvalidArgumentError, match="tuple"):
        table.copy([a], no_work)  # type: ignore[list-item]  # deliberately not a pair
    assert len(issued) == 1, "nothing refused was issued"


def test_migrate_moves_to_a_device_retires_the_source_and_keeps_pages_count() -> None:
    table, storage = make_table()
    a, b = table.alloc([16, 40], DType.FP16)
    issued: list[tuple[list[KVBlock], list[KVBlock]]] = []
    moved = table.migrate([a, b], "host", lambda srcs, dsts: issued.append((srcs, dsts)))
    assert issued == [([a, b], moved)]
    assert [m.device for m in moved] == ["host", "host"]
    assert [m.num_pages for m in moved] == [1, 3]
    assert moved[1].num_tokens == 40
    assert sorted(storage.free["dev:0"]) == list(range(16)), "source pages given back"
    with pytest.raises(BlockNotFoundError):
        table.lookup(a)
    assert table.live_blocks() == moved


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ("dev:7", "unknown device"),
        ("cuda:0", "unknown device"),
        ("dev 0", "malformed"),
        (3, "malformed"),
    ],
)
def test_migrate_to_bad_target_changes_nothing(target: object, match: str) -> None:
    table, storage = make_table()
    (a,) = table.alloc([16], DType.FP16)
    before = state(table, storage)
    with pytest.raises(InvalidArgumentError, match=match) as info:
        table.migrate([a], target, no_work)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    if match == "unknown device":
        assert "dev:0, dev:1, host" in str(info.value)
    assert state(table, storage) == before


def test_migrate_is_all_or_nothing() -> None:
    table, storage = make_table(pages=4)
    table.migrate(table.alloc([32], DType.FP16), "dev:1", no_work)
    blocks = table.alloc([32, 16], DType.FP16)
    before = state(table, storage)
    with pytest.raises(ResourceExhaustedError):
        table.migrate(blocks, "dev:1", no_work)
    with pytest.raises(InvalidArgumentError, match="already on dev:0"):
        table.migrate(blocks, "dev:0", no_work)
    with pytest.raises(InvalidArgumentError, match="more than once"):
        table.migrate([blocks[0], blocks[0]], "host", no_work)

    def failing(sources: list[KVBlock], destinations: list[KVBlock]) -> None:
        raise RuntimeError("the device refused the copy")

    with pytest.raises(RuntimeError, match="refused the copy"):
        table.migrate(blocks, "host", failing)
    assert state(table, storage) == before


def test_blocks_pickle_and_stay_valid() -> None:
    table, _ = make_table()
    (a,) = table.alloc([16], DType.FP16)
    clone = pickle.loads(pickle.dumps(a))
    assert clone == a
    table.free([clone])
    assert table.live_blocks() == []


def test_a_batch_mixing_given_handles_and_copies_takes_the_full_check() -> None:
    table, storage = make_table()
    a, b, c = table.alloc([16, 16, 16], DType.FP16)
    before = state(table, storage)
    with pytest.raises(InvalidArgumentError, match="more than once"):
        table.free([a, pickle.loads(pickle.dumps(a))])
    forged = KVBlock(c.handle, c.num_tokens, c.dtype, c.device, (15,), c.owner)
    with pytest.raises(InvalidBlockError, match="does not match"):
        table.free([a, b, forged])
    assert state(table, storage) == before
    table.free([a, pickle.loads(pickle.dumps(b))])
    assert table.live_blocks() == [c]
    assert sorted(storage.free["dev:0"]) == [p for p in range(16) if p not in c.pages]


def test_threads_end_with_exact_accounting() -> None:
    table, storage = make_table(pages=10_000)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(200):
                blocks = table.alloc([16, 33], DType.FP16)
                table.free(blocks)
            table.alloc([16], DType.FP16)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    live = table.live_blocks()
    assert len(live) == 8
    assert len({b.handle for b in live}) == 8
    assert len(storage.free["dev:0"]) == 10_000 - 8
    assert len({p for b in live for p in b.pages}) == 8, "no page handed out twice"


class DeviceWork:
    """A fence on work a device runs by itself: done once :meth:`finish` (or a wait) ran it."""

    def __init__(self) -> None:
        self.done = False
        self.waited = 0

    def finish(self) -> None:
        self.done = True

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited += 1
        self.done = True


def free_pages(storage: PageListStorage, device: str = "dev:0") -> set[int]:
    return set(storage.free[device])


def test_sources_of_a_migration_on_another_stream_wait_for_its_event() -> None:
    table, storage = make_table(pages=4)
    blocks = table.alloc([16, 16], DType.FP16)
    work = DeviceWork()
    table.migrate(blocks, "host", lambda srcs, dsts: work)
    sources = {b.pages[0] for b in blocks}
    assert not sources & free_pages(storage), "pending while the copy out of them runs"
    assert table.reclaim() == 2
    fresh = table.alloc([16, 16], DType.FP16)
    assert not {b.pages[0] for b in fresh} & sources and not work.waited, "other pages first"
    work.finish()
    assert table.reclaim() == 0 and sources <= free_pages(storage)


def test_a_free_with_after_waits_only_when_the_storage_is_short() -> None:
    table, storage = make_table(pages=3)
    a, b, c = table.alloc([16, 16, 16], DType.FP16)
    work = DeviceWork()
    table.free([a, b], after=work)
    assert free_pages(storage) == set() and table.reclaim() == 2
    (d,) = table.alloc([16], DType.FP16)
    assert work.waited == 1, "nothing else free: the allocation waited for the event"
    assert d.pages[0] in {a.pages[0], b.pages[0]} and table.reclaim() == 0
    table.free([c, d], after=DeviceWork())
    with pytest.raises(BlockNotFoundError):
        table.free([c], after=DeviceWork())  # c is already freed: refused, not pending again
    assert table.reclaim() == 2


def test_frees_while_work_on_another_stream_is_in_flight_wait_for_it() -> None:
    table, storage = make_table(pages=4)
    a, b, c = table.alloc([16, 16, 16], DType.FP16)
    copy = DeviceWork()
    table.copy([(a, b)], lambda srcs, dsts: copy)
    table.free_one(c)
    table.free([a])
    assert not {a.pages[0], c.pages[0]} & free_pages(storage)
    copy.finish()
    table.free_one(b)
    assert b.pages[0] in free_pages(storage), "nothing in flight any more: released at once"
    assert table.reclaim() == 0 and {a.pages[0], c.pages[0]} <= free_pages(storage)


def test_work_on_the_current_stream_releases_at_once() -> None:
    table, storage = make_table(pages=2)
    a, b = table.alloc([16, 16], DType.FP16)
    table.copy([(a, b)], no_work)
    table.migrate([a], "host", no_work)
    assert a.pages[0] in free_pages(storage) and table.reclaim() == 0


def test_close_waits_for_every_event_and_refuses_later_calls() -> None:
    table, storage = make_table(pages=4)
    a, b, c = table.alloc([16, 16, 16], DType.FP16)
    in_flight, after = DeviceWork(), DeviceWork()
    table.copy([(a, b)], lambda srcs, dsts: in_flight)
    table.free([c], after=after)
    table.close("closed for the test")
    assert in_flight.waited == 1 and after.waited == 1
    assert free_pages(storage) == set(range(4)) and free_pages(storage, "host") == set(range(16))
    for call in (
        lambda: table.alloc([16], DType.FP16),
        lambda: table.alloc_one(16, DType.FP16),
        lambda: table.free([a]),
        lambda: table.free_one(a),
        lambda: table.live_blocks(),
    ):
        with pytest.raises(BackendUnavailableError, match="closed for the test"):
            call()


def test_grow_appends_pages_keeps_the_handle_and_refuses_the_old_value() -> None:
    table, storage = make_table(pages=8)
    a, b = table.alloc([10, 16], DType.FP16)
    same, grown = table.grow([a, b], [10, 40])
    assert same is a, "an unchanged count keeps the block as it is"
    assert grown.handle == b.handle and grown.pages[:1] == b.pages and grown.num_pages == 3
    assert grown.num_tokens == 40 and table.lookup(grown) is grown
    with pytest.raises(BlockNotFoundError, match="was grown") as info:
        table.free([b])
    assert "kv_block_grow" in (info.value.hint or "")
    (within,) = table.grow([a], [16])
    assert within.pages == a.pages and within.num_tokens == 16
    before = state(table, storage)
    with pytest.raises(InvalidArgumentError, match="cannot grow to 8"):
        table.grow([within], [8])
    with pytest.raises(InvalidArgumentError, match="more than once"):
        table.grow([within, within], [32, 32])
    with pytest.raises(InvalidArgumentError, match="one token count per block"):
        table.grow([within], [32, 48])
    with pytest.raises(ResourceExhaustedError):
        table.grow([within, grown], [16 * 4, 16 * 6])  # 3 + 3 more pages, 4 free
    with pytest.raises(InvalidArgumentError, match="could ever hold"):
        table.grow([within], [16 * 9])
    assert state(table, storage) == before, "refused growth changes nothing"
