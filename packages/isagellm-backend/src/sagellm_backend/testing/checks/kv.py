"""KV blocks: exact accounting, bytes preserved by copy, migrate and the batched forms,
exhaustion, all-or-nothing batches and picklable handles."""

from __future__ import annotations

import functools
import pickle
from typing import Any, TypeVar

from sagellm_backend.device import HOST
from sagellm_backend.dtypes import DType
from sagellm_backend.errors import (
    BackendError,
    BlockNotFoundError,
    CapabilityError,
    InvalidArgumentError,
    InvalidBlockError,
    ResourceExhaustedError,
)
from sagellm_backend.kv import KVBlock
from sagellm_backend.protocols import BackendProvider
from sagellm_backend.testing.check import (
    Area,
    Check,
    CheckContext,
    CheckSkipped,
    ConformanceFailure,
    block_pages,
    claims,
    expect_refusal,
    lacks,
)
from sagellm_backend.testing.checks.common import (
    assert_unchanged,
    first_dtype,
    kv_counts,
    read_now,
    snapshot,
)

__all__ = ["CHECKS", "pool_pages"]

T = TypeVar("T")


def _token_counts(provider: BackendProvider[Any]) -> list[int]:
    tpb = provider.kv_layout.tokens_per_block
    return [1, tpb, tpb + 1, 3 * tpb, 2 * tpb - 1]


def _expect_counts(provider: BackendProvider[Any], expected: tuple[int, int], when: str) -> None:
    got = kv_counts(provider)
    if got != expected:
        raise ConformanceFailure(
            f"accounting is not exact {when}: (blocks, pages) in use is {got}, expected {expected}"
        )


def _expect_bytes(got: bytes, expected: bytes, what: str) -> None:
    if got != expected:
        differing = sum(1 for x, y in zip(got, expected, strict=False) if x != y)
        raise ConformanceFailure(
            f"{what}: the bytes differ ({differing} of {len(expected)} bytes differ, "
            f"length {len(got)})"
        )


def _accounting(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    dtype = first_dtype(ctx)
    base_blocks, base_pages = kv_counts(p)
    tokens = _token_counts(p)
    blocks = [p.kv_block_alloc(n, dtype) for n in tokens]
    for n, block in zip(tokens, blocks, strict=True):
        if block.pages and block.num_pages != p.kv_layout.pages_for(n):
            raise ConformanceFailure(
                f"a block of {n} tokens has {block.num_pages} pages; ceil(num_tokens / "
                f"tokens_per_block) is {p.kv_layout.pages_for(n)}"
            )
        if block.num_tokens != n or DType(block.dtype) is not dtype:
            raise ConformanceFailure(f"the handle {block} does not describe what was allocated")
    if len({b.handle for b in blocks}) != len(blocks):
        raise ConformanceFailure("two live blocks share a handle")
    pages = [page for b in blocks for page in b.pages]
    if len(set(pages)) != len(pages):
        raise ConformanceFailure("a page was handed out to two live blocks")
    total_pages = sum(block_pages(p, b) for b in blocks)
    _expect_counts(p, (base_blocks + len(blocks), base_pages + total_pages), "after allocation")
    half = blocks[: len(blocks) // 2]
    for block in half:
        p.kv_block_free(block)
    freed_pages = sum(block_pages(p, b) for b in half)
    _expect_counts(
        p,
        (base_blocks + len(blocks) - len(half), base_pages + total_pages - freed_pages),
        "after freeing half",
    )
    for block in blocks[len(half) :]:
        p.kv_block_free(block)
    _expect_counts(p, (base_blocks, base_pages), "after freeing everything")


def _dtypes(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    tokens = p.kv_layout.tokens_per_block
    for dtype in ctx.capability.supported_dtypes:
        for spelling in (dtype, dtype.value):
            try:
                block = p.kv_block_alloc(tokens, spelling)
            except BackendError as exc:
                raise ConformanceFailure(
                    f"dtype {dtype.value} is claimed but allocating a block of it "
                    f"(given as {spelling!r}) raised {type(exc).__name__}: {exc}"
                ) from exc
            if DType(block.dtype) is not dtype:
                raise ConformanceFailure(f"asked for {dtype.value}, got a block of {block.dtype}")
            data = ctx.fill(p, block)
            _expect_bytes(read_now(p, block), data, f"a {dtype.value} block written and read")
            p.kv_block_free(block)
    before = snapshot(p)
    for dtype in DType:
        if dtype in ctx.capability.supported_dtypes:
            continue
        for spelling in (dtype, dtype.value):
            expect_refusal(
                f"dtype {dtype.value} is not claimed, so allocating it (as {spelling!r}) is "
                "refused",
                CapabilityError,
                functools.partial(p.kv_block_alloc, tokens, spelling),
            )
    assert_unchanged(p, before, "a refused allocation of an unclaimed dtype")


def _write_read(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    dtype = first_dtype(ctx)
    a = p.kv_block_alloc(3 * p.kv_layout.tokens_per_block, dtype)
    b = p.kv_block_alloc(3 * p.kv_layout.tokens_per_block, dtype)
    data_a = ctx.fill(p, a)
    data_b = ctx.fill(p, b)
    _expect_bytes(read_now(p, a), data_a, "bytes written into a block and read back")
    _expect_bytes(read_now(p, a), data_a, "a second read of the same block")
    _expect_bytes(read_now(p, b), data_b, "a write into one block left another")


def _copy(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    tpb = p.kv_layout.tokens_per_block
    for dtype in ctx.capability.supported_dtypes:
        src = p.kv_block_alloc(2 * tpb, dtype)
        dst = p.kv_block_alloc(tpb + 1, dtype)
        data = ctx.fill(p, src)
        ctx.fill(p, dst)
        p.kv_block_copy(src, dst)
        _expect_bytes(read_now(p, dst), data, f"kv_block_copy ({dtype.value}) into the target")
        _expect_bytes(read_now(p, src), data, f"kv_block_copy ({dtype.value}) at the source")
        p.kv_blocks_free([src, dst])


def _copy_refused(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    dtype = first_dtype(ctx)
    src = p.kv_block_alloc(1, dtype)
    dst = p.kv_block_alloc(1, dtype)
    ctx.fill(p, src)
    ctx.fill(p, dst)
    before = snapshot(p, [src, dst])
    expect_refusal(
        "kv_block_copy without has_kv_block_copy is refused",
        CapabilityError,
        lambda: p.kv_block_copy(src, dst),
    )
    expect_refusal(
        "kv_blocks_copy without has_kv_block_copy is refused",
        CapabilityError,
        lambda: p.kv_blocks_copy([(src, dst)]),
    )
    assert_unchanged(p, before, "a refused copy")


def _migrate(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    base = kv_counts(p)
    block = p.kv_block_alloc(2 * p.kv_layout.tokens_per_block + 1, first_dtype(ctx))
    data = ctx.fill(p, block)
    moved = p.kv_block_migrate(block, HOST)
    if moved.device != HOST or moved.num_tokens != block.num_tokens:
        raise ConformanceFailure(f"migrating to {HOST!r} returned {moved}")
    _expect_bytes(read_now(p, moved), data, f"kv_block_migrate to {HOST!r}")
    expect_refusal(
        "the source handle of a migrated block is released (reading it is refused)",
        BlockNotFoundError,
        lambda: p.kv_block_read(block),
    )
    back = p.kv_block_migrate(moved, p.device)
    if back.device != p.device:
        raise ConformanceFailure(f"migrating to {p.device!r} returned a block on {back.device!r}")
    _expect_bytes(read_now(p, back), data, f"kv_block_migrate from {HOST!r} back to {p.device!r}")
    p.kv_block_free(back)
    _expect_counts(p, base, "after migrating a block away and back and freeing it")


def _migrate_refused(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    block = p.kv_block_alloc(1, first_dtype(ctx))
    ctx.fill(p, block)
    before = snapshot(p, [block])
    expect_refusal(
        "kv_block_migrate without has_kv_block_migrate is refused",
        CapabilityError,
        lambda: p.kv_block_migrate(block, HOST),
    )
    expect_refusal(
        "kv_blocks_migrate without has_kv_block_migrate is refused",
        CapabilityError,
        lambda: p.kv_blocks_migrate([block], HOST),
    )
    assert_unchanged(p, before, "a refused migration")


def _batched_alloc_free(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    base_blocks, base_pages = kv_counts(p)
    tokens = _token_counts(p)
    blocks = p.kv_blocks_alloc(tokens, first_dtype(ctx))
    if [b.num_tokens for b in blocks] != tokens:
        raise ConformanceFailure("kv_blocks_alloc did not return one block per count, in order")
    if len({b.handle for b in blocks}) != len(blocks):
        raise ConformanceFailure("kv_blocks_alloc returned two blocks with one handle")
    pages = sum(block_pages(p, b) for b in blocks)
    _expect_counts(p, (base_blocks + len(blocks), base_pages + pages), "after kv_blocks_alloc")
    data = {b: ctx.fill(p, b) for b in blocks}
    for block, expected in data.items():
        _expect_bytes(read_now(p, block), expected, "a block of a batched allocation")
    p.kv_blocks_free(blocks)
    _expect_counts(p, (base_blocks, base_pages), "after kv_blocks_free")


def _batched_copy(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    dtype = first_dtype(ctx)
    tokens = _token_counts(p)
    srcs = p.kv_blocks_alloc(tokens, dtype)
    dsts = p.kv_blocks_alloc(tokens, dtype)
    data = [ctx.fill(p, b) for b in srcs]
    for b in dsts:
        ctx.fill(p, b)
    p.synchronize()
    stream = p.create_stream() if ctx.capability.has_stream else None
    done = p.kv_blocks_copy(list(zip(srcs, dsts, strict=True)), stream=stream)
    done.synchronize()
    for i, (dst, expected) in enumerate(zip(dsts, data, strict=True)):
        _expect_bytes(p.kv_block_read(dst), expected, f"kv_blocks_copy, pair {i}")
    p.kv_blocks_free(srcs + dsts)


def _batched_migrate(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    base = kv_counts(p)
    blocks = p.kv_blocks_alloc(_token_counts(p), first_dtype(ctx))
    data = [ctx.fill(p, b) for b in blocks]
    p.synchronize()
    stream = p.create_stream() if ctx.capability.has_stream else None
    moved, done = p.kv_blocks_migrate(blocks, HOST, stream=stream)
    done.synchronize()
    if len(moved) != len(blocks) or any(m.device != HOST for m in moved):
        raise ConformanceFailure(f"kv_blocks_migrate to {HOST!r} returned {moved}")
    for i, (block, expected) in enumerate(zip(moved, data, strict=True)):
        _expect_bytes(p.kv_block_read(block), expected, f"kv_blocks_migrate to host, block {i}")
    for block in blocks:
        expect_refusal(
            "the source handles of a batched migration are released",
            BlockNotFoundError,
            functools.partial(p.kv_block_read, block),
        )
    back, done = p.kv_blocks_migrate(moved, p.device, stream=stream)
    done.synchronize()
    for i, (block, expected) in enumerate(zip(back, data, strict=True)):
        _expect_bytes(p.kv_block_read(block), expected, f"kv_blocks_migrate back, block {i}")
    p.kv_blocks_free(back)
    _expect_counts(p, base, "after a batched migration away and back and freeing")


def _all_or_nothing(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    dtype = first_dtype(ctx)
    tpb = p.kv_layout.tokens_per_block
    live = p.kv_blocks_alloc([tpb, tpb, 2 * tpb], dtype)
    for b in live:
        ctx.fill(p, b)
    gone = p.kv_block_alloc(tpb, dtype)
    p.kv_block_free(gone)
    before = snapshot(p, live)
    expect_refusal(
        "kv_blocks_alloc with one invalid count allocates nothing",
        InvalidArgumentError,
        lambda: p.kv_blocks_alloc([tpb, 0, tpb], dtype),
    )
    assert_unchanged(p, before, "kv_blocks_alloc with one invalid count")
    expect_refusal(
        "kv_blocks_free with one freed block frees nothing",
        BlockNotFoundError,
        lambda: p.kv_blocks_free([live[0], gone]),
    )
    assert_unchanged(p, before, "kv_blocks_free with one freed block")
    expect_refusal(
        "kv_blocks_free naming one block twice frees nothing",
        BackendError,
        lambda: p.kv_blocks_free([live[0], live[0]]),
    )
    assert_unchanged(p, before, "kv_blocks_free naming one block twice")
    if ctx.capability.has_kv_block_copy:
        expect_refusal(
            "kv_blocks_copy with one mismatched pair copies nothing",
            InvalidBlockError,
            lambda: p.kv_blocks_copy([(live[0], live[1]), (live[0], live[2])]),
        )
        assert_unchanged(p, before, "kv_blocks_copy with one mismatched pair")
    if ctx.capability.has_kv_block_migrate:
        expect_refusal(
            "kv_blocks_migrate with one freed block moves nothing",
            BlockNotFoundError,
            lambda: p.kv_blocks_migrate([live[0], gone], HOST),
        )
        assert_unchanged(p, before, "kv_blocks_migrate with one freed block")


def pool_pages(provider: BackendProvider[Any], dtype: DType) -> int | None:
    """Pages of ``dtype`` the provider's pool can hold at most, where it says."""
    total = provider.memory_stats().kv_pages_total
    if total is not None:
        return total
    max_mb = provider.capability().max_memory_mb
    if max_mb is None:
        return None
    return (max_mb << 20) // provider.kv_layout.page_bytes(dtype)


def _exhaustion(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    dtype = first_dtype(ctx)
    capacity = pool_pages(p, dtype)
    pages_per_block = max(1, min(64, (capacity or 512) // 8))
    page_bytes = p.kv_layout.page_bytes(dtype)
    tokens = pages_per_block * p.kv_layout.tokens_per_block
    limit = ctx.target.exhaustion_limit_bytes
    if limit is not None and capacity is not None and capacity * page_bytes > limit:
        raise CheckSkipped(
            f"the pool ({capacity * page_bytes >> 20} MiB) is larger than the target's "
            f"exhaustion limit ({limit >> 20} MiB); give it a smaller pool (max_memory_mb)"
        )
    base = kv_counts(p)
    blocks: list[KVBlock] = []
    while True:
        if limit is not None and (len(blocks) + 1) * pages_per_block * page_bytes > limit:
            p.kv_blocks_free(blocks)
            raise CheckSkipped(
                f"the pool was not exhausted by {limit >> 20} MiB, the target's exhaustion "
                "limit; give it a smaller pool (max_memory_mb)"
            )
        try:
            blocks.append(p.kv_block_alloc(tokens, dtype))
        except ResourceExhaustedError:
            break
    if not blocks:
        raise ConformanceFailure("the pool was exhausted before a single block was allocated")
    ctx.note(f"exhausted after {len(blocks)} blocks of {pages_per_block} pages")
    data = ctx.fill(p, blocks[0])
    before = snapshot(p, [blocks[0]])
    error = expect_refusal(
        "allocating from an exhausted pool is refused with resource_exhausted",
        ResourceExhaustedError,
        lambda: p.kv_block_alloc(tokens, dtype),
    )
    if not error.hint:
        raise ConformanceFailure("the resource_exhausted error says nothing about what to do")
    assert_unchanged(p, before, "a refused allocation from an exhausted pool")
    p.kv_block_free(blocks.pop())
    try:
        blocks.append(p.kv_block_alloc(tokens, dtype))
    except ResourceExhaustedError as exc:
        raise ConformanceFailure(
            "the pool is not usable after exhaustion: freeing a block did not make room for "
            "one of the same size"
        ) from exc
    _expect_bytes(read_now(p, blocks[0]), data, "a live block after the pool was exhausted")
    p.kv_blocks_free(blocks)
    _expect_counts(p, base, "after exhausting the pool and freeing everything")


def _pickle(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    block = p.kv_block_alloc(p.kv_layout.tokens_per_block + 3, first_dtype(ctx))
    data = ctx.fill(p, block)
    clone = pickle.loads(pickle.dumps(block))
    if clone != block or hash(clone) != hash(block):
        raise ConformanceFailure(f"a KV block handle changed through pickling: {clone}")
    _expect_bytes(read_now(p, clone), data, "a block read through an unpickled handle")
    p.kv_block_free(clone)
    expect_refusal(
        "a block freed through an unpickled handle is released",
        BlockNotFoundError,
        lambda: p.kv_block_read(block),
    )


CHECKS = (
    Check(
        "kv.accounting",
        Area.KV,
        "allocation and freeing account blocks and pages exactly; no page is handed out twice",
        _accounting,
    ),
    Check(
        "kv.dtypes",
        Area.KV,
        "every claimed dtype allocates; every other dtype is refused with CapabilityError",
        _dtypes,
    ),
    Check(
        "kv.write_read",
        Area.KV,
        "bytes written into a block are read back unchanged",
        _write_read,
    ),
    Check(
        "kv.copy",
        Area.KV,
        "kv_block_copy moves every byte into the target and leaves the source unchanged",
        _copy,
        claims("has_kv_block_copy"),
    ),
    Check(
        "kv.copy_refused",
        Area.KV,
        "without has_kv_block_copy, copies are refused with CapabilityError",
        _copy_refused,
        lacks("has_kv_block_copy"),
    ),
    Check(
        "kv.migrate",
        Area.KV,
        "kv_block_migrate to host and back preserves the bytes and releases the source",
        _migrate,
        claims("has_kv_block_migrate"),
    ),
    Check(
        "kv.migrate_refused",
        Area.KV,
        "without has_kv_block_migrate, migrations are refused with CapabilityError",
        _migrate_refused,
        lacks("has_kv_block_migrate"),
    ),
    Check(
        "kv.batched_alloc_free",
        Area.KV,
        "kv_blocks_alloc and kv_blocks_free account exactly",
        _batched_alloc_free,
    ),
    Check(
        "kv.batched_copy",
        Area.KV,
        "kv_blocks_copy moves every pair's bytes and its event marks completion",
        _batched_copy,
        claims("has_kv_block_copy"),
    ),
    Check(
        "kv.batched_migrate",
        Area.KV,
        "kv_blocks_migrate preserves every block's bytes and releases the sources",
        _batched_migrate,
        claims("has_kv_block_migrate"),
    ),
    Check(
        "kv.all_or_nothing",
        Area.KV,
        "a batched call with one invalid item is refused and applies none of them",
        _all_or_nothing,
    ),
    Check(
        "kv.exhaustion",
        Area.KV,
        "exhausting the pool raises resource_exhausted, changes nothing, and the pool stays usable",
        _exhaustion,
    ),
    Check(
        "kv.pickle",
        Area.KV,
        "KV block handles survive pickling and stay usable",
        _pickle,
    ),
)
