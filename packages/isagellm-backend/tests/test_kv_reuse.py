"""Freed KV pages are reused only after the device work that still reads or writes them.

On the cpu backend, work runs when it is issued, so what goes wrong without the ordering is a
race between threads: a page freed by one thread's migrate handed to another thread before the
migrate's copy out of it ran. The mock's streams are deferred, so a missing order between
streams shows there deterministically: work on a side stream, ``after=`` events, and the wait
for pending pages when the pool is short.
"""

from __future__ import annotations

import os
import threading
from collections import Counter

import pytest

from sagellm_backend import HOST, DType, KVBlock, MockBackendProvider

torch = pytest.importorskip("torch", reason="needs torch: pip install 'isagellm-backend[torch]'")

from sagellm_backend.torch_backend.cpu import create_cpu_backend  # noqa: E402

THREADS = 4
ROUNDS = 1500


def page_bytes(data: bytes, layers: int, num_pages: int, page: int) -> bytes:
    """Page ``page`` of a block read as ``[layers, num_pages, ...]`` bytes, all layers."""
    chunk = len(data) // (layers * num_pages)
    return b"".join(
        data[(layer * num_pages + page) * chunk : (layer * num_pages + page + 1) * chunk]
        for layer in range(layers)
    )


def test_threads_moving_blocks_on_cpu_never_see_each_others_bytes(
    reliability_counts: Counter[str],
) -> None:
    """The reproduction of the reliability report: 4 threads allocate 4 one-page blocks, write
    random bytes, migrate them to host and read them back; here they also grow (where claimed),
    copy, migrate back and free. Every block read holds the bytes its own thread wrote."""
    p = create_cpu_backend(num_blocks=256, host_num_blocks=256)
    layout, dtype = p.kv_layout, DType.FP16
    tokens, size = layout.tokens_per_block, layout.page_bytes(DType.FP16)
    grows = p.capability().supports_op("kv_grow")
    corrupted: list[str] = []
    errors: list[BaseException] = []
    checked = Counter[str]()

    def expect(what: str, got: bytes, wanted: bytes) -> None:
        checked[what] += 1
        if got != wanted:
            corrupted.append(what)

    def worker() -> None:
        try:
            for _ in range(ROUNDS):
                blocks = p.kv_blocks_alloc([tokens] * 4, dtype)
                datas = [os.urandom(size) for _ in blocks]
                for block, data in zip(blocks, datas, strict=True):
                    p.kv_block_write(block, data)
                moved, _ = p.kv_blocks_migrate(blocks, HOST)
                for block, data in zip(moved, datas, strict=True):
                    expect("migrated to host", p.kv_block_read(block), data)
                grown = moved[0]
                if grows:
                    first = p.kv_block_info(grown).pages
                    assert p.kv_block_grow(grown, 2 * tokens) == grown, "grown in place"
                    assert p.kv_block_info(grown).pages[:1] == first
                    got = page_bytes(p.kv_block_read(grown), layout.num_layers, 2, 0)
                    expect("grown", got, datas[0])
                back, _ = p.kv_blocks_migrate(moved[1:], p.device)
                p.kv_blocks_copy([(back[0], back[1])])
                expect("copied", p.kv_block_read(back[1]), datas[1])
                expect("migrated back", p.kv_block_read(back[2]), datas[3])
                p.kv_block_free(grown)
                p.kv_blocks_free(back)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sum(checked.values()) == THREADS * ROUNDS * (7 if grows else 6)
    assert corrupted == [], f"{len(corrupted)} blocks held another thread's bytes"
    stats = p.memory_stats()
    assert (stats.kv_blocks_in_use, stats.kv_pages_in_use) == (0, 0)
    reliability_counts["KV blocks checked after concurrent moves (cpu)"] += sum(checked.values())
    p.close()


def fill(p: MockBackendProvider, block: KVBlock, byte: int) -> bytes:
    info = p.kv_block_info(block)
    data = bytes([byte]) * (info.num_pages * p.kv_layout.page_bytes(info.dtype))
    p.kv_block_write(block, data)
    return data


def test_a_copy_on_a_side_stream_still_reads_its_source_after_the_source_is_freed() -> None:
    p = MockBackendProvider()
    src, dst = p.kv_blocks_alloc([16, 16], DType.FP16)
    data = fill(p, src, 1)
    side = p.create_stream()
    done = p.kv_blocks_copy([(src, dst)], stream=side)
    p.kv_block_free(src)
    reused = p.kv_block_alloc(16, DType.FP16)
    fill(p, reused, 2)
    p.current_stream().synchronize()
    done.synchronize()
    assert p.kv_block_read(dst) == data


def test_a_migration_on_a_side_stream_still_reads_its_sources_after_they_are_reused() -> None:
    p = MockBackendProvider()
    blocks = p.kv_blocks_alloc([16] * 3, DType.FP16)
    datas = [fill(p, b, i + 1) for i, b in enumerate(blocks)]
    side = p.create_stream()
    moved, done = p.kv_blocks_migrate(blocks, HOST, stream=side)
    for block in p.kv_blocks_alloc([16] * 3, DType.FP16):
        fill(p, block, 9)
    p.current_stream().synchronize()
    done.synchronize()
    assert [p.kv_block_read(m) for m in moved] == datas


def test_work_on_a_side_stream_waits_for_the_current_stream_before_writing_reused_pages() -> None:
    p = MockBackendProvider()
    old = p.kv_block_alloc(16, DType.FP16)
    fill(p, old, 3)  # queued on the current stream, not run yet
    old_pages = p.kv_block_info(old).pages
    p.kv_block_free(old)
    on_host = p.kv_block_migrate(p.kv_block_alloc(16, DType.FP16), HOST)
    data = fill(p, on_host, 4)
    side = p.create_stream()
    (swapped,), done = p.kv_blocks_migrate([on_host], p.device, stream=side)
    assert p.kv_block_info(swapped).pages == old_pages, "the freed page is reused at once"
    done.synchronize()
    assert p.kv_block_read(swapped) == data, "the old write ran first"


def test_provider_work_inside_a_with_stream_block_is_done_before_its_pages_are_reused() -> None:
    p = MockBackendProvider()
    side = p.create_stream()
    old, src, dst = p.kv_blocks_alloc([16, 16, 16], DType.FP16)
    data = fill(p, src, 1)
    p.current_stream().synchronize()
    with side:
        fill(p, old, 2)  # queued on the side stream, not run yet
        p.kv_block_copy(src, dst)
    p.kv_blocks_free([old, src])  # from the default stream
    reused = p.kv_blocks_alloc([16, 16], DType.FP16)
    fresh = [fill(p, block, 3 + i) for i, block in enumerate(reused)]
    p.current_stream().synchronize()
    side.synchronize()
    assert [p.kv_block_read(b) for b in reused] == fresh, "no late write of the side stream"
    assert p.kv_block_read(dst) == data


def test_provider_work_inside_a_with_stream_block_waits_for_the_default_streams_work() -> None:
    p = MockBackendProvider()
    side = p.create_stream()
    old = p.kv_block_alloc(16, DType.FP16)
    fill(p, old, 4)  # queued on the default stream, not run yet
    old_pages = p.kv_block_info(old).pages
    p.kv_block_free(old)  # reused at once: the default stream orders its own work
    with side:
        new = p.kv_block_alloc(16, DType.FP16)
        assert p.kv_block_info(new).pages == old_pages
        data = fill(p, new, 5)
    side.synchronize()
    p.current_stream().synchronize()
    assert p.kv_block_read(new) == data, "the default stream's old write ran first"


def test_free_after_an_event_orders_the_reuse_after_the_engines_work() -> None:
    p = MockBackendProvider(max_memory_mb=1)
    pages = (1 << 20) // p.kv_layout.page_bytes(DType.FP16)
    blocks = p.kv_blocks_alloc([16] * pages, DType.FP16)
    data = fill(p, blocks[1], 5)
    side = p.create_stream()
    side.wait_stream(p.current_stream())
    with side:
        p.kv_block_copy(blocks[1], blocks[2])  # the engine's own work, on its stream
        ready = side.record_event()
    p.kv_blocks_free(blocks[:2], after=ready)
    for block in p.kv_blocks_alloc([16, 16], DType.FP16):
        fill(p, block, 6)
    p.synchronize()
    assert p.kv_block_read(blocks[2]) == data


def test_pages_freed_while_side_stream_work_is_in_flight_wait_for_it() -> None:
    p = MockBackendProvider()
    a, b, c = p.kv_blocks_alloc([16, 16, 16], DType.FP16)
    data = fill(p, a, 6)
    side = p.create_stream()
    p.kv_blocks_copy([(a, b)], stream=side)
    p.kv_blocks_free([c, a])
    for block in p.kv_blocks_alloc([16, 16], DType.FP16):
        fill(p, block, 7)
    p.current_stream().synchronize()
    side.synchronize()
    assert p.kv_block_read(b) == data


def test_close_runs_the_work_that_still_uses_freed_pages() -> None:
    p = MockBackendProvider()
    src, dst = p.kv_blocks_alloc([16, 16], DType.FP16)
    fill(p, src, 8)
    side = p.create_stream()
    p.kv_blocks_copy([(src, dst)], stream=side)
    p.kv_block_free(src)
    p.close()
    assert side.done == side.queued
