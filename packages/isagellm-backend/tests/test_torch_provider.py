"""The cpu backend as one process sees it: KV pool, blocks, streams, capability, options."""

from __future__ import annotations

import copy
import os
import pickle
import random
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from typing import cast

import pytest

pytest.importorskip("torch", reason="needs torch: pip install 'isagellm-backend[torch]'")

import torch

from sagellm_backend import (
    HOST,
    BackendProvider,
    BackendUnavailableError,
    BlockNotFoundError,
    CapabilityError,
    CollectiveOp,
    DType,
    ErrorCode,
    EventStateError,
    InvalidArgumentError,
    InvalidBlockError,
    KernelKind,
    KVBlock,
    ReduceOp,
    ResourceExhaustedError,
    UnknownOptionError,
)
from sagellm_backend.ops import KERNEL_OPS, STANDARD_OPS
from sagellm_backend.torch_backend.cpu import create_cpu_backend
from sagellm_backend.torch_backend.cpu_device import HostEvent, HostStream
from sagellm_backend.torch_backend.provider import TorchBackendProvider

Provider = TorchBackendProvider[HostStream, HostEvent]
LAYOUT = {"num_layers": 3, "num_kv_heads": 2, "head_size": 8, "tokens_per_block": 4}


@pytest.fixture
def p() -> Iterator[Provider]:
    provider: Provider = create_cpu_backend(num_blocks=16, host_num_blocks=8, **LAYOUT)
    yield provider
    provider.close()


def fill(p: Provider, block: KVBlock) -> bytes:
    info = p.kv_block_info(block)
    data = os.urandom(p.kv_layout.page_bytes(info.dtype) * info.num_pages)
    p.kv_block_write(block, data)
    return data


def counts(p: Provider) -> tuple[int, int]:
    stats = p.memory_stats()
    return stats.kv_blocks_in_use, stats.kv_pages_in_use


def test_satisfies_the_protocol_and_describes_itself(p: Provider) -> None:
    assert isinstance(p, BackendProvider)
    cap = p.capability()
    assert (p.kind, p.device, p.rank, p.world_size) == ("cpu", "cpu:0", 0, 1)
    assert cap.device_type == "cpu"
    assert cap.supported_dtypes == (DType.FP32, DType.FP16, DType.BF16)
    assert cap.kv_dtypes == (DType.FP16,)
    assert set(cap.supported_kernels) == {
        KernelKind.ATTENTION,
        KernelKind.FUSION,
        KernelKind.LAYERNORM,
    }
    assert cap.has_stream and cap.has_event and cap.has_collective
    assert not cap.has_graph_exec
    assert set(cap.supported_collectives) == {
        CollectiveOp.ALL_REDUCE,
        CollectiveOp.ALL_GATHER,
        CollectiveOp.REDUCE_SCATTER,
        CollectiveOp.BROADCAST,
        CollectiveOp.SEND,
        CollectiveOp.RECV,
        CollectiveOp.BARRIER,
    }
    assert set(cap.supported_reduce_ops) == set(ReduceOp)
    assert cap.extra["dist_backend"] == "gloo"
    assert cap.extra["pinned_host_memory"] == "false"
    assert p.kv_layout.dtype is DType.FP16
    assert cap.supported_ops == tuple(STANDARD_OPS)


def test_the_pool_is_preallocated_and_blocks_are_views_into_it(p: Provider) -> None:
    cache = p.kv_pool()
    assert cache.shape == (3, 16, 2, 4, 2, 8) and cache.dtype == torch.float16
    address = cache.data_ptr()
    blocks = p.kv_blocks_alloc([4, 5, 9], "fp16")
    infos = [p.kv_block_info(b) for b in blocks]
    assert [i.block for i in infos] == blocks
    assert [(i.device, i.dtype, i.num_pages) for i in infos] == [
        ("cpu:0", DType.FP16, n) for n in (1, 2, 3)
    ]
    pages = [page for i in infos for page in i.pages]
    assert len(set(pages)) == len(pages) and all(0 <= q < 16 for q in pages)
    # Writing through the block is visible in the pool tensor that kernels read, and back.
    data = fill(p, blocks[1])
    expected = torch.frombuffer(bytearray(data), dtype=torch.int16).view(3, 2, 2, 4, 2, 8)
    assert torch.equal(cache[:, list(infos[1].pages)].view(torch.int16), expected)
    cache[2, infos[1].pages[0], 1] = 1.5
    assert (
        torch.frombuffer(bytearray(p.kv_block_read(blocks[1])), dtype=torch.float16)
        .view(3, 2, 2, 4, 2, 8)[2, 0, 1]
        .eq(1.5)
        .all()
    )
    layer = p.kv_cache(1)
    assert layer.shape == p.kv_layout.cache_shape(16) and layer.data_ptr() == cache[1].data_ptr()
    assert p.kv_cache(1, HOST).data_ptr() == p.kv_pool(HOST)[1].data_ptr()
    for bad in (3, -1, True, "0"):
        with pytest.raises(InvalidArgumentError, match="layer must be"):
            p.kv_cache(bad)  # type: ignore[arg-type]
    p.kv_blocks_free(blocks)
    assert p.kv_pool().data_ptr() == address
    assert counts(p) == (0, 0)


def test_copy_and_migrate_preserve_bytes_both_ways(p: Provider) -> None:
    src, dst = p.kv_blocks_alloc([8, 7], "fp16")
    data = fill(p, src)
    p.kv_block_copy(src, dst)
    assert p.kv_block_read(dst) == data
    on_host = p.kv_block_migrate(dst, HOST)
    assert p.kv_block_info(on_host).device == HOST and p.kv_block_read(on_host) == data
    with pytest.raises(BlockNotFoundError):
        p.kv_block_read(dst)
    back = p.kv_block_migrate(on_host, "cpu:0")
    assert p.kv_block_info(back).device == "cpu:0" and p.kv_block_read(back) == data
    assert len({src, dst, on_host, back}) == 4, "a migration gives a new handle"
    assert counts(p) == (2, 4)


def test_batched_copy_and_swap_are_one_op_per_batch(
    p: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = p.kv_blocks_alloc([4, 8, 12], "fp16")
    targets = p.kv_blocks_alloc([3, 5, 9], "fp16")
    datas = [fill(p, b) for b in sources]
    scatters = 0
    original = torch.Tensor.index_copy_

    def counting(self: torch.Tensor, *args: object) -> torch.Tensor:
        nonlocal scatters
        scatters += 1
        return original(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.Tensor, "index_copy_", counting)
    side = p.create_stream()
    event = p.kv_blocks_copy(list(zip(sources, targets, strict=True)), stream=side)
    assert scatters == 1
    event.synchronize()
    assert event.query()
    assert [p.kv_block_read(b) for b in targets] == datas
    moved, swapped = p.kv_blocks_migrate(targets, HOST, stream=side)
    assert scatters == 2
    swapped.synchronize()
    assert [p.kv_block_info(b).device for b in moved] == [HOST] * 3
    for old in targets:
        with pytest.raises(BlockNotFoundError):
            p.kv_block_info(old)
    assert [p.kv_block_read(b) for b in moved] == datas
    assert p.memory_stats().kv_pages_in_use == 6


def test_exhaustion_and_bad_inputs_change_nothing(p: Provider) -> None:
    keep = p.kv_block_alloc(4 * 10, "fp16")
    data = fill(p, keep)
    before = counts(p)
    with pytest.raises(ResourceExhaustedError) as exhausted:
        p.kv_blocks_alloc([4 * 3, 4 * 4], "fp16")
    assert exhausted.value.code is ErrorCode.RESOURCE_EXHAUSTED
    with pytest.raises(InvalidArgumentError):
        p.kv_block_alloc(4 * 17, "fp16")
    with pytest.raises(CapabilityError, match="kv_dtype=bf16"):
        p.kv_block_alloc(4, "bf16")
    with pytest.raises(InvalidArgumentError):
        p.kv_block_alloc(4, "fp64")
    with pytest.raises(InvalidArgumentError):
        p.kv_block_alloc(0, "fp16")
    with pytest.raises(InvalidArgumentError):
        p.kv_block_migrate(keep, "cpu:1")
    with pytest.raises(InvalidArgumentError):
        p.kv_block_write(keep, data[:-1])
    short = p.kv_block_alloc(4, "fp16")
    with pytest.raises(InvalidBlockError) as mismatch:
        p.kv_block_copy(keep, short)
    assert mismatch.value.code is ErrorCode.KV_BLOCK_MISMATCH
    p.kv_block_free(short)
    with pytest.raises(BlockNotFoundError):
        p.kv_block_free(short)
    other: Provider = create_cpu_backend(num_blocks=4, host_num_blocks=4, **LAYOUT)
    try:
        theirs = other.kv_block_alloc(4, "fp16")
        with pytest.raises(InvalidBlockError) as foreign:
            p.kv_block_free(theirs)
        assert foreign.value.code is ErrorCode.FOREIGN_BLOCK
    finally:
        other.close()
    assert counts(p) == before
    assert p.kv_block_read(keep) == data


def test_cpu_streams_and_events_are_honest(p: Provider) -> None:
    stream = p.create_stream()
    assert stream.query()
    with stream:
        assert p.current_stream() == stream
        start = p.create_event()
        start.record()
        time.sleep(0.02)
        end = stream.record_event()
    assert p.current_stream() != stream
    assert end.query() and 15.0 <= end.elapsed_ms(start) < 1000.0
    stream.wait_event(end)
    p.current_stream().wait_stream(stream)
    with pytest.raises(EventStateError):
        p.create_event().elapsed_ms(start)
    untimed = p.create_event(enable_timing=False)
    untimed.record()
    with pytest.raises(EventStateError):
        untimed.elapsed_ms(start)
    with pytest.raises(InvalidArgumentError):
        p.kv_blocks_copy([], stream=object())  # type: ignore[arg-type]


def test_cpu_streams_left_out_of_order_are_refused_and_stay_current(p: Provider) -> None:
    outer, inner = p.create_stream(), p.create_stream()
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(InvalidArgumentError, match="order they were entered"):
        outer.__exit__(None, None, None)
    assert p.current_stream() == inner
    inner.__exit__(None, None, None)
    assert p.current_stream() == outer
    outer.__exit__(None, None, None)
    assert p.current_stream() not in (outer, inner)


def test_unclaimed_operations_are_refused(p: Provider) -> None:
    with pytest.raises(CapabilityError):
        p.capture_graph()
    with pytest.raises(CapabilityError):
        p.register_kernel("gemm", torch.matmul, kind=KernelKind.MATMUL)


def test_kernels_take_the_compute_dtypes_and_blocks_the_kv_dtypes(p: Provider) -> None:
    before = {s.name for s in p.list_kernels()}
    for bad in (["fp8"], "int8", [DType.FP32, "int4"]):
        with pytest.raises(CapabilityError, match="does not support") as info:
            p.register_kernel("scale", torch.mul, kind="fusion", dtypes=bad)
        assert info.value.code is ErrorCode.NOT_IMPLEMENTED and info.value.hint
    assert {s.name for s in p.list_kernels()} == before
    spec = p.register_kernel("scale", torch.mul, kind="fusion", dtypes=["fp32", DType.BF16])
    assert spec.dtypes == {DType.FP32, DType.BF16}
    names: list[object] = [["x"], {}, None, 3]
    for name in names:
        for lookup in (p.get_kernel, p.kernel_spec):
            with pytest.raises(InvalidArgumentError, match="a kernel name is a string"):
                lookup(name)  # type: ignore[arg-type]  # bad on purpose
    with pytest.raises(CapabilityError, match="kv_dtype=fp32"):
        p.kv_block_alloc(4, "fp32")
    assert counts(p) == (0, 0)
    assert p.kv_block_info(p.kv_block_alloc(4, p.capability().kv_dtypes[0])).dtype is DType.FP16


def test_options_and_the_default_pool(p: Provider) -> None:
    default: Provider = create_cpu_backend()
    try:
        pages = default.memory_stats().kv_pages_total
        assert pages is not None
        assert pages * default.kv_layout.page_bytes(DType.FP16) <= 256 << 20
    finally:
        default.close()
    budget: Provider = create_cpu_backend(kv_memory_mb=1, kv_dtype="bf16", num_layers=1)
    try:
        assert budget.memory_stats().kv_pages_total == (1 << 20) // budget.kv_layout.page_bytes(
            "bf16"
        )
        assert budget.kv_block_info(budget.kv_block_alloc(1, "bf16")).dtype is DType.BF16
    finally:
        budget.close()
    with pytest.raises(UnknownOptionError):
        create_cpu_backend(num_pages=3)
    with pytest.raises(InvalidArgumentError):
        create_cpu_backend(kv_memory_mb=0)
    with pytest.raises(CapabilityError):
        create_cpu_backend(kv_dtype="int8")


def test_config_objects_and_device_selection() -> None:
    class Config:
        kind = "cpu"
        device = "cpu:0"
        device_ids = None

    made: Provider = create_cpu_backend(Config(), num_blocks=2, host_num_blocks=2)
    made.close()
    Config.device = "1"
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        create_cpu_backend(Config(), num_blocks=2, host_num_blocks=2)


def test_standard_ops_are_the_registered_kernels(p: Provider) -> None:
    for op in KERNEL_OPS:
        assert p.get_op(op.name) is p.find_op(op.name) is p.get_kernel(op.name)
    table = p.get_op("rotary_cos_sin_cache")(64, 16, dtype="bf16")
    assert table.shape == (64, 16) and table.dtype == torch.bfloat16
    assert table.device == p.torch_device
    with pytest.raises(InvalidArgumentError, match="provider method"):
        p.get_op("kv_grow")


def test_a_closed_provider_refuses_calls(p: Provider) -> None:
    p.close()
    p.close()
    with pytest.raises(BackendUnavailableError):
        p.kv_block_alloc(4, "fp16")
    for lookup in (p.get_op, p.get_kernel, p.kernel_spec):
        with pytest.raises(BackendUnavailableError):
            lookup("rms_norm")
    with pytest.raises(BackendUnavailableError):
        p.list_kernels()


def test_growth_appends_pages_in_place_without_copying(p: Provider) -> None:
    assert p.capability().supports_op("kv_grow")
    block = p.kv_block_alloc(4, "fp16")
    data = fill(p, block)
    pool = p.kv_pool()
    before = p.kv_block_info(block)
    assert p.kv_block_grow(block, 10) == block, "grown in place: the same handle"
    grown = p.kv_block_info(block)
    assert (grown.block, grown.pages[:1], grown.num_pages) == (block, before.pages, 3)
    assert len(set(grown.pages)) == 3
    head = pool[:, grown.pages[0]].contiguous().view(torch.uint8).flatten().numpy().tobytes()
    assert head == data, "the first page stays where it was, with its bytes"
    read = torch.frombuffer(bytearray(p.kv_block_read(block)), dtype=torch.int16)
    old = torch.frombuffer(bytearray(data), dtype=torch.int16)
    assert torch.equal(read.view(3, 3, -1)[:, 0], old.view(3, -1)), "read: page 0 still first"
    assert counts(p) == (1, 3)
    assert p.kv_block_grow(block, 3) == block, "growing to fewer tokens is a no-op"
    assert p.kv_block_info(block) == grown and counts(p) == (1, 3)
    for bad in (0, -4):
        with pytest.raises(InvalidArgumentError):
            p.kv_block_grow(block, bad)
    other = p.kv_block_alloc(4, "fp16")
    with pytest.raises(ResourceExhaustedError):
        p.kv_blocks_grow([block, other], [4 * 10, 4 * 16])
    assert p.kv_block_info(block) == grown and counts(p) == (2, 4), "all or nothing"
    with pytest.raises(InvalidArgumentError):
        p.kv_blocks_grow([block, block], [12, 16])
    assert p.kv_blocks_grow([block, other], [12, 8]) == [block, other]
    assert [p.kv_block_info(b).num_pages for b in (block, other)] == [3, 2]
    assert counts(p) == (2, 5)
    p.kv_blocks_free([block, other])
    with pytest.raises(BlockNotFoundError):
        p.kv_block_grow(block, 20)
    assert counts(p) == (0, 0)


def test_write_counts_the_bytes_of_any_buffer(p: Provider) -> None:
    block = p.kv_block_alloc(4, "fp16")
    size = p.kv_layout.page_bytes(DType.FP16)
    values = array("H", os.urandom(size))
    p.kv_block_write(block, cast(bytes, memoryview(values)))  # any buffer, at run time
    assert p.kv_block_read(block) == values.tobytes()
    with pytest.raises(InvalidArgumentError, match=f"got {2 * size}"):
        p.kv_block_write(block, cast(bytes, memoryview(array("H", bytes(2 * size)))))


@pytest.mark.parametrize("copier", [copy.copy, copy.deepcopy, pickle.dumps])
def test_a_provider_cannot_be_copied_or_pickled(
    p: Provider, copier: Callable[[object], object]
) -> None:
    with pytest.raises(InvalidArgumentError, match="cannot be"):
        copier(p)
    block = p.kv_block_alloc(4, "fp16")
    assert pickle.loads(pickle.dumps(block)) == block, "handles still pickle"


def test_free_after_an_event_of_this_provider_only(p: Provider) -> None:
    a, b = p.kv_blocks_alloc([4, 4], "fp16")
    event = p.create_event()
    event.record()
    p.kv_block_free(a, after=event)
    with pytest.raises(InvalidArgumentError, match="not an event"):
        p.kv_blocks_free([b], after=object())  # type: ignore[arg-type]  # deliberately wrong
    assert counts(p)[0] == 1
    p.kv_blocks_free([b], after=p.current_stream().record_event())
    assert counts(p) == (0, 0)


def test_a_refused_batch_free_leaves_the_free_list_and_the_blocks_as_they_were(p: Provider) -> None:
    a, b, c = p.kv_blocks_alloc([4, 4, 4], "fp16")
    p.kv_block_free(b)
    free_list = list(p._pool.pools["cpu:0"].free)
    for bad in ([a, b, c], [a, c, a], [a, "x", c], [c, a, KVBlock(a + 1)]):
        with pytest.raises((BlockNotFoundError, InvalidArgumentError, InvalidBlockError)):
            p.kv_blocks_free(bad)  # type: ignore[arg-type]  # deliberately a string once
        assert p._pool.pools["cpu:0"].free == free_list, bad
        assert [p.kv_block_info(x).pages for x in (a, c)] == [(0,), (2,)], bad
    p.kv_blocks_free([c, a])
    assert p._pool.pools["cpu:0"].free == [*free_list, 2, 0] and counts(p) == (0, 0)


def test_single_and_batch_frees_onto_the_pool_never_share_a_page_under_thread_switches(
    switching_threads: Callable[[Callable[[int], None], int], None],
) -> None:
    """Six threads switch every microsecond while they mix the single-block calls, batches that
    go straight onto the pool's free list and batches refused halfway (a stale handle): every
    page is owned by one block at a time, and at the end every page is free exactly once."""
    p: Provider = create_cpu_backend(num_blocks=512, host_num_blocks=8, **LAYOUT)
    owner: dict[int, KVBlock] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def own(block: KVBlock) -> None:
        (page,) = p.kv_block_info(block).pages
        with lock:
            holder = owner.setdefault(page, block)
        assert holder == block, f"page {page} of {block:#x} is also {holder:#x}'s"

    def disown(block: KVBlock) -> None:
        (page,) = p.kv_block_info(block).pages
        with lock:
            del owner[page]

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        held: list[KVBlock] = []
        stale: KVBlock | None = None
        try:
            for _ in range(300):
                if rng.random() < 0.5:
                    new = [p.kv_block_alloc(rng.choice([1, 4]), "fp16")]
                else:
                    new = p.kv_blocks_alloc([4] * rng.randint(1, 4), "fp16")
                for block in new:
                    own(block)
                held += new
                rng.shuffle(held)
                while len(held) > 8:
                    batch = [held.pop() for _ in range(rng.randint(1, 3))]
                    if stale is not None and rng.random() < 0.3:
                        with pytest.raises(BlockNotFoundError):
                            p.kv_blocks_free([*batch, stale])
                    for block in batch:
                        disown(block)
                    if len(batch) == 1 and rng.random() < 0.5:
                        p.kv_block_free(batch[0])
                    else:
                        p.kv_blocks_free(batch)
                    stale = batch[0]
            for block in held:
                disown(block)
            p.kv_blocks_free(held)
        except BaseException as exc:  # reported below
            errors.append(exc)

    switching_threads(worker, 6)
    assert not errors, errors[0]
    assert owner == {} and counts(p) == (0, 0)
    assert sorted(p._pool.pools["cpu:0"].free) == list(range(512)), "every page free once"
    p.close()
