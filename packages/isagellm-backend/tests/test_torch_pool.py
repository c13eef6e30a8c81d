"""The torch page pool as block storage: page tuples reused, exact accounting, all or nothing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch", reason="needs torch: pip install 'isagellm-backend[torch]'")

from sagellm_backend import (  # noqa: E402
    DType,
    KVLayout,
    ResourceExhaustedError,
)
from sagellm_backend.blocks import BlockTable  # noqa: E402
from sagellm_backend.torch_backend.pool import DevicePages, KVPagePool  # noqa: E402

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_size=4, tokens_per_block=2, dtype=DType.FP32)


def make_pool() -> KVPagePool:
    pages = {
        name: DevicePages(LAYOUT, 6, torch.float32, torch.device("cpu"), pin=False)
        for name in ("cpu:0", "host")
    }
    return KVPagePool(LAYOUT, pages)


def test_pages_come_lowest_first_and_multi_page_blocks_get_distinct_pages() -> None:
    pool = make_pool()
    pages = pool.allocate("host", [DType.FP32] * 3, [2, 1, 3])
    assert pages == [(0, 1), (2,), (3, 4, 5)]
    assert (pool.pages_in_use("host"), pool.pages_in_use("cpu:0")) == (6, 0)
    pool.release("host", pages)
    assert pool.pages_in_use("host") == 0
    again = pool.allocate("host", [DType.FP32] * 6, [1] * 6)
    assert sorted(again) == [(p,) for p in range(6)], "multi-page blocks come back page by page"


def test_one_page_blocks_reuse_the_freed_page_tuples() -> None:
    pool = make_pool()
    first = pool.allocate("cpu:0", [DType.FP32] * 2, [1, 1])
    pool.release("cpu:0", first)
    second = pool.allocate("cpu:0", [DType.FP32] * 2, [1, 1])
    assert second == [(1,), (0,)], "last freed, first reused"
    assert {id(p) for p in second} == {id(p) for p in first}, "the same tuples, not copies"


def test_the_single_block_path_is_the_free_list_itself() -> None:
    pool = make_pool()
    take, give = pool.taker("cpu:0", DType.FP32), pool.giver("cpu:0")
    page = take()
    assert page == (0,) and pool.pages_in_use("cpu:0") == 1
    give(page)
    assert pool.allocate("cpu:0", [DType.FP32], [1]) == [page]
    for _ in range(5):
        take()
    with pytest.raises(IndexError):
        take()
    assert pool.pages_in_use("cpu:0") == 6


def test_a_batch_that_does_not_fit_allocates_nothing() -> None:
    pool = make_pool()
    pool.allocate("host", [DType.FP32], [1])
    with pytest.raises(ResourceExhaustedError, match="host is out of KV pages: 6 requested, 5"):
        pool.allocate("host", [DType.FP32] * 2, [3, 3])
    assert pool.pages_in_use("host") == 1
    assert len(pool.allocate("host", [DType.FP32] * 5, [1] * 5)) == 5


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_random_alloc_free_and_migrate_hand_out_every_page_exactly_once(
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
        owner="owner",
        devices_hint="use cpu:0 or host",
    )
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
                table.alloc_one(data.draw(st.integers(1, 2 * 4)), DType.FP32)
            elif op == "alloc" or not mine:
                table.alloc(data.draw(tokens), DType.FP32, device=device)
            elif op == "free_one":
                table.free_one(data.draw(st.sampled_from(mine)))
            else:
                chosen = data.draw(st.lists(st.sampled_from(mine), min_size=1, unique=True))
                if op == "free":
                    table.free(chosen)
                elif op == "grow":
                    table.grow(
                        chosen, [b.num_tokens + data.draw(st.integers(0, 4)) for b in chosen]
                    )
                else:
                    table.migrate(
                        chosen, devices[1 - devices.index(device)], lambda srcs, dsts: None
                    )
        except ResourceExhaustedError:
            assert table.live_blocks() == live, "a refused batch changes nothing"
        for name in devices:
            on = [b for b in table.live_blocks() if b.device == name]
            assert table.blocks_on(name) == len(on)
            assert pool.pages_in_use(name) == sum(b.num_pages for b in on)
            assert all(b.num_pages == LAYOUT.pages_for(b.num_tokens) for b in on)
    for name in devices:
        rest = table.alloc([1] * (6 - pool.pages_in_use(name)), DType.FP32, device=name)
        pages = [p for b in table.live_blocks() if b.device == name for p in b.pages]
        assert sorted(pages) == list(range(6)), "every page once: none lost, none handed out twice"
        assert all(b.num_pages == 1 for b in rest)
