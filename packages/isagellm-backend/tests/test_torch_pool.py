"""The torch page pool as block storage: page tuples reused, exact accounting, all or nothing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="needs torch: pip install 'isagellm-backend[torch]'")

from sagellm_backend import (  # noqa: E402
    DType,
    InvalidArgumentError,
    KVBlock,
    KVLayout,
    ResourceExhaustedError,
)
from sagellm_backend.blocks import BlockTable, Fence, Pool, Transfer  # noqa: E402
from sagellm_backend.torch_backend.pool import DevicePages, KVPagePool, int64s  # noqa: E402

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_size=4, tokens_per_block=2, dtype=DType.FP32)
CPU = Pool(0, "cpu:0", DType.FP32)
"""Pool 0, whose page ids are the page indices."""
HOST = Pool(1, "host", DType.FP32)
"""Pool 1: its page ids are ``HOST.base + index``."""
B = HOST.base


def make_pool() -> KVPagePool:
    pages = {
        name: DevicePages(LAYOUT, 6, torch.float32, torch.device("cpu"), pin=False)
        for name in ("cpu:0", "host")
    }
    return KVPagePool(LAYOUT, pages)


def test_pages_come_lowest_first_and_multi_page_blocks_get_distinct_pages() -> None:
    pool = make_pool()
    assert pool.max_pages(HOST) == 6
    pages = pool.allocate([(HOST, [2, 1, 3])])[0]
    assert pages == [(B, B + 1), B + 2, (B + 3, B + 4, B + 5)], "page ids: base + index"
    assert (pool.pages_in_use("host"), pool.pages_in_use("cpu:0")) == (6, 0)
    pool.release(HOST, list(range(B, B + 6)))  # page by page, as the table does
    assert pool.pages_in_use("host") == 0
    again = pool.allocate([(HOST, [1] * 6)])[0]
    assert sorted(again) == [B + p for p in range(6)], "a one-page block's pages are its page id"


def test_a_device_keeps_the_numbering_of_its_first_pool() -> None:
    pool = make_pool()
    assert pool.allocate([(CPU, [2])])[0] == [(0, 1)], "pool 0: page ids are the page indices"
    with pytest.raises(InvalidArgumentError, match="numbered from 0"):
        pool.allocate([(Pool(2, "cpu:0", DType.FP32), [1])])
    assert pool.pages_in_use("cpu:0") == 2


def test_a_device_no_block_has_used_yet_has_no_page_in_use() -> None:
    pool = make_pool()
    assert (pool.pages_in_use("cpu:0"), pool.pages_in_use("host")) == (0, 0)
    pool.allocate([(CPU, [1])])
    assert (pool.pages_in_use("cpu:0"), pool.pages_in_use("host")) == (1, 0)


def test_one_page_blocks_reuse_the_freed_page_ids() -> None:
    pool = make_pool()
    first = pool.allocate([(CPU, [1, 1])])[0]
    assert first == [0, 1], "a batch gets the pages single calls would, in order"
    pool.release(CPU, [1, 0])
    second = pool.allocate([(CPU, [1, 1])])[0]
    assert second == [0, 1], "last freed, first reused"


def test_the_single_block_path_is_the_free_list_itself() -> None:
    pool = make_pool()
    take, give = pool.taker(HOST), pool.giver(HOST)
    page = take()
    assert page == B and pool.pages_in_use("host") == 1
    give(page)
    assert pool.allocate([(HOST, [1])])[0] == [page]
    for _ in range(5):
        take()
    with pytest.raises(IndexError):
        take()
    assert pool.pages_in_use("host") == 6


def test_a_batch_that_does_not_fit_allocates_nothing() -> None:
    pool = make_pool()
    pool.allocate([(HOST, [1])])
    with pytest.raises(ResourceExhaustedError, match="host is out of KV pages: 6 requested, 5"):
        pool.allocate([(HOST, [3, 3])])
    assert pool.pages_in_use("host") == 1
    assert len(pool.allocate([(HOST, [1] * 5)])[0]) == 5


def test_requests_of_several_devices_are_allocated_together_or_not_at_all() -> None:
    pool = make_pool()
    with pytest.raises(ResourceExhaustedError, match="host is out of KV pages: 7 requested, 6"):
        pool.allocate([(CPU, [2, 1]), (HOST, [3, 4])])
    assert (pool.pages_in_use("cpu:0"), pool.pages_in_use("host")) == (0, 0)
    both = pool.allocate([(CPU, [2, 1]), (HOST, [3, 1])])
    assert both == [[(0, 1), 2], [(B, B + 1, B + 2), B + 3]]
    assert (pool.pages_in_use("cpu:0"), pool.pages_in_use("host")) == (3, 4)


def no_events(event: object) -> Fence:
    raise InvalidArgumentError(f"{event!r}: this table takes no events", hint="free without after")


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_random_alloc_free_grow_and_migrate_hand_out_every_page_exactly_once(
    data: st.DataObject,
) -> None:
    pool = make_pool()
    devices = ["cpu:0", "host"]
    table = BlockTable(
        pool,
        layout=LAYOUT,
        dtypes=[DType.FP32],
        devices=devices,
        default_device="cpu:0",
        devices_hint="use cpu:0 or host",
        guard=lambda operation: None,
        own_event=no_events,
    )
    expected: dict[KVBlock, int] = {}
    """The page count each live block should have: its allocation's, or its growth's."""
    tokens = st.lists(st.integers(1, 2 * 4), min_size=1, max_size=4)  # 1 to 4 pages each
    for _ in range(data.draw(st.integers(1, 30))):
        live = table.live_blocks()
        device = data.draw(st.sampled_from(devices))
        mine = [b for b in live if b.device == device]
        op = data.draw(
            st.sampled_from(["alloc", "alloc_one", "free", "free_one", "migrate", "grow"])
        )
        try:
            if op == "alloc_one":
                n = data.draw(st.integers(1, 2 * 4))
                expected[table.alloc_one(n, DType.FP32)] = LAYOUT.pages_for(n)
            elif op == "alloc" or not mine:
                counts = data.draw(tokens)
                made = table.alloc(counts, DType.FP32, device=device)
                expected.update((b, LAYOUT.pages_for(n)) for b, n in zip(made, counts, strict=True))
            elif op == "free_one":
                chosen_one = data.draw(st.sampled_from(mine))
                table.free_one(chosen_one.block)
                del expected[chosen_one.block]
            else:
                chosen = data.draw(st.lists(st.sampled_from(mine), min_size=1, unique=True))
                handles = [b.block for b in chosen]
                if op == "free":
                    table.free(handles)
                    for h in handles:
                        del expected[h]
                elif op == "grow":
                    # Any size up to the device's 6 pages: fewer tokens than held is a no-op.
                    wanted = [data.draw(st.integers(1, 2 * 6)) for _ in chosen]
                    assert table.grow(handles, wanted) == handles, "grown in place"
                    for b, n in zip(chosen, wanted, strict=True):
                        expected[b.block] = max(b.num_pages, LAYOUT.pages_for(n))
                        assert table.info(b.block).pages[: b.num_pages] == b.pages, "appended"
                else:
                    issued: list[Transfer] = []  # the page copies, run on the calling thread
                    target = devices[1 - devices.index(device)]
                    moved = table.migrate(handles, target, issued.extend)
                    assert [t.source.device for t in issued] == [device]
                    source, target_pool = issued[0].source, issued[0].target  # page ids: base + i
                    assert issued[0].sources == [source.base + p for b in chosen for p in b.pages]
                    assert issued[0].targets == [
                        target_pool.base + p for h in moved for p in table.info(h).pages
                    ]
                    for old, new in zip(handles, moved, strict=True):
                        expected[new] = expected.pop(old)
        except ResourceExhaustedError:
            assert table.live_blocks() == live, "a refused batch changes nothing"
        assert {b.block: b.num_pages for b in table.live_blocks()} == expected
        for name in devices:
            on = table.live_blocks(name)
            assert table.blocks_on(name) == len(on)
            assert pool.pages_in_use(name) == sum(b.num_pages for b in on)
    for name in devices:
        rest = table.alloc([1] * (6 - pool.pages_in_use(name)), DType.FP32, device=name)
        pages = [p for b in table.live_blocks(name) for p in b.pages]
        assert sorted(pages) == list(range(6)), "every page once: none lost, none handed out twice"
        assert all(table.info(b).num_pages == 1 for b in rest)


def test_int64s_packs_its_parts_back_to_back() -> None:
    big = 3 << 40
    assert int64s([1, 2], [big], []).tolist() == [1, 2, big]
    assert int64s([-5]).dtype == torch.int64 and int64s([-5]).tolist() == [-5]
    assert int64s().numel() == 0 and int64s([], []).dtype == torch.int64
