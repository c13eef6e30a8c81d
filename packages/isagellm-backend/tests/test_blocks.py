"""BlockTable, the shared KV block bookkeeping, over a page free-list storage like a torch pool."""

from __future__ import annotations

import gc
import itertools
import pickle
import random
import threading
from collections.abc import Callable, Sequence
from fractions import Fraction

import pytest

from sagellm_backend import blocks as block_table
from sagellm_backend.blocks import (
    HANDLE_BITS,
    BlockTable,
    Give,
    Pages,
    Pool,
    Take,
    Transfer,
    blocks_of,
    total_pages,
)
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
from sagellm_backend.kv import KVBlock, KVBlockInfo, KVLayout

LAYOUT = KVLayout(tokens_per_block=16)
DTYPES = (DType.FP16, DType.BF16)
DEV0 = Pool(0, "dev:0", DType.FP16)
"""Pool 0: the default device's first dtype (the table numbers it at construction)."""


class PageListStorage:
    """A fixed pool of pages per device with a free-list: what a preallocated torch pool does.

    Page ``i`` of a device is page id ``pool.base + i`` in every pool (dtype) of that device.
    With ``single_block``, one-page blocks of the default device take the table's single-block
    path (:meth:`taker`, :meth:`giver`); without it every call takes the batch path.
    """

    def __init__(self, pages_per_device: dict[str, int], *, single_block: bool = False) -> None:
        self.free = {d: list(range(n)) for d, n in pages_per_device.items()}
        self.size = dict(pages_per_device)
        self.single_block = single_block

    def max_pages(self, pool: Pool) -> int:
        return self.size[pool.device]

    def allocate(self, requests: Sequence[tuple[Pool, Sequence[int]]]) -> list[list[Pages]]:
        needed: dict[str, int] = {}
        for pool, page_counts in requests:
            assert page_counts and min(page_counts) >= 1
            needed[pool.device] = needed.get(pool.device, 0) + sum(page_counts)
        for device, total in needed.items():
            if total > len(self.free[device]):
                raise ResourceExhaustedError(f"{device}: {total} pages needed", hint="free some")
        out: list[list[Pages]] = []
        for pool, counts in requests:
            ids = [pool.base + self.free[pool.device].pop(0) for _ in range(sum(counts))]
            blocks = blocks_of(ids, counts)
            assert all(isinstance(p, int) == (n == 1) for p, n in zip(blocks, counts, strict=True))
            out.append(blocks)
        return out

    def release(self, pool: Pool, pages: Sequence[int]) -> None:
        local = [p - pool.base for p in pages]
        assert all(type(p) is int for p in pages), "page ids, one per page"
        assert all(0 <= i < self.size[pool.device] for i in local), "page ids of this pool"
        self.free[pool.device].extend(local)

    def taker(self, pool: Pool) -> Take | None:
        if not self.single_block:
            return None
        free = self.free[pool.device]
        return lambda: pool.base + free.pop(0)

    def giver(self, pool: Pool) -> Give | None:
        if not self.single_block:
            return None
        free = self.free[pool.device]
        return lambda page: free.append(page - pool.base)

    def free_ids(self, pool: Pool) -> list[int] | None:
        return None  # its free lists hold page indices, not page ids


def make_table(
    pages: int = 16, *, single_block: bool = False
) -> tuple[BlockTable, PageListStorage]:
    storage = PageListStorage(
        {"dev:0": pages, "dev:1": pages, "host": 4 * pages}, single_block=single_block
    )
    table = BlockTable(
        storage,
        layout=LAYOUT,
        dtypes=DTYPES,
        devices={"dev:0", "dev:1", "host"},
        default_device="dev:0",
        devices_hint="use one of dev:0, dev:1, host",
        guard=refuse_nothing,
        own_event=own_work,
    )
    return table, storage


def refuse_nothing(operation: str) -> None:
    """The guard of a provider that is open and not capturing."""


def own_work(event: object) -> DeviceWork:
    if not isinstance(event, DeviceWork):
        raise InvalidArgumentError(f"{event!r} is not device work", hint="pass a DeviceWork")
    return event


def no_work(transfers: list[Transfer]) -> None:
    """The data movement of a table without data: nothing, on the current stream."""


def state(table: BlockTable, storage: PageListStorage) -> object:
    return table.live_blocks(), {d: sorted(f) for d, f in storage.free.items()}


def pages(table: BlockTable, block: KVBlock) -> tuple[int, ...]:
    return table.info(block).pages


def test_alloc_hands_out_pages_and_monotonic_int_handles() -> None:
    table, _ = make_table()
    a, b = table.alloc([16, 17], DType.FP16)
    assert type(a) is int and type(b) is int
    ia, ib = table.info(a), table.info(b)
    assert (ia.num_pages, ib.num_pages) == (1, 2)
    assert ia == KVBlockInfo(a, "dev:0", DType.FP16, (0,))
    assert ib == KVBlockInfo(b, "dev:0", DType.FP16, (1, 2))
    table.free([a])
    (c,) = table.alloc([1], "bf16")
    assert c > b > a, "handles are never reused"
    ic = table.info(c)
    assert ic.pages == (3,) and ic.dtype is DType.BF16 and ic.device == "dev:0"
    assert table.live_blocks() == [ib, ic]
    assert table.live_blocks() == [table.info(b), table.info(c)], "info is stable"


def test_handles_of_two_tables_never_collide() -> None:
    table, _ = make_table(pages=64)
    other, _ = make_table(pages=64)
    mine, theirs = table.alloc([16] * 50, DType.FP16), other.alloc([16] * 50, DType.FP16)
    assert not set(mine) & set(theirs)
    assert {h >> HANDLE_BITS for h in mine} != {h >> HANDLE_BITS for h in theirs}


def test_a_tag_comes_round_again_only_for_tables_that_no_longer_exist(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table, _ = make_table()
    mine = table.alloc_one(16, DType.FP16)
    tag = mine >> HANDLE_BITS
    # Each new table is offered this table's tag first, then the next.
    monkeypatch.setattr(block_table, "_tags", iter([tag, tag + 1, tag, tag + 1]))
    gone, _ = make_table()
    assert gone.alloc_one(16, DType.FP16) >> HANDLE_BITS == tag + 1
    del gone
    gc.collect()
    other, _ = make_table()
    theirs = other.alloc_one(16, DType.FP16)
    assert theirs >> HANDLE_BITS == tag + 1, "the tag of a table that is gone is free again"
    with pytest.raises(InvalidBlockError, match="another provider"):
        other.free([mine])
    assert other.live_blocks() == [other.info(theirs)]
    monkeypatch.setattr(block_table, "_TAG_BITS", 1)  # two tags
    monkeypatch.setattr(block_table, "_tags", itertools.count())
    held = [make_table()[0], make_table()[0]]
    with pytest.raises(ResourceExhaustedError, match="as many as there are tags"):
        make_table()
    assert len(held) == 2


def test_handles_are_two_digit_ints_and_their_serial_numbers_run_out_cleanly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table, _ = make_table()
    handle = table.alloc_one(16, DType.FP16)
    assert 1 << 30 < handle < 1 << 60, "no small int, and two 30-bit digits"
    # A table with 3 serial bits gives out handles 1 to 6, then refuses on every path.
    monkeypatch.setattr(block_table, "HANDLE_BITS", 3)
    monkeypatch.setattr(block_table, "_SERIALS", 6)
    table, storage = make_table(single_block=True)
    a, b = table.alloc([16, 16], DType.FP16)
    c = table.alloc_one(16, DType.FP16)
    (d,) = table.migrate([a], "dev:1", no_work)
    e, f = table.alloc([16, 16], DType.FP16)
    assert [x & 7 for x in (b, c, d, e, f)] == [2, 3, 4, 5, 6]
    before = state(table, storage)
    for call in (
        lambda: table.alloc_one(16, DType.FP16),
        lambda: table.alloc([16], DType.FP16),
        lambda: table.migrate([b], "host", no_work),
    ):
        with pytest.raises(ResourceExhaustedError, match="all its 6 KV block handles") as info:
            call()
        assert info.value.hint and "never reused" in info.value.hint
        assert state(table, storage) == before, "a refused call changes nothing"
    table.free([b, c, d, e, f])
    with pytest.raises(BlockNotFoundError):
        table.free([f])
    with pytest.raises(InvalidBlockError, match="never allocated"):
        table.free([KVBlock(f + 1)])


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "16", None])
def test_num_tokens_that_is_not_a_positive_int_is_refused(bad: object) -> None:
    table, storage = make_table()
    before = state(table, storage)
    with pytest.raises(InvalidArgumentError) as info:
        table.alloc([16, bad], DType.FP16)  # type: ignore[list-item]  # deliberately wrong type
    assert info.value.code is ErrorCode.INVALID_ARGUMENT and info.value.hint
    with pytest.raises(InvalidArgumentError):
        table.alloc_one(bad, DType.FP16)  # type: ignore[arg-type]  # deliberately wrong type
    assert state(table, storage) == before


def test_num_tokens_beyond_what_the_storage_could_ever_hold_is_invalid_not_exhausted() -> None:
    table, storage = make_table(pages=4)
    before = state(table, storage)
    block = table.alloc([16], DType.FP16)[0]
    for huge in (4 * 16 + 1, 10**400, 2**80 + 1):
        calls: list[Callable[[int], object]] = [
            lambda n: table.alloc([n], DType.FP16),
            lambda n: table.alloc([16, n], DType.FP16),
            lambda n: table.alloc_one(n, DType.FP16),
            lambda n: table.grow([block], [n]),
        ]
        for call in calls:
            with pytest.raises(InvalidArgumentError, match="could ever hold") as info:
                call(huge)
            assert not isinstance(info.value, ResourceExhaustedError)
    table.free([block])
    assert state(table, storage) == before
    assert table.info(table.alloc([4 * 16], DType.FP16)[0]).num_pages == 4


def test_a_count_equal_to_an_int_of_the_batch_counts_as_it_in_either_order() -> None:
    table, _ = make_table()
    for counts in ([16, 16.0], [16.0, 16], [1, True], [True, 1], [40, 16.0, 16]):
        blocks = table.alloc(counts, DType.FP16)  # type: ignore[arg-type]  # equal to ints
        assert [table.info(b).num_pages for b in blocks] == [-(-int(n) // 16) for n in counts]
        table.free(blocks)
    for alone in ([16.0], [True], [16.0, 32.0], [16, 16.5]):
        with pytest.raises(InvalidArgumentError, match="must be an int"):
            table.alloc(alone, DType.FP16)  # type: ignore[arg-type]  # deliberately not ints


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
    assert f"{a:#x}" in str(info.value)
    for call in (
        lambda: table.info(a),
        lambda: table.free_one(a),
        lambda: table.check_live([a]),
        lambda: table.pages_on([a], "dev:0"),
        lambda: table.grow([a], [32]),
        lambda: table.migrate([a], "host", no_work),
        lambda: table.copy([(a, a)], no_work),
    ):
        with pytest.raises(BlockNotFoundError):
            call()
    assert state(table, storage) == before


def test_foreign_and_never_given_handles_are_invalid_blocks() -> None:
    table, storage = make_table()
    other, _ = make_table()
    (mine,) = table.alloc([16], DType.FP16)
    (theirs,) = other.alloc([16], DType.FP16)
    before = state(table, storage)
    for call in (
        lambda: table.free([theirs]),
        lambda: table.free_one(theirs),
        lambda: table.info(theirs),
        lambda: table.grow([mine, theirs], [32, 32]),
        lambda: table.copy([(mine, theirs)], no_work),
        lambda: table.migrate([mine, theirs], "host", no_work),
        lambda: table.pages_on([mine, theirs], "dev:0"),
    ):
        with pytest.raises(InvalidBlockError) as info:
            call()
        assert info.value.code is ErrorCode.FOREIGN_BLOCK, call
        assert "another provider" in str(info.value)
    tag = mine >> HANDLE_BITS << HANDLE_BITS
    never = [mine + 1000, tag, -1, 0, 1 << 200]
    for forged in never:
        with pytest.raises(InvalidBlockError) as info:
            table.free([KVBlock(forged)])
        assert info.value.code is ErrorCode.FOREIGN_BLOCK
    with pytest.raises(InvalidBlockError, match="never allocated"):
        table.info(KVBlock(mine + 1000))
    assert state(table, storage) == before
    assert other.info(theirs).pages == (0,), "the other table is untouched"


@pytest.mark.parametrize("bad", [True, False, 1.0, "1", None, b"\x01", (1,)])
def test_a_handle_that_is_not_an_int_is_an_invalid_argument(bad: object) -> None:
    table, storage = make_table()
    a, b = table.alloc([16, 16], DType.FP16)
    before = state(table, storage)
    handle = KVBlock(bad)  # type: ignore[arg-type]  # deliberately not an int
    for call in (
        lambda: table.free([a, handle]),
        lambda: table.free_one(handle),
        lambda: table.info(handle),
        lambda: table.check_live([a, handle]),
        lambda: table.pages_on([a, handle], "dev:0"),
        lambda: table.grow([a, handle], [32, 32]),
        lambda: table.copy([(a, handle)], no_work),
        lambda: table.copy([(handle, b)], no_work),
        lambda: table.migrate([a, handle], "host", no_work),
    ):
        with pytest.raises(InvalidArgumentError) as info:
            call()
        assert type(info.value) is InvalidArgumentError, "not a block error: not a handle at all"
        assert info.value.code is ErrorCode.INVALID_ARGUMENT and info.value.hint
    with pytest.raises(InvalidArgumentError, match="one int"):
        table.free(a)  # type: ignore[arg-type]  # deliberately one handle, not a list
    assert state(table, storage) == before


def test_a_refused_batch_puts_back_blocks_it_named_by_an_equal_value_as_ints() -> None:
    table, storage = make_table()
    a, b = table.alloc([16, 16], DType.FP16)
    table.free([b])
    before = state(table, storage)
    equal = Fraction(a)  # equal to the handle, and of the same hash
    for call in (
        lambda: table.free([equal, b]),  # type: ignore[list-item]  # deliberately not an int
        lambda: table.migrate([equal, b], "host", no_work),  # type: ignore[list-item]
    ):
        with pytest.raises((BlockNotFoundError, InvalidArgumentError)):
            call()
        assert state(table, storage) == before
        assert [type(i.block) for i in table.live_blocks()] == [int]
        assert table.info(a).block == a

    def failing(transfers: list[Transfer]) -> None:
        raise RuntimeError("the device refused the copy")

    with pytest.raises(RuntimeError, match="refused the copy"):
        table.migrate([equal], "host", failing)  # type: ignore[list-item]
    assert state(table, storage) == before and table.info(a).block == a


def test_batch_free_is_all_or_nothing_and_refuses_duplicates() -> None:
    table, storage = make_table()
    a, b = table.alloc([16, 16], DType.FP16)
    before = state(table, storage)
    with pytest.raises(InvalidArgumentError, match="more than once"):
        table.free([a, b, a])
    assert state(table, storage) == before
    table.free([a])
    with pytest.raises(BlockNotFoundError):
        table.free([b, a])
    assert table.live_blocks() == [table.info(b)]
    table.free([b])
    assert state(table, storage) != before and table.live_blocks() == []


@pytest.mark.parametrize("single_block", [False, True])
def test_exhaustion_allocates_nothing(single_block: bool) -> None:
    table, storage = make_table(pages=4, single_block=single_block)
    table.alloc_one(16, DType.FP16)
    before = state(table, storage)
    with pytest.raises(ResourceExhaustedError) as info:
        table.alloc([16, 16, 32], DType.FP16)
    assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED and isinstance(info.value, MemoryError)
    assert state(table, storage) == before
    blocks = [table.alloc_one(16, DType.FP16) for _ in range(3)]
    with pytest.raises(ResourceExhaustedError):
        table.alloc_one(16, DType.FP16)
    assert state(table, storage) != before
    assert sorted(p for b in blocks for p in pages(table, b)) == [1, 2, 3]


@pytest.mark.parametrize("single_block", [False, True])
def test_single_blocks_free_and_reuse_their_pages(single_block: bool) -> None:
    table, storage = make_table(pages=2, single_block=single_block)
    a, b = table.alloc_one(16, DType.FP16), table.alloc_one(16, DType.FP16)
    assert {pages(table, a), pages(table, b)} == {(0,), (1,)}
    table.free_one(a)
    c = table.alloc_one(16, DType.FP16)
    assert c not in (a, b) and pages(table, c) == table.live_blocks()[-1].pages
    with pytest.raises(BlockNotFoundError):
        table.free_one(a)
    table.free_one(b)
    table.free_one(c)
    assert table.live_blocks() == [] and sorted(storage.free["dev:0"]) == [0, 1]


@pytest.mark.parametrize("single_block", [False, True])
@pytest.mark.parametrize("release", ["free_one", "free", "migrate"])
def test_a_block_of_the_second_dtype_stays_in_its_pool(single_block: bool, release: str) -> None:
    table, storage = make_table(pages=4, single_block=single_block)
    b = table.alloc_one(16, DType.BF16)  # pool 1: the default device's second dtype
    assert table.info(b) == KVBlockInfo(b, "dev:0", DType.BF16, (0,))
    assert table.pages_on([b], "dev:0") == [(0,)], "page indices, not page ids"
    with pytest.raises(InvalidArgumentError, match="is on dev:0, not on dev:1"):
        table.pages_on([b], "dev:1")
    if release == "free_one":
        table.free_one(b)
    elif release == "free":
        table.free([b])
    else:
        (moved,) = table.migrate([b], "host", no_work)
        assert table.info(moved).dtype is DType.BF16
        table.free([moved])
    assert sorted(storage.free["dev:0"]) == [0, 1, 2, 3], "given back to the pool it came from"
    a = table.alloc_one(16, DType.FP16)
    assert table.info(a) == KVBlockInfo(a, "dev:0", DType.FP16, table.info(a).pages)
    assert table.pages_on([a], "dev:0") == [table.info(a).pages]


def test_copy_checks_shape_dtype_and_distinct_destinations_before_issuing() -> None:
    table, _ = make_table()
    a, b, c, d = table.alloc([16, 16, 32, 16], DType.FP16)
    (h,) = table.alloc([16], DType.BF16)
    issued: list[list[Transfer]] = []

    def issue(transfers: list[Transfer]) -> None:
        issued.append(transfers)

    table.copy([(a, b), (a, d)], issue)
    assert issued == [[Transfer(DEV0, DEV0, [0, 0], [1, 4])]]
    with pytest.raises(InvalidBlockError) as info:
        table.copy([(a, c)], issue)
    assert info.value.code is ErrorCode.KV_BLOCK_MISMATCH
    with pytest.raises(InvalidBlockError) as info:
        table.copy([(a, h)], issue)
    assert info.value.code is ErrorCode.KV_BLOCK_MISMATCH
    with pytest.raises(InvalidBlockError) as info:
        table.copy([(a, b), (c, d)], issue)
    assert info.value.code is ErrorCode.KV_BLOCK_MISMATCH, "the whole batch is checked"
    with pytest.raises(InvalidArgumentError, match="more than once"):
        table.copy([(a, b), (h, b)], issue)
    with pytest.raises(InvalidArgumentError, match="more than once"):
        table.copy([(a, a)], issue)
    with pytest.raises(InvalidArgumentError, match="tuple"):
        table.copy([a], issue)  # type: ignore[list-item]  # deliberately not a pair
    assert len(issued) == 1, "nothing refused was issued"


def test_copy_between_pools_issues_one_transfer_per_pool_pair() -> None:
    table, _ = make_table()
    a, b, c = table.alloc([16, 16, 40], DType.FP16)
    (moved,) = table.migrate([c], "host", no_work)
    (d,) = table.alloc([40], DType.FP16)
    issued: list[list[Transfer]] = []
    table.copy([(a, b), (moved, d)], lambda t: issued.append(t))
    host = Pool(2, "host", DType.FP16)
    assert issued == [
        [
            Transfer(DEV0, DEV0, [0], [1]),
            Transfer(host, DEV0, [host.base + p for p in pages(table, moved)], [5, 6, 7]),
        ]
    ], "page ids: a page of pool 2 is its index above the pool's base"
    assert list(pages(table, d)) == [5, 6, 7]


def test_migrate_moves_to_a_device_retires_the_source_and_keeps_the_page_count() -> None:
    table, storage = make_table()
    a, b = table.alloc([16, 40], DType.FP16)
    issued: list[list[Transfer]] = []
    moved = table.migrate([a, b], "host", lambda t: issued.append(t))
    host = Pool(2, "host", DType.FP16)
    assert issued == [[Transfer(DEV0, host, [0, 1, 2, 3], [host.base + p for p in range(4)])]]
    assert min(moved) > b and len(set(moved)) == 2, "new handles"
    infos = [table.info(m) for m in moved]
    assert [i.device for i in infos] == ["host", "host"]
    assert [i.pages for i in infos] == [(0,), (1, 2, 3)], "page indices of the host pool"
    assert sorted(storage.free["dev:0"]) == list(range(16)), "source pages given back"
    for stale in (a, b):
        with pytest.raises(BlockNotFoundError):
            table.info(stale)
    assert table.live_blocks() == infos
    assert table.live_blocks("host") == infos and table.live_blocks("dev:0") == []
    assert table.blocks_on("host") == 2 and table.blocks_on("dev:0") == 0


@pytest.mark.parametrize(
    "sources",
    [("host", "dev:1", "host", "dev:1"), ("host", "host"), ("dev:1", "dev:1")],
    ids=["two pools", "the last pool", "a pool below the last"],
)
def test_a_migration_issues_one_transfer_per_source_pool(sources: tuple[str, ...]) -> None:
    table, _ = make_table()
    pools: dict[str, Pool] = {}
    for device in ("dev:1", "host"):  # host's pool is numbered last
        issued: list[list[Transfer]] = []
        table.migrate(table.alloc([16], DType.FP16), device, issued.append)
        pools[device] = issued[0][0].target
    assert pools["dev:1"].number < pools["host"].number
    blocks = [table.migrate(table.alloc([16], DType.FP16), d, no_work)[0] for d in sources]
    ids = [pools[d].base + pages(table, b)[0] for d, b in zip(sources, blocks, strict=True)]
    issued.clear()
    moved = table.migrate(blocks, "dev:0", issued.append)
    (transfers,) = issued
    targets = [pages(table, m)[0] for m in moved]
    assert transfers == [
        Transfer(
            pools[device],
            DEV0,
            [i for d, i in zip(sources, ids, strict=True) if d == device],
            [t for d, t in zip(sources, targets, strict=True) if d == device],
        )
        for device in dict.fromkeys(sources)
    ]
    assert [table.info(m).device for m in moved] == ["dev:0"] * len(sources)


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

    def failing(transfers: list[Transfer]) -> None:
        raise RuntimeError("the device refused the copy")

    with pytest.raises(RuntimeError, match="refused the copy"):
        table.migrate(blocks, "host", failing)
    assert state(table, storage) == before
    assert [table.info(b).device for b in blocks] == ["dev:0", "dev:0"], (
        "still live where they were"
    )


def test_pages_on_gives_each_blocks_pages_and_refuses_another_device() -> None:
    table, _ = make_table()
    a, b = table.alloc([16, 40], DType.FP16)
    assert table.pages_on([a, b, a], "dev:0") == [(0,), (1, 2, 3), (0,)], "repeats allowed"
    assert table.pages_on([], "dev:0") == []
    table.free([a])
    assert table.pages_on([b], "dev:0") == [(1, 2, 3)], "every live block has several pages"
    (a,) = table.alloc([16], DType.FP16)
    (h,) = table.migrate([b], "host", no_work)
    assert table.pages_on([h], "host") == [(0, 1, 2)]
    with pytest.raises(InvalidArgumentError, match="is on host, not on dev:0") as info:
        table.pages_on([a, h], "dev:0")
    assert type(info.value) is InvalidArgumentError and "kv_blocks_migrate" in (
        info.value.hint or ""
    )
    table.check_live([a, h, a])
    with pytest.raises(BlockNotFoundError):
        table.check_live([a, b])


def test_blocks_pickle_and_stay_valid() -> None:
    table, _ = make_table()
    (a,) = table.alloc([16], DType.FP16)
    clone: KVBlock = pickle.loads(pickle.dumps(a))
    assert clone == a and type(pickle.loads(pickle.dumps(a))) is int
    assert table.info(clone) == table.info(a)
    table.free([clone])
    assert table.live_blocks() == []
    with pytest.raises(BlockNotFoundError):
        table.free([a])


def test_a_batch_mixing_given_handles_and_copies_takes_the_full_check() -> None:
    table, storage = make_table()
    a, b, c = table.alloc([16, 16, 16], DType.FP16)
    before = state(table, storage)
    with pytest.raises(InvalidArgumentError, match="more than once"):
        table.free([a, pickle.loads(pickle.dumps(a))])
    with pytest.raises(InvalidBlockError, match="never allocated"):
        table.free([a, b, KVBlock(c + 1)])
    assert state(table, storage) == before
    table.free([a, pickle.loads(pickle.dumps(b))])
    assert table.live_blocks() == [table.info(c)]
    assert sorted(storage.free["dev:0"]) == [p for p in range(16) if p not in pages(table, c)]


@pytest.mark.parametrize("single_block", [False, True])
def test_threads_end_with_exact_accounting(single_block: bool) -> None:
    table, storage = make_table(pages=10_000, single_block=single_block)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(200):
                blocks = table.alloc([16, 33], DType.FP16)
                one = table.alloc_one(16, DType.FP16)
                table.free(blocks)
                table.free_one(one)
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
    assert len({b.block for b in live}) == 8
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
    sources = {pages(table, b)[0] for b in blocks}
    work = DeviceWork()
    table.migrate(blocks, "host", lambda transfers: work)
    assert not sources & free_pages(storage), "pending while the copy out of them runs"
    assert table.reclaim() == 2
    fresh = table.alloc([16, 16], DType.FP16)
    assert not {pages(table, b)[0] for b in fresh} & sources and not work.waited, "others first"
    work.finish()
    assert table.reclaim() == 0 and sources <= free_pages(storage)


def test_a_free_with_after_waits_only_when_the_storage_is_short() -> None:
    table, storage = make_table(pages=3)
    a, b, c = table.alloc([16, 16, 16], DType.FP16)
    freed = {pages(table, a)[0], pages(table, b)[0]}
    work = DeviceWork()
    table.free([a, b], after=work)
    assert free_pages(storage) == set() and table.reclaim() == 2
    (d,) = table.alloc([16], DType.FP16)
    assert work.waited == 1, "nothing else free: the allocation waited for the event"
    assert pages(table, d)[0] in freed and table.reclaim() == 0
    table.free([c, d], after=DeviceWork())
    with pytest.raises(BlockNotFoundError):
        table.free([c], after=DeviceWork())  # c is already freed: refused, not pending again
    assert table.reclaim() == 2


def test_frees_while_work_on_another_stream_is_in_flight_wait_for_it() -> None:
    table, storage = make_table(pages=4)
    a, b, c = table.alloc([16, 16, 16], DType.FP16)
    pa, pb, pc = (pages(table, x)[0] for x in (a, b, c))
    copy = DeviceWork()
    table.copy([(a, b)], lambda transfers: copy)
    table.free_one(c)
    table.free([a])
    assert not {pa, pc} & free_pages(storage)
    copy.finish()
    table.free_one(b)
    assert pb in free_pages(storage), "nothing in flight any more: released at once"
    assert table.reclaim() == 0 and {pa, pc} <= free_pages(storage)


def test_work_on_the_current_stream_releases_at_once() -> None:
    table, storage = make_table(pages=2)
    a, b = table.alloc([16, 16], DType.FP16)
    pa = pages(table, a)[0]
    table.copy([(a, b)], no_work)
    table.migrate([a], "host", no_work)
    assert pa in free_pages(storage) and table.reclaim() == 0


def test_close_waits_for_every_event_and_refuses_later_calls() -> None:
    table, storage = make_table(pages=4)
    a, b, c = table.alloc([16, 16, 16], DType.FP16)
    in_flight, after = DeviceWork(), DeviceWork()
    table.copy([(a, b)], lambda transfers: in_flight)
    table.free([c], after=after)
    table.close("closed for the test")
    assert in_flight.waited == 1 and after.waited == 1
    assert free_pages(storage) == set(range(4)) and free_pages(storage, "host") == set(range(16))
    table.close("again")  # idempotent
    for call in (
        lambda: table.alloc([16], DType.FP16),
        lambda: table.alloc_one(16, DType.FP16),
        lambda: table.free([a]),
        lambda: table.free_one(a),
        lambda: table.info(a),
        lambda: table.grow([a], [32]),
        lambda: table.live_blocks(),
    ):
        with pytest.raises(BackendUnavailableError, match="closed for the test"):
            call()


def test_grow_appends_pages_in_place_and_keeps_the_handle() -> None:
    table, storage = make_table(pages=8)
    a, b = table.alloc([10, 16], DType.FP16)
    assert table.grow([a, b], [10, 40]) == [a, b], "the same handles come back"
    assert pages(table, a) == (0,), "an unchanged count keeps the block as it is"
    assert pages(table, b) == (1, 2, 3), "the old page first, the new ones appended"
    assert table.info(b).num_pages == 3
    assert table.grow([a], [16]) == [a] and pages(table, a) == (0,), "fits in its page already"
    before = state(table, storage)
    assert table.grow([b], [8]) == [b], "growing to fewer tokens is a no-op, not an error"
    assert table.grow([b, a], [33, 1]) == [b, a]
    assert state(table, storage) == before and pages(table, b) == (1, 2, 3)
    table.free([b])  # the handle from before the growth is the live one
    assert sorted(storage.free["dev:0"]) == [1, 2, 3, 4, 5, 6, 7]


def test_refused_growth_changes_nothing() -> None:
    table, storage = make_table(pages=8)
    a, b = table.alloc([16, 40], DType.FP16)
    (h,) = table.migrate(table.alloc([16], DType.FP16), "host", no_work)
    dead = table.alloc_one(16, DType.FP16)
    table.free_one(dead)
    before = state(table, storage)
    refusals: list[tuple[list[KVBlock], list[int], type[Exception], str]] = [
        ([a], [0], InvalidArgumentError, "positive"),
        ([a, b], [32, -16], InvalidArgumentError, "positive"),
        ([a], [True], InvalidArgumentError, "must be an int"),
        ([a, a], [32, 32], InvalidArgumentError, "more than once"),
        ([a], [32, 48], InvalidArgumentError, "one token count per block"),
        ([a, b], [16 * 4, 16 * 5], ResourceExhaustedError, "dev:0"),  # 3 + 2 more, 4 free
        ([a], [16 * 9], InvalidArgumentError, "could ever hold"),
        ([h, a], [16 * 20, 16 * 7], ResourceExhaustedError, "dev:0"),  # host fits, dev:0 not
        ([a, dead], [32, 32], BlockNotFoundError, "freed"),
    ]
    for blocks, counts, error, match in refusals:
        with pytest.raises(error, match=match):
            table.grow(blocks, counts)
        assert state(table, storage) == before, (blocks, counts)
    assert table.grow([h, a], [16 * 20, 16 * 5]) == [h, a]
    assert table.info(h).num_pages == 20 and table.info(a).num_pages == 5


def test_single_block_calls_and_batches_never_share_a_page_under_thread_switches(
    switching_threads: Callable[[Callable[[int], None], int], None],
) -> None:
    """Threads switch every microsecond while they mix the single-block path (which takes the
    table's token without blocking) with batches (which queue for it): every page handed out is
    owned by one block at a time."""
    table, storage = make_table(pages=4096, single_block=True)
    owner: dict[int, KVBlock] = {}
    errors: list[BaseException] = []

    def own(block: KVBlock) -> None:
        for page in pages(table, block):
            holder = owner.setdefault(page, block)
            assert holder == block, f"page {page} of {block:#x} is also {holder:#x}'s"

    def disown(block: KVBlock) -> None:
        for page in pages(table, block):
            del owner[page]

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        held: list[KVBlock] = []
        try:
            for _ in range(300):
                if rng.random() < 0.5:
                    new = [table.alloc_one(rng.choice([8, 16, 40]), DType.FP16)]
                else:
                    new = table.alloc([rng.choice([16, 33]) for _ in range(3)], DType.FP16)
                for block in new:
                    own(block)
                held += new
                rng.shuffle(held)
                while len(held) > 6:
                    block = held.pop()
                    disown(block)
                    if rng.random() < 0.5:
                        table.free_one(block)
                    else:
                        table.free([block])
        except BaseException as exc:  # reported below
            errors.append(exc)

    switching_threads(worker, 6)
    assert not errors, errors[0]
    live = table.live_blocks()
    assert sum(len(b.pages) for b in live) == len(owner) == 4096 - len(storage.free["dev:0"])


def test_blocks_of_gives_one_page_blocks_their_id_and_others_a_tuple() -> None:
    ids = [7, 8, 9, 10]
    assert blocks_of(ids, [1, 1, 1, 1]) is ids and blocks_of(ids, b"\x01" * 4) is ids
    assert blocks_of(ids, [2, 1, 1]) == [(7, 8), 9, 10]
    assert blocks_of(ids, [1, 3]) == [7, (8, 9, 10)]


def test_total_pages_counts_lists_and_the_one_page_batch() -> None:
    assert total_pages([1, 2, 1]) == 4 and total_pages([]) == 0
    assert total_pages(b"\x01" * 5) == 5 and total_pages(b"\x01\x03") == 4
