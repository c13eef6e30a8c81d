"""Mock KV blocks: real bytes, exact accounting, fail-fast checks that change nothing."""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import random
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

from sagellm_backend import (
    BackendUnavailableError,
    BlockNotFoundError,
    CapabilityError,
    DType,
    ErrorCode,
    InvalidArgumentError,
    InvalidBlockError,
    KVBlock,
    KVBlockInfo,
    MemoryStats,
    MockBackendProvider,
    ResourceExhaustedError,
)
from sagellm_backend.mock.pool import MAX_PAGES, POISON
from sagellm_backend.mock.provider import MAX_DEVICES

SRC = Path(__file__).resolve().parents[1] / "src"
SEED_EXAMPLE = """\
from sagellm_backend import MockBackendProvider, DType
backend = MockBackendProvider(supported_dtypes=[DType.FP16, DType.BF16], has_collective=True)
cap = backend.capability()
print(cap.supported_dtypes)
block = backend.kv_block_alloc(128, DType.FP16)
"""


def pattern(provider: MockBackendProvider, block: KVBlock, seed: int) -> bytes:
    info = provider.kv_block_info(block)
    size = info.num_pages * provider.kv_layout.page_bytes(info.dtype)
    return random.Random(seed).randbytes(size)


def snapshot(provider: MockBackendProvider) -> tuple[MemoryStats, list[KVBlockInfo], list[bytes]]:
    blocks = provider.live_blocks()
    return provider.memory_stats(), blocks, [provider.kv_block_read(b.block) for b in blocks]


def test_seed_example_runs_verbatim_and_prints_the_dtypes() -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    result = subprocess.run(
        [sys.executable, "-c", SEED_EXAMPLE], capture_output=True, text=True, env=env, check=True
    )
    assert "fp16" in result.stdout and "bf16" in result.stdout
    assert result.stdout.count("DType.") == 2


def test_seed_defaults() -> None:
    cap = MockBackendProvider().capability()
    assert cap.supported_dtypes == cap.kv_dtypes == (DType.FP16, DType.BF16)
    assert [k.value for k in cap.supported_kernels] == ["matmul"]
    assert cap.supported_ops == ("kv_grow", "batch_metadata", "sample")
    assert cap.has_collective and not cap.has_graph_exec and cap.max_memory_mb == 16384


def test_blocks_are_allocated_on_demand_and_accounted_exactly() -> None:
    p = MockBackendProvider(max_memory_mb=1)
    page = p.kv_layout.page_bytes(DType.FP16)
    assert p.memory_stats() == MemoryStats(1 << 20, 0, 0, 0, 0)
    a = p.kv_block_alloc(128, DType.FP16)
    b, c = p.kv_blocks_alloc([1, 17], "bf16")
    assert all(type(h) is int for h in (a, b, c)) and len({a, b, c}) == 3
    infos = [p.kv_block_info(h) for h in (a, b, c)]
    assert [i.num_pages for i in infos] == [8, 1, 2]
    assert [(i.block, i.device, i.dtype) for i in infos] == [
        (a, "mock:0", DType.FP16),
        (b, "mock:0", DType.BF16),
        (c, "mock:0", DType.BF16),
    ]
    assert p.live_blocks() == infos and p.live_blocks("mock:1") == []
    assert p.memory_stats() == MemoryStats(1 << 20, 11 * page, 11 * page, 3, 11)
    p.kv_blocks_free([a, c])
    assert p.memory_stats() == MemoryStats(1 << 20, page, 11 * page, 1, 1)
    p.kv_block_free(b)
    assert p.memory_stats().used_bytes == 0 and p.live_blocks() == []


def test_new_blocks_read_as_poison_and_writes_read_back() -> None:
    p = MockBackendProvider()
    block = p.kv_block_alloc(20, DType.FP16)
    assert p.kv_block_read(block) == bytes([POISON]) * (2 * p.kv_layout.page_bytes(DType.FP16))
    data = pattern(p, block, 1)
    p.kv_block_write(block, data)
    assert p.kv_block_read(block) == data
    freed = p.kv_block_info(block).pages
    p.kv_block_free(block)
    (again,) = p.kv_blocks_alloc([20], DType.FP16)
    assert again != block, "handles are never reused"
    assert set(p.kv_block_info(again).pages) == set(freed), "the freed pages are handed out again"
    assert p.kv_block_read(again) == bytes([POISON]) * len(data), "poisoned, not the old bytes"


def test_copy_and_batched_copy_move_the_bytes() -> None:
    p = MockBackendProvider()
    a, b, c, d = p.kv_blocks_alloc([32, 32, 32, 32], DType.FP16)
    p.kv_block_write(a, pattern(p, a, 1))
    p.kv_block_write(b, pattern(p, b, 2))
    p.kv_block_copy(a, c)
    assert p.kv_block_read(c) == pattern(p, a, 1)
    done = p.kv_blocks_copy([(b, c), (a, d)])
    done.synchronize()
    assert p.kv_block_read(c) == pattern(p, b, 2)
    assert p.kv_block_read(d) == pattern(p, a, 1)


@pytest.mark.parametrize("target", ["mock:1", "host"])
def test_migrate_moves_the_bytes_and_releases_the_source(target: str) -> None:
    p = MockBackendProvider()
    block = p.kv_block_alloc(100, DType.BF16)
    data = pattern(p, block, 3)
    p.kv_block_write(block, data)
    moved = p.kv_block_migrate(block, target)
    assert moved != block
    info = p.kv_block_info(moved)
    assert (info.block, info.device, info.num_pages, info.dtype) == (moved, target, 7, DType.BF16)
    assert p.kv_block_read(moved) == data
    assert p.memory_stats().used_bytes == 0, "the source is released"
    for stale in (p.kv_block_read, p.kv_block_info, p.kv_block_free):
        with pytest.raises(BlockNotFoundError):
            stale(block)
    back = p.kv_block_migrate(moved, "mock:0")
    assert p.kv_block_read(back) == data and p.memory_stats().kv_blocks_in_use == 1


def test_batched_migrate_moves_every_block_and_returns_an_event() -> None:
    p = MockBackendProvider()
    blocks = p.kv_blocks_alloc([16, 48, 5], DType.FP16)
    datas = [pattern(p, b, i) for i, b in enumerate(blocks)]
    for b, data in zip(blocks, datas, strict=True):
        p.kv_block_write(b, data)
    side = p.create_stream()
    side.wait_stream(p.current_stream())
    moved, done = p.kv_blocks_migrate(blocks, "host", stream=side)
    done.synchronize()
    assert [p.kv_block_read(m) for m in moved] == datas
    assert [p.kv_block_info(m).device for m in moved] == ["host"] * 3
    assert [p.kv_block_info(m).num_pages for m in moved] == [1, 3, 1]
    assert p.memory_stats().used_bytes == 0


def test_running_out_of_memory_leaves_the_pool_exactly_as_it_was() -> None:
    p = MockBackendProvider(max_memory_mb=1)
    page = p.kv_layout.page_bytes(DType.FP16)
    pages = (1 << 20) // page
    kept = p.kv_blocks_alloc([16] * (pages - 2), DType.FP16)
    p.kv_block_write(kept[0], pattern(p, kept[0], 9))
    before = snapshot(p)
    with pytest.raises(ResourceExhaustedError) as info:
        p.kv_blocks_alloc([16, 16, 16], DType.FP16)
    assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED and info.value.hint
    with pytest.raises(MemoryError):
        p.kv_block_alloc(48, DType.FP16)
    assert snapshot(p) == before
    p.kv_blocks_alloc([16, 16], DType.FP16)
    assert p.memory_stats().used_bytes == 1 << 20


def test_migrating_into_a_full_device_changes_nothing() -> None:
    p = MockBackendProvider(max_memory_mb=1)
    full = (1 << 20) // p.kv_layout.page_bytes(DType.FP16) * 16
    p.kv_block_migrate(p.kv_block_alloc(full, DType.FP16), "mock:1")
    block = p.kv_block_alloc(16, DType.FP16)
    before = snapshot(p)
    with pytest.raises(ResourceExhaustedError, match="mock:1"):
        p.kv_block_migrate(block, "mock:1")
    assert snapshot(p) == before


BAD_ALLOCS: list[tuple[object, object, type[Exception], ErrorCode]] = [
    (0, DType.FP16, InvalidArgumentError, ErrorCode.INVALID_ARGUMENT),
    (-5, DType.FP16, InvalidArgumentError, ErrorCode.INVALID_ARGUMENT),
    (True, DType.FP16, InvalidArgumentError, ErrorCode.INVALID_ARGUMENT),
    (1 << 40, DType.FP16, InvalidArgumentError, ErrorCode.INVALID_ARGUMENT),
    (16, DType.FP32, CapabilityError, ErrorCode.NOT_IMPLEMENTED),
    (16, "fp32", CapabilityError, ErrorCode.NOT_IMPLEMENTED),
    (16, "float16", InvalidArgumentError, ErrorCode.INVALID_ARGUMENT),
    (16, None, InvalidArgumentError, ErrorCode.INVALID_ARGUMENT),
]


@pytest.mark.parametrize(("num_tokens", "dtype", "error", "code"), BAD_ALLOCS)
def test_bad_alloc_is_refused_with_its_code_and_changes_nothing(
    num_tokens: object, dtype: object, error: type[Exception], code: ErrorCode
) -> None:
    p = MockBackendProvider(max_memory_mb=1)
    p.kv_block_alloc(16, DType.FP16)
    before = snapshot(p)
    with pytest.raises(error) as info:
        p.kv_block_alloc(num_tokens, dtype)  # type: ignore[arg-type]  # deliberately bad
    assert getattr(info.value, "code", None) is code
    with pytest.raises(error):
        p.kv_blocks_alloc([16, num_tokens], dtype)  # type: ignore[list-item, arg-type]  # bad
    assert snapshot(p) == before


def test_double_free_use_after_free_and_foreign_blocks() -> None:
    p, q = MockBackendProvider(), MockBackendProvider()
    a, b = p.kv_blocks_alloc([16, 16], DType.FP16)
    foreign = q.kv_block_alloc(16, DType.FP16)
    p.kv_block_free(a)
    before = snapshot(p)
    stale: list[Callable[[], object]] = [
        lambda: p.kv_block_free(a),
        lambda: p.kv_block_read(a),
        lambda: p.kv_block_write(a, bytes(16)),
        lambda: p.kv_block_copy(a, b),
        lambda: p.kv_block_migrate(a, "host"),
        lambda: p.kv_block_info(a),
        lambda: p.kv_block_grow(a, 32),
        lambda: p.kv_blocks_free([b, a]),
        lambda: p.kv_blocks_grow([b, a], [32, 32]),
    ]
    for call in stale:
        with pytest.raises(BlockNotFoundError) as missing:
            call()
        assert missing.value.code is ErrorCode.BLOCK_NOT_FOUND
    alien: list[Callable[[], object]] = [
        lambda: p.kv_block_free(foreign),
        lambda: p.kv_block_copy(b, foreign),
        lambda: p.kv_block_read(foreign),
        lambda: p.kv_block_write(foreign, bytes(p.kv_layout.page_bytes(DType.FP16))),
        lambda: p.kv_block_info(foreign),
        lambda: p.kv_blocks_grow([b, foreign], [32, 32]),
        lambda: p.kv_blocks_migrate([b, foreign], "host"),
        lambda: p.kv_block_free(KVBlock(b + 1000)),
    ]
    for call in alien:
        with pytest.raises(InvalidBlockError) as refused:
            call()
        assert refused.value.code is ErrorCode.FOREIGN_BLOCK
    assert snapshot(p) == before
    assert q.memory_stats().kv_blocks_in_use == 1


def test_mismatched_copies_are_refused_and_change_nothing() -> None:
    p = MockBackendProvider()
    a, b, c = p.kv_blocks_alloc([16, 17, 16], DType.FP16)
    h = p.kv_block_alloc(16, DType.BF16)
    p.kv_block_write(a, pattern(p, a, 5))
    before = snapshot(p)
    for src, dst in ((a, b), (a, h)):
        with pytest.raises(InvalidBlockError) as info:
            p.kv_block_copy(src, dst)
        assert info.value.code is ErrorCode.KV_BLOCK_MISMATCH
        with pytest.raises(InvalidBlockError):
            p.kv_blocks_copy([(a, c), (src, dst)])
    with pytest.raises(InvalidArgumentError, match="more than once"):
        p.kv_blocks_copy([(a, c), (a, c)])
    with pytest.raises(InvalidArgumentError, match="bytes"):
        p.kv_block_write(a, b"short")
    assert snapshot(p) == before


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ("mock:2", "unknown device 'mock:2'"),
        ("cuda:0", "unknown device"),
        ("mock:", "malformed"),
        ("host\n", "malformed"),
        ("mock:\u0661", "malformed"),
        ("mock:0\n", "malformed"),
        (" mock:1", "malformed"),
        ("mock:01", "malformed"),
    ],
)
def test_migrate_to_a_bad_device_is_refused_and_changes_nothing(target: str, match: str) -> None:
    p = MockBackendProvider()
    block = p.kv_block_alloc(16, DType.FP16)
    before = snapshot(p)
    with pytest.raises(InvalidArgumentError, match=match) as info:
        p.kv_block_migrate(block, target)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT and info.value.hint
    if "unknown" in match:
        assert "mock:0, mock:1, host" in str(info.value)
    assert snapshot(p) == before


def test_layout_options_shape_the_blocks() -> None:
    p = MockBackendProvider(num_layers=4, num_kv_heads=1, head_size=8, tokens_per_block=4)
    block = p.kv_block_alloc(9, DType.FP16)
    assert p.kv_block_info(block).num_pages == 3
    assert len(p.kv_block_read(block)) == 3 * 2 * 4 * 4 * 1 * 8 * 2


def test_handles_descriptor_and_errors_pickle() -> None:
    p = MockBackendProvider()
    block = p.kv_block_alloc(16, DType.FP16)
    where = p.kv_block_info(block)
    assert pickle.loads(pickle.dumps(block)) == block
    assert pickle.loads(pickle.dumps(where)) == where
    assert p.kv_block_info(pickle.loads(pickle.dumps(block))) == where
    p.kv_block_free(pickle.loads(pickle.dumps(block)))
    cap = p.capability()
    assert pickle.loads(pickle.dumps(cap)) == cap
    with pytest.raises(BlockNotFoundError) as info:
        p.kv_block_free(block)
    error = pickle.loads(pickle.dumps(info.value))
    assert (type(error), error.code, str(error)) == (
        BlockNotFoundError,
        ErrorCode.BLOCK_NOT_FOUND,
        str(info.value),
    )


def test_threads_on_one_provider_end_with_exact_accounting() -> None:
    p = MockBackendProvider(max_memory_mb=64)
    page = p.kv_layout.page_bytes(DType.FP16)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(100):
                a, b = p.kv_blocks_alloc([16, 16], DType.FP16)
                data = rng.randbytes(page)
                p.kv_block_write(a, data)
                p.kv_block_copy(a, b)
                if p.kv_block_read(b) != data:
                    raise AssertionError("copy lost bytes")
                p.kv_blocks_free([a, b])
            p.kv_block_alloc(16, DType.FP16)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    stats = p.memory_stats()
    assert (stats.kv_blocks_in_use, stats.used_bytes) == (8, 8 * page)
    live = p.live_blocks()
    assert len({b.block for b in live}) == 8
    assert len({page for b in live for page in b.pages}) == 8, "no page handed out twice"


def test_growth_appends_pages_in_place_keeps_the_bytes_and_the_handle() -> None:
    p = MockBackendProvider(max_memory_mb=1)
    assert p.capability().supports_op("kv_grow")
    page = p.kv_layout.page_bytes(DType.FP16)
    block = p.kv_block_alloc(16, DType.FP16)
    first = p.kv_block_info(block).pages
    data = pattern(p, block, 11)
    p.kv_block_write(block, data)
    assert p.kv_block_grow(block, 40) == block, "the same handle"
    grown = p.kv_block_info(block)
    assert (grown.num_pages, grown.pages[:1]) == (3, first), "pages appended after the old"
    assert p.kv_block_read(block) == data + bytes([POISON]) * (2 * page), "new pages: poison"
    assert p.memory_stats().used_bytes == 3 * page
    assert p.memory_stats().kv_blocks_in_use == 1
    before = snapshot(p)
    assert p.kv_block_grow(block, 20) == block, "fewer tokens than it holds: a no-op"
    assert p.kv_block_grow(block, 48) == block, "exactly its pages: a no-op"
    assert snapshot(p) == before
    other = p.kv_block_alloc(16, DType.BF16)
    before = snapshot(p)
    pages = (1 << 20) // page
    with pytest.raises(ResourceExhaustedError):
        p.kv_blocks_grow([block, other], [16 * pages, 32])
    with pytest.raises(InvalidArgumentError, match="could ever hold"):
        p.kv_blocks_grow([block, other], [48, 16 * (pages + 1)])
    for bad in (0, -16):
        with pytest.raises(InvalidArgumentError, match="positive"):
            p.kv_blocks_grow([block, other], [64, bad])
    with pytest.raises(InvalidArgumentError, match="more than once"):
        p.kv_blocks_grow([block, block], [64, 64])
    assert snapshot(p) == before, "a refused growth changes nothing"
    assert p.kv_blocks_grow([block, other], [64, 17]) == [block, other]
    assert [b.num_pages for b in p.live_blocks()] == [4, 2]
    assert p.kv_block_read(block)[: len(data)] == data, "the bytes stay where they were"
    p.kv_blocks_free([block, other])
    assert p.memory_stats().used_bytes == 0, "every grown page released with its block"


def test_a_refused_growth_across_dtypes_changes_nothing_not_even_the_peak() -> None:
    p = MockBackendProvider(max_memory_mb=1)
    page = p.kv_layout.page_bytes(DType.FP16)
    pages = (1 << 20) // page
    a, b = p.kv_block_alloc(16, DType.FP16), p.kv_block_alloc(16, DType.BF16)
    before = snapshot(p)
    with pytest.raises(ResourceExhaustedError):  # a's pages fit, b's then do not
        p.kv_blocks_grow([a, b], [16 * (pages - 1), 32])
    assert snapshot(p) == before, "a refused growth changes nothing"


def test_a_refused_migration_across_dtypes_leaves_the_target_as_it_was() -> None:
    p = MockBackendProvider(max_memory_mb=1)
    pages = (1 << 20) // p.kv_layout.page_bytes(DType.FP16)
    p.kv_block_migrate(p.kv_block_alloc(16 * (pages // 3), DType.FP16), "mock:1")
    a = p.kv_block_alloc(16 * (pages // 2), DType.FP16)
    b = p.kv_block_alloc(16 * (pages // 4), DType.BF16)
    target = p._memory.device("mock:1")
    before = (target.used, target.peak, target.pages, snapshot(p))
    with pytest.raises(ResourceExhaustedError, match="mock:1"):  # a's pages fit, b's then not
        p.kv_blocks_migrate([a, b], "mock:1")
    assert (target.used, target.peak, target.pages, snapshot(p)) == before


@pytest.mark.parametrize("bad", [True, 1.5, "1", None, (1,)])
def test_a_handle_that_is_not_an_int_is_an_invalid_argument(bad: object) -> None:
    p = MockBackendProvider()
    a = p.kv_block_alloc(16, DType.FP16)
    handle = cast(KVBlock, bad)
    before = snapshot(p)
    calls: list[Callable[[], object]] = [
        lambda: p.kv_block_free(handle),
        lambda: p.kv_blocks_free([a, handle]),
        lambda: p.kv_block_info(handle),
        lambda: p.kv_block_read(handle),
        lambda: p.kv_block_write(handle, bytes(p.kv_layout.page_bytes(DType.FP16))),
        lambda: p.kv_block_copy(a, handle),
        lambda: p.kv_blocks_copy([(handle, a)]),
        lambda: p.kv_block_migrate(handle, "host"),
        lambda: p.kv_blocks_grow([a, handle], [32, 32]),
    ]
    for call in calls:
        with pytest.raises(InvalidArgumentError) as info:
            call()
        assert type(info.value) is InvalidArgumentError, "not a handle at all, not a block error"
        assert info.value.code is ErrorCode.INVALID_ARGUMENT and info.value.hint
    assert snapshot(p) == before


def test_write_counts_the_bytes_of_any_buffer() -> None:
    p = MockBackendProvider()
    block = p.kv_block_alloc(16, DType.FP16)
    size = p.kv_layout.page_bytes(DType.FP16)
    values = array("H", random.Random(4).choices(range(1 << 16), k=size // 2))
    p.kv_block_write(block, cast(bytes, memoryview(values)))  # any buffer, at run time
    assert p.kv_block_read(block) == values.tobytes()
    with pytest.raises(InvalidArgumentError, match=f"{2 * size} bytes"):
        p.kv_block_write(block, cast(bytes, memoryview(array("H", bytes(2 * size)))))


def test_too_many_devices_are_refused_at_once() -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidArgumentError, match="num_devices") as info:
        MockBackendProvider(num_devices=1_000_000_000)
    assert time.perf_counter() - started < 1.0 and info.value.hint
    many = MockBackendProvider(num_devices=MAX_DEVICES)
    moved = many.kv_block_migrate(many.kv_block_alloc(16, DType.FP16), f"mock:{MAX_DEVICES - 1}")
    assert many.kv_block_info(moved).device == f"mock:{MAX_DEVICES - 1}"


def test_a_huge_allocation_is_resource_exhausted_not_a_memory_error() -> None:
    p = MockBackendProvider(max_memory_mb=100_000_000)
    before = snapshot(p)
    for call in (
        lambda: p.kv_block_alloc(10**10, DType.FP16),
        lambda: p.kv_blocks_alloc([10**9] * 3, DType.FP16),
        lambda: p.kv_blocks_alloc([16] * (MAX_PAGES + 1), DType.FP16),
    ):
        with pytest.raises(ResourceExhaustedError, match="pages") as info:
            call()
        assert info.value.hint
    with pytest.raises(InvalidArgumentError, match="could ever hold"):
        p.kv_block_alloc(10**20, DType.FP16)
    assert snapshot(p) == before


@pytest.mark.parametrize("copier", [copy.copy, copy.deepcopy, pickle.dumps])
def test_a_provider_cannot_be_copied_or_pickled(copier: Callable[[object], object]) -> None:
    p = MockBackendProvider()
    with pytest.raises(InvalidArgumentError) as info:
        copier(p)
    assert info.value.hint and "get_backend" in info.value.hint
    p.kv_block_alloc(16, DType.FP16)
    assert p.memory_stats().kv_blocks_in_use == 1, "the provider is untouched"


def allocate_until_closed(p: MockBackendProvider, go: threading.Event) -> None:
    go.wait()
    with contextlib.suppress(BackendUnavailableError):
        while True:
            p.kv_block_alloc(16, DType.FP16)
            p.kv_blocks_alloc([16, 40], DType.FP16)


def test_blocks_allocated_by_threads_racing_close_are_not_left_accounted() -> None:
    for _ in range(5):
        p = MockBackendProvider()
        memory = p._memory.device(p.device)
        go = threading.Event()
        threads = [threading.Thread(target=allocate_until_closed, args=(p, go)) for _ in range(3)]
        for t in threads:
            t.start()
        go.set()
        time.sleep(0.02)
        p.close()
        for t in threads:
            t.join(timeout=10)
        assert (memory.used, memory.pages) == (0, 0), "every block freed by close"
