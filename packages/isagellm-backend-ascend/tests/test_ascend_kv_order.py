"""Freed KV pages are reused only after the NPU work that still reads or writes them.

The stand-in's streams are deferred: queued work runs only when something waits for it, so a
page handed out again before the work queued on it ran shows as another block's bytes.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterator

import pytest

pytest.importorskip("torch", reason="needs torch: pip install isagellm-backend-ascend")
pytest.importorskip("torch_npu", reason="the stand-in is on sys.path (conftest)")

from sagellm_backend.device import HOST
from sagellm_backend.dtypes import DType
from sagellm_backend.kv import KVBlock
from sagellm_backend.torch_backend.provider import TorchBackendProvider
from sagellm_backend_ascend import create_ascend_backend
from sagellm_backend_ascend.runtime import NpuEvent, NpuStream

Provider = TorchBackendProvider[NpuStream, NpuEvent]

LAYOUT = {"num_layers": 2, "num_kv_heads": 1, "head_size": 8, "tokens_per_block": 4}
THREADS = 4
ROUNDS = 150


@pytest.fixture
def p() -> Iterator[Provider]:
    provider: Provider = create_ascend_backend(
        num_blocks=64, host_num_blocks=64, pin_host_memory=False, **LAYOUT
    )
    yield provider
    provider.close()


def fill(p: Provider, block: KVBlock) -> bytes:
    info = p.kv_block_info(block)
    data = os.urandom(info.num_pages * p.kv_layout.page_bytes(info.dtype))
    p.kv_block_write(block, data)
    return data


def test_threads_moving_blocks_never_see_each_others_bytes(p: Provider) -> None:
    tokens = p.kv_layout.tokens_per_block
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
                blocks = p.kv_blocks_alloc([tokens] * 4, DType.FP16)
                datas = [fill(p, b) for b in blocks]
                side = p.create_stream()
                moved, done = p.kv_blocks_migrate(blocks, HOST, stream=side)
                done.synchronize()
                for block, data in zip(moved, datas, strict=True):
                    expect("migrated to host", p.kv_block_read(block), data)
                back, _ = p.kv_blocks_migrate(moved, p.device)
                if grows:
                    assert p.kv_block_grow(back[0], 2 * tokens) == back[0], "grown in place"
                    assert p.kv_block_info(back[0]).num_pages == 2
                copied = p.kv_blocks_copy([(back[1], back[2])], stream=side)
                p.kv_block_free(back[1])
                copied.synchronize()
                expect("copied", p.kv_block_read(back[2]), datas[1])
                expect("migrated back", p.kv_block_read(back[3]), datas[3])
                p.kv_blocks_free([back[0], back[2], back[3]])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sum(checked.values()) == THREADS * ROUNDS * 6
    assert corrupted == [], f"{len(corrupted)} blocks held another block's bytes"
    p.synchronize()
    stats = p.memory_stats()
    assert (stats.kv_blocks_in_use, stats.kv_pages_in_use) == (0, 0)


def test_a_copy_on_a_side_stream_reads_its_source_before_the_page_is_reused(p: Provider) -> None:
    src, dst = p.kv_blocks_alloc([4, 4], DType.FP16)
    data = fill(p, src)
    side = p.create_stream()
    done = p.kv_blocks_copy([(src, dst)], stream=side)
    p.kv_block_free(src)
    reused = p.kv_block_alloc(4, DType.FP16)
    fill(p, reused)
    p.current_stream().synchronize()
    done.synchronize()
    assert p.kv_block_read(dst) == data


def test_a_swap_in_on_a_side_stream_lands_after_the_old_owners_write(p: Provider) -> None:
    on_host = p.kv_block_migrate(p.kv_block_alloc(4, DType.FP16), HOST)
    data = fill(p, on_host)
    old = p.kv_block_alloc(4, DType.FP16)
    old_pages = p.kv_block_info(old).pages
    fill(p, old)  # queued on the current stream, not run yet
    p.kv_block_free(old)
    side = p.create_stream()
    (swapped,), done = p.kv_blocks_migrate([on_host], p.device, stream=side)
    assert p.kv_block_info(swapped).pages == old_pages, "the freed page is reused at once"
    done.synchronize()
    assert p.kv_block_read(swapped) == data


def test_a_free_after_an_engine_event_keeps_the_pages_until_it_is_reached(p: Provider) -> None:
    blocks = p.kv_blocks_alloc([4] * 64, DType.FP16)
    data = fill(p, blocks[1])
    side = p.create_stream()
    side.wait_stream(p.current_stream())
    with side:  # the engine's own work on the cache, on its stream
        p.kv_block_copy(blocks[1], blocks[2])
        ready = side.record_event()
    p.kv_blocks_free(blocks[:2], after=ready)
    for block in p.kv_blocks_alloc([4, 4], DType.FP16):  # short: waits for the event
        fill(p, block)
    p.current_stream().synchronize()
    side.synchronize()
    assert p.kv_block_read(blocks[2]) == data
