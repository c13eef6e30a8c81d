"""KV blocks: exact accounting, where each block is (``kv_block_info``), bytes preserved by copy,
migrate, grow and the batched forms, exhaustion (by single blocks and by batches), all-or-nothing
batches, picklable handles, and a long seeded run of mixed operations checked against a model.

Every check runs over every KV dtype the capability claims (``kv_dtypes``), with random block
sizes up to what the pool can hold (log-uniform: most blocks small, some of many pages).
"""

from __future__ import annotations

import functools
import pickle
from collections import Counter
from collections.abc import Callable
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
from sagellm_backend.kv import KVBlock, KVBlockInfo
from sagellm_backend.protocols import BackendProvider
from sagellm_backend.testing.check import (
    Area,
    Check,
    CheckContext,
    CheckSkipped,
    ConformanceFailure,
    block_pages,
    claims,
    claims_op,
    expect_refusal,
    lacks,
    lacks_op,
)
from sagellm_backend.testing.checks.common import (
    assert_unchanged,
    expect_info,
    keeps_old_pages,
    kv_counts,
    kv_dtypes,
    pool_pages,
    random_tokens,
    read_now,
    snapshot,
)
from sagellm_backend.testing.checks.long_run import long_run

__all__ = ["CHECKS"]

T = TypeVar("T")


def _each_kv_dtype(
    body: Callable[[CheckContext[T], BackendProvider[T], DType], None],
) -> Callable[[CheckContext[T]], None]:
    """A check body that runs ``body`` once for every KV dtype claimed."""

    def run(ctx: CheckContext[T]) -> None:
        for dtype in kv_dtypes(ctx):
            body(ctx, ctx.provider, dtype)

    return run


def _token_counts(provider: BackendProvider[Any]) -> list[int]:
    """Counts at and around page boundaries."""
    tpb = provider.kv_layout.tokens_per_block
    return [1, tpb, tpb + 1, 3 * tpb, 2 * tpb - 1]


def _same_pages(ctx: CheckContext[Any], provider: BackendProvider[Any], tokens: int) -> int:
    """A random token count that needs as many pages as ``tokens``."""
    tpb = provider.kv_layout.tokens_per_block
    return (provider.kv_layout.pages_for(tokens) - 1) * tpb + ctx.rng.randint(1, tpb)


def _expect_counts(provider: BackendProvider[Any], expected: tuple[int, int], when: str) -> None:
    got = kv_counts(provider)
    if got != expected:
        raise ConformanceFailure(
            f"accounting is not exact {when}: (blocks, pages) in use is {got}, expected {expected}"
        )


def _expect_bytes(got: bytes, expected: bytes, what: str) -> None:
    if got != expected:
        differing = sum(1 for x, y in zip(got, expected, strict=False) if x != y)
        first = next((i for i, (x, y) in enumerate(zip(got, expected, strict=False)) if x != y), 0)
        raise ConformanceFailure(
            f"{what}: the bytes differ ({differing} of {len(expected)} bytes differ, the first "
            f"at byte {first}; length {len(got)})"
        )


def _accounting(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    for dtype in kv_dtypes(ctx):
        base_blocks, base_pages = kv_counts(p)
        tokens = _token_counts(p) + random_tokens(ctx, p, dtype, 5, share=16)
        blocks = [p.kv_block_alloc(n, dtype) for n in tokens]
        infos = [
            expect_info(
                p,
                block,
                f"a {dtype.value} block of {n} tokens (ceil(num_tokens / tokens_per_block) pages)",
                dtype=dtype,
                device=p.device,
                num_pages=p.kv_layout.pages_for(n),
            )
            for n, block in zip(tokens, blocks, strict=True)
        ]
        if len(set(blocks)) != len(blocks):
            raise ConformanceFailure("two live blocks share a handle")
        pages = [page for info in infos for page in info.pages]
        if len(set(pages)) != len(pages):
            raise ConformanceFailure("a page was handed out to two live blocks")
        total_pages = p.memory_stats().kv_pages_total
        if total_pages is not None and max(pages) >= total_pages:
            raise ConformanceFailure(
                f"page {max(pages)} is past the {total_pages} pages the pool has (kv_pages_total)"
            )
        total = len(pages)
        _expect_counts(
            p, (base_blocks + len(blocks), base_pages + total), f"after {dtype.value} allocations"
        )
        half = blocks[: len(blocks) // 2]
        for block in half:
            p.kv_block_free(block)
        freed = sum(info.num_pages for info in infos[: len(half)])
        _expect_counts(
            p,
            (base_blocks + len(blocks) - len(half), base_pages + total - freed),
            f"after freeing half of the {dtype.value} blocks",
        )
        for block in blocks[len(half) :]:
            p.kv_block_free(block)
        _expect_counts(p, (base_blocks, base_pages), f"after freeing every {dtype.value} block")


def _dtypes(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    for dtype in kv_dtypes(ctx):
        for spelling in (dtype, dtype.value):
            tokens = random_tokens(ctx, p, dtype, 1, share=2)[0]
            try:
                block = p.kv_block_alloc(tokens, spelling)
            except BackendError as exc:
                raise ConformanceFailure(
                    f"KV dtype {dtype.value} is claimed but allocating a block of it "
                    f"(given as {spelling!r}) raised {type(exc).__name__}: {exc}"
                ) from exc
            expect_info(
                p,
                block,
                f"a block of {dtype.value} (given as {spelling!r})",
                dtype=dtype,
                device=p.device,
                num_pages=p.kv_layout.pages_for(tokens),
            )
            data = ctx.fill(p, block)
            _expect_bytes(read_now(p, block), data, f"a {dtype.value} block written and read")
            p.kv_block_free(block)
    before = snapshot(p)
    tokens = p.kv_layout.tokens_per_block
    for dtype in DType:
        if dtype in kv_dtypes(ctx):
            continue
        for spelling in (dtype, dtype.value):
            expect_refusal(
                f"dtype {dtype.value} is not a claimed KV dtype, so allocating it (as "
                f"{spelling!r}) is refused",
                CapabilityError,
                functools.partial(p.kv_block_alloc, tokens, spelling),
            )
    assert_unchanged(p, before, "a refused allocation of an unclaimed dtype")


def _write_read(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    for dtype in kv_dtypes(ctx):
        a_tokens, b_tokens = random_tokens(ctx, p, dtype, 2, share=2)
        a, b = p.kv_block_alloc(a_tokens, dtype), p.kv_block_alloc(b_tokens, dtype)
        data_a = ctx.fill(p, a)
        data_b = ctx.fill(p, b)
        what = f"{dtype.value} block of {block_pages(p, a)} pages"
        _expect_bytes(read_now(p, a), data_a, f"bytes written into a {what} and read back")
        _expect_bytes(read_now(p, a), data_a, f"a second read of the same {what}")
        _expect_bytes(read_now(p, b), data_b, f"a write into one {dtype.value} block left another")
        data_a = ctx.fill(p, a)
        _expect_bytes(read_now(p, a), data_a, f"a rewritten {what}")
        p.kv_blocks_free([a, b])


def _copy(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    for dtype in kv_dtypes(ctx):
        tokens = random_tokens(ctx, p, dtype, 1, share=2)[0]
        src = p.kv_block_alloc(tokens, dtype)
        dst = p.kv_block_alloc(_same_pages(ctx, p, tokens), dtype)
        data = ctx.fill(p, src)
        ctx.fill(p, dst)
        p.kv_block_copy(src, dst)
        what = f"kv_block_copy ({dtype.value}, {block_pages(p, src)} pages)"
        _expect_bytes(read_now(p, dst), data, f"{what} into the target")
        _expect_bytes(read_now(p, src), data, f"{what} at the source")
        p.kv_blocks_free([src, dst])


def _copy_refused(ctx: CheckContext[T], p: BackendProvider[T], dtype: DType) -> None:
    src, dst = p.kv_blocks_alloc(random_tokens(ctx, p, dtype, 1, share=4) * 2, dtype)
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
    p.kv_blocks_free([src, dst])


def _migrate(ctx: CheckContext[T], p: BackendProvider[T], dtype: DType) -> None:
    base = kv_counts(p)
    block = p.kv_block_alloc(random_tokens(ctx, p, dtype, 1, share=4)[0], dtype)
    pages = block_pages(p, block)
    what = f"a {dtype.value} block of {pages} pages"
    data = ctx.fill(p, block)
    moved = p.kv_block_migrate(block, HOST)
    expect_info(p, moved, f"{what} migrated to {HOST!r}", dtype=dtype, device=HOST, num_pages=pages)
    _expect_bytes(read_now(p, moved), data, f"kv_block_migrate of {what} to {HOST!r}")
    for name, use in (("reading", p.kv_block_read), ("kv_block_info of", p.kv_block_info)):
        expect_refusal(
            f"the source handle of a migrated block is released ({name} it is refused)",
            BlockNotFoundError,
            functools.partial(use, block),
        )
    back = p.kv_block_migrate(moved, p.device)
    expect_info(
        p,
        back,
        f"{what} migrated back to {p.device!r}",
        dtype=dtype,
        device=p.device,
        num_pages=pages,
    )
    _expect_bytes(
        read_now(p, back),
        data,
        f"kv_block_migrate of {what} from {HOST!r} back to {p.device!r}",
    )
    p.kv_block_free(back)
    _expect_counts(p, base, f"after migrating {what} away and back and freeing it")


def _migrate_refused(ctx: CheckContext[T], p: BackendProvider[T], dtype: DType) -> None:
    block = p.kv_block_alloc(random_tokens(ctx, p, dtype, 1, share=4)[0], dtype)
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
    p.kv_block_free(block)


def _batched_alloc_free(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    base_blocks, base_pages = kv_counts(p)
    for dtype in kv_dtypes(ctx):
        tokens = _token_counts(p) + random_tokens(ctx, p, dtype, 5, share=16)
        ctx.rng.shuffle(tokens)
        blocks = p.kv_blocks_alloc(tokens, dtype)
        if len(blocks) != len(tokens):
            raise ConformanceFailure(
                f"kv_blocks_alloc ({dtype.value}) of {len(tokens)} counts returned {len(blocks)} "
                "blocks"
            )
        for i, (n, block) in enumerate(zip(tokens, blocks, strict=True)):
            expect_info(
                p,
                block,
                f"block {i} of kv_blocks_alloc ({dtype.value}, {n} tokens)",
                dtype=dtype,
                device=p.device,
                num_pages=p.kv_layout.pages_for(n),
            )
        if len(set(blocks)) != len(blocks):
            raise ConformanceFailure("kv_blocks_alloc returned two blocks with one handle")
        pages = sum(block_pages(p, b) for b in blocks)
        _expect_counts(
            p,
            (base_blocks + len(blocks), base_pages + pages),
            f"after kv_blocks_alloc of {dtype.value}",
        )
        data = {b: ctx.fill(p, b) for b in blocks}
        for block, expected in data.items():
            _expect_bytes(
                read_now(p, block), expected, f"a {dtype.value} block of a batched allocation"
            )
        p.kv_blocks_free(blocks)
        _expect_counts(p, (base_blocks, base_pages), f"after kv_blocks_free of {dtype.value}")


def _batched_copy(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    stream = p.create_stream() if ctx.capability.has_stream else None
    for dtype in kv_dtypes(ctx):
        tokens = random_tokens(ctx, p, dtype, 4, share=8)
        srcs = p.kv_blocks_alloc(tokens, dtype)
        dsts = p.kv_blocks_alloc([_same_pages(ctx, p, n) for n in tokens], dtype)
        data = [ctx.fill(p, b) for b in srcs]
        for b in dsts:
            ctx.fill(p, b)
        p.synchronize()
        done = p.kv_blocks_copy(list(zip(srcs, dsts, strict=True)), stream=stream)
        done.synchronize()
        for i, (dst, expected) in enumerate(zip(dsts, data, strict=True)):
            _expect_bytes(
                p.kv_block_read(dst), expected, f"kv_blocks_copy ({dtype.value}), pair {i}"
            )
        if stream is not None and ctx.capability.has_event:
            # The returned event, recorded again after more work, marks the later point.
            with stream:
                newer = [ctx.fill(p, b) for b in srcs]
                p.kv_blocks_copy(list(zip(srcs, dsts, strict=True)))
            stream.record_event(done)
            done.synchronize()
            for i, (dst, expected) in enumerate(zip(dsts, newer, strict=True)):
                _expect_bytes(
                    p.kv_block_read(dst),
                    expected,
                    f"kv_blocks_copy ({dtype.value}), pair {i}, after its event was recorded "
                    "again and waited for",
                )
        p.kv_blocks_free(srcs + dsts)


def _batched_migrate(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    base = kv_counts(p)
    stream = p.create_stream() if ctx.capability.has_stream else None
    for dtype in kv_dtypes(ctx):
        blocks = p.kv_blocks_alloc(random_tokens(ctx, p, dtype, 5, share=12), dtype)
        pages = [block_pages(p, b) for b in blocks]
        data = [ctx.fill(p, b) for b in blocks]
        p.synchronize()
        moved, done = p.kv_blocks_migrate(blocks, HOST, stream=stream)
        done.synchronize()
        if len(moved) != len(blocks):
            raise ConformanceFailure(f"kv_blocks_migrate of {len(blocks)} blocks returned {moved}")
        for i, (block, n) in enumerate(zip(moved, pages, strict=True)):
            expect_info(
                p,
                block,
                f"block {i} of kv_blocks_migrate ({dtype.value}) to {HOST!r}",
                dtype=dtype,
                device=HOST,
                num_pages=n,
            )
        for i, (block, expected) in enumerate(zip(moved, data, strict=True)):
            _expect_bytes(
                p.kv_block_read(block),
                expected,
                f"kv_blocks_migrate ({dtype.value}) to host, block {i}",
            )
        for block in blocks:
            expect_refusal(
                "the source handles of a batched migration are released",
                BlockNotFoundError,
                functools.partial(p.kv_block_read, block),
            )
        back, done = p.kv_blocks_migrate(moved, p.device, stream=stream)
        done.synchronize()
        for i, (block, n) in enumerate(zip(back, pages, strict=True)):
            expect_info(
                p,
                block,
                f"block {i} of kv_blocks_migrate ({dtype.value}) back to {p.device!r}",
                dtype=dtype,
                device=p.device,
                num_pages=n,
            )
        for i, (block, expected) in enumerate(zip(back, data, strict=True)):
            _expect_bytes(
                p.kv_block_read(block),
                expected,
                f"kv_blocks_migrate ({dtype.value}) back, block {i}",
            )
        p.kv_blocks_free(back)
        _expect_counts(p, base, f"after a batched migration of {dtype.value} away and back")


def _all_or_nothing(ctx: CheckContext[T], p: BackendProvider[T], dtype: DType) -> None:
    tpb = p.kv_layout.tokens_per_block
    tokens = random_tokens(ctx, p, dtype, 1, share=8)[0]
    live = p.kv_blocks_alloc([tokens, _same_pages(ctx, p, tokens), tokens + tpb], dtype)
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
        InvalidArgumentError,
        lambda: p.kv_blocks_free([live[0], live[0]]),
    )
    assert_unchanged(p, before, "kv_blocks_free naming one block twice")
    if ctx.capability.supports_op("kv_grow"):
        more = [block_pages(p, b) * tpb + tpb for b in live]
        grows: dict[str, tuple[type[BackendError], list[KVBlock], list[int]]] = {
            "with one freed block": (BlockNotFoundError, [live[0], gone], more[:2]),
            "with one invalid count": (InvalidArgumentError, live, [more[0], more[1], 0]),
            "naming one block twice": (InvalidArgumentError, [live[0], live[0]], more[:2]),
        }
        for what, (error, blocks, counts) in grows.items():
            expect_refusal(
                f"kv_blocks_grow {what} grows nothing",
                error,
                functools.partial(p.kv_blocks_grow, blocks, counts),
            )
            assert_unchanged(p, before, f"kv_blocks_grow {what}")
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
        expect_refusal(
            "kv_blocks_migrate naming one block twice moves nothing",
            InvalidArgumentError,
            lambda: p.kv_blocks_migrate([live[0], live[0]], HOST),
        )
        assert_unchanged(p, before, "kv_blocks_migrate naming one block twice")
    p.kv_blocks_free(live)


def _split(ctx: CheckContext[Any], total: int, parts: int) -> list[int]:
    """``total`` pages as ``parts`` positive random parts (parts <= total)."""
    cuts = sorted(ctx.rng.sample(range(1, total), parts - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]


def _exhaustion(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    limit = ctx.target.exhaustion_limit_bytes
    for dtype in kv_dtypes(ctx):
        capacity = pool_pages(p, dtype)
        page_bytes = p.kv_layout.page_bytes(dtype)
        if limit is not None and capacity is not None and capacity * page_bytes > limit:
            raise CheckSkipped(
                f"the pool ({capacity * page_bytes >> 20} MiB) is larger than the target's "
                f"exhaustion limit ({limit >> 20} MiB); give it a smaller pool (max_memory_mb)"
            )
        _exhaust(ctx, p, dtype, capacity, limit)


def _exhaust(
    ctx: CheckContext[T],
    p: BackendProvider[T],
    dtype: DType,
    capacity: int | None,
    limit: int | None,
) -> None:
    tpb = p.kv_layout.tokens_per_block
    page_bytes = p.kv_layout.page_bytes(dtype)
    grows = ctx.capability.supports_op("kv_grow")
    base = kv_counts(p)
    blocks: list[KVBlock] = []
    held = 0
    while True:
        tokens = random_tokens(ctx, p, dtype, 1, share=8)[0]
        held += p.kv_layout.pages_for(tokens)
        if limit is not None and held * page_bytes > limit:
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
    failed = tokens
    data = ctx.fill(p, blocks[0])
    before = snapshot(p, [blocks[0]])
    error = expect_refusal(
        f"allocating {dtype.value} from an exhausted pool is refused with resource_exhausted",
        ResourceExhaustedError,
        lambda: p.kv_block_alloc(failed, dtype),
    )
    if not error.hint:
        raise ConformanceFailure("the resource_exhausted error says nothing about what to do")
    assert_unchanged(p, before, "a refused allocation from an exhausted pool")
    if capacity is None:
        batch = [tpb, failed]
        ctx.note(f"{dtype.value}: the pool states no size; a batch was tried without an exact fit")
    else:
        while capacity - kv_counts(p)[1] < 2 and len(blocks) > 1:
            p.kv_block_free(blocks.pop())
        free = capacity - kv_counts(p)[1]
        # A batch that fits until its last block: the earlier blocks must not stay allocated.
        batch = [n * tpb for n in _split(ctx, free + 1, min(4, free + 1))]
    before = snapshot(p, [blocks[0]])
    expect_refusal(
        f"a {dtype.value} batch that runs out of memory midway ({len(batch)} blocks) is refused "
        "with resource_exhausted",
        ResourceExhaustedError,
        lambda: p.kv_blocks_alloc(batch, dtype),
    )
    assert_unchanged(p, before, "a batch allocation that ran out of memory midway")
    if capacity is not None:
        free = capacity - kv_counts(p)[1]
        if free:
            fitting = [n * tpb for n in _split(ctx, free, min(4, free))]
            try:
                blocks += p.kv_blocks_alloc(fitting, dtype)
            except ResourceExhaustedError as exc:
                raise ConformanceFailure(
                    f"a batch of exactly the {free} free pages was refused: {exc}"
                ) from exc
        before = snapshot(p, [blocks[0]])
        expect_refusal(
            "allocating one page from a pool filled exactly by a batch is refused",
            ResourceExhaustedError,
            lambda: p.kv_block_alloc(1, dtype),
        )
        assert_unchanged(p, before, "a refused allocation from an exactly full pool")
        if grows:
            expect_refusal(
                "growing a block of a full pool by one page is refused with resource_exhausted",
                ResourceExhaustedError,
                functools.partial(
                    p.kv_block_grow, blocks[0], (block_pages(p, blocks[0]) + 1) * tpb
                ),
            )
            assert_unchanged(p, before, "a refused grow in a full pool")
    freed = blocks.pop()
    freed_pages = block_pages(p, freed)
    p.kv_block_free(freed)
    if grows and capacity is not None and len(blocks) > 1:
        # A batched grow that fits until its last block: the first must not keep its pages.
        counts = [
            (block_pages(p, blocks[0]) + freed_pages) * tpb,
            (block_pages(p, blocks[1]) + 1) * tpb,
        ]
        before = snapshot(p, blocks[:2])
        expect_refusal(
            "a batched grow that runs out of memory midway is refused with resource_exhausted",
            ResourceExhaustedError,
            functools.partial(p.kv_blocks_grow, blocks[:2], counts),
        )
        assert_unchanged(p, before, "a batched grow that ran out of memory midway")
    try:
        blocks.append(p.kv_block_alloc(freed_pages * tpb, dtype))
    except ResourceExhaustedError as exc:
        raise ConformanceFailure(
            "the pool is not usable after exhaustion: freeing a block did not make room for "
            "one of the same size"
        ) from exc
    _expect_bytes(read_now(p, blocks[0]), data, "a live block after the pool was exhausted")
    ctx.note(f"{dtype.value}: exhausted after {len(blocks)} blocks")
    p.kv_blocks_free(blocks)
    _expect_counts(p, base, f"after exhausting the pool with {dtype.value} and freeing everything")


def _pickle(ctx: CheckContext[T], p: BackendProvider[T], dtype: DType) -> None:
    block = p.kv_block_alloc(random_tokens(ctx, p, dtype, 1, share=4)[0], dtype)
    data = ctx.fill(p, block)
    copied: object = pickle.loads(pickle.dumps(block))
    if type(copied) is not int or copied != block or hash(copied) != hash(block):
        raise ConformanceFailure(f"a KV block handle changed through pickling: {copied!r}")
    clone = KVBlock(copied)
    if p.kv_block_info(clone) != p.kv_block_info(block):
        raise ConformanceFailure("kv_block_info of an unpickled handle differs from the original")
    _expect_bytes(read_now(p, clone), data, "a block read through an unpickled handle")
    p.kv_block_free(clone)
    expect_refusal(
        "a block freed through an unpickled handle is released",
        BlockNotFoundError,
        lambda: p.kv_block_read(block),
    )


def _expect_grown(
    p: BackendProvider[T], block: KVBlock, old: KVBlockInfo, data: bytes, num_tokens: int, what: str
) -> None:
    """``block`` grown in place from ``old`` to hold ``num_tokens``: old pages first, bytes kept."""
    pages = max(old.num_pages, p.kv_layout.pages_for(num_tokens))
    info = expect_info(p, block, what, dtype=old.dtype, device=old.device, num_pages=pages)
    if info.pages[: old.num_pages] != old.pages:
        raise ConformanceFailure(
            f"{what}: its pages went from {old.pages} to {info.pages}; growing appends pages and "
            "keeps the old ones first"
        )
    if not keeps_old_pages(p, old.dtype, read_now(p, block), data):
        raise ConformanceFailure(f"{what}: the old pages do not hold the bytes they held")


def _grow(ctx: CheckContext[T], p: BackendProvider[T], dtype: DType) -> None:
    tpb = p.kv_layout.tokens_per_block
    base_blocks, base_pages = kv_counts(p)
    blocks = p.kv_blocks_alloc(random_tokens(ctx, p, dtype, 3, share=16), dtype)
    data = [ctx.fill(p, b) for b in blocks]
    old = [p.kv_block_info(b) for b in blocks]
    tokens = [(o.num_pages + ctx.rng.randint(0, 3)) * tpb - ctx.rng.randrange(tpb) for o in old]
    held = base_pages + sum(
        max(o.num_pages, p.kv_layout.pages_for(n)) for o, n in zip(old, tokens, strict=True)
    )
    grown = p.kv_block_grow(blocks[0], tokens[0])
    if type(grown) is not int or grown != blocks[0]:
        raise ConformanceFailure(
            f"kv_block_grow of block {blocks[0]:#x} returned {grown!r}; a block grows in place "
            "and keeps its handle"
        )
    grown_all = p.kv_blocks_grow(blocks[1:], tokens[1:])
    if grown_all != blocks[1:]:
        raise ConformanceFailure(
            f"kv_blocks_grow of {[f'{b:#x}' for b in blocks[1:]]} returned {grown_all!r}; blocks "
            "grow in place and keep their handles, in order"
        )
    for i, (block, o, d, n) in enumerate(zip(blocks, old, data, tokens, strict=True)):
        _expect_grown(
            p,
            block,
            o,
            d,
            n,
            f"{dtype.value} block {i} grown from {o.num_pages} pages to {n} tokens",
        )
    _expect_counts(p, (base_blocks + len(blocks), held), f"after growing {dtype.value} blocks")
    data = [ctx.fill(p, b) for b in blocks]
    for i, (block, expected) in enumerate(zip(blocks, data, strict=True)):
        _expect_bytes(read_now(p, block), expected, f"a grown {dtype.value} block {i} rewritten")
    before = snapshot(p, blocks)
    capacity = block_pages(p, blocks[0]) * tpb
    for n in (1, capacity - tpb + 1, capacity):
        if p.kv_block_grow(blocks[0], n) != blocks[0]:
            raise ConformanceFailure(
                "kv_block_grow to no more pages than the block has returned another handle"
            )
    assert_unchanged(p, before, f"growing a block of {capacity} tokens to no more pages")
    for n in (0, -tpb):
        expect_refusal(
            f"kv_block_grow to num_tokens={n} is refused",
            InvalidArgumentError,
            functools.partial(p.kv_block_grow, blocks[0], n),
        )
    assert_unchanged(p, before, "a refused grow")
    p.kv_blocks_free(blocks)
    _expect_counts(p, (base_blocks, base_pages), f"after freeing grown {dtype.value} blocks")


def _grow_refused(ctx: CheckContext[T], p: BackendProvider[T], dtype: DType) -> None:
    block = p.kv_block_alloc(random_tokens(ctx, p, dtype, 1, share=4)[0], dtype)
    ctx.fill(p, block)
    before = snapshot(p, [block])
    more = (block_pages(p, block) + 1) * p.kv_layout.tokens_per_block
    expect_refusal(
        "kv_block_grow without the kv_grow op is refused",
        CapabilityError,
        functools.partial(p.kv_block_grow, block, more),
    )
    expect_refusal(
        "kv_blocks_grow without the kv_grow op is refused",
        CapabilityError,
        functools.partial(p.kv_blocks_grow, [block], [more]),
    )
    assert_unchanged(p, before, "a refused grow")
    p.kv_block_free(block)


def _long_run(ctx: CheckContext[T]) -> None:
    counts: Counter[str] = long_run(ctx)
    ctx.note(", ".join(f"{n} {op}" for op, n in sorted(counts.items())))


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
        "every claimed KV dtype allocates; every other dtype is refused with CapabilityError",
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
        _each_kv_dtype(_copy_refused),
        lacks("has_kv_block_copy"),
    ),
    Check(
        "kv.migrate",
        Area.KV,
        "kv_block_migrate to host and back preserves the bytes and releases the source",
        _each_kv_dtype(_migrate),
        claims("has_kv_block_migrate"),
    ),
    Check(
        "kv.migrate_refused",
        Area.KV,
        "without has_kv_block_migrate, migrations are refused with CapabilityError",
        _each_kv_dtype(_migrate_refused),
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
        "kv.grow",
        Area.KV,
        "kv_block_grow and kv_blocks_grow grow blocks in place: the same handles, the old pages "
        "first and their bytes kept, exact accounting; no more pages is a no-op",
        _each_kv_dtype(_grow),
        claims_op("kv_grow"),
    ),
    Check(
        "kv.grow_refused",
        Area.KV,
        "without the kv_grow op, grows are refused with CapabilityError",
        _each_kv_dtype(_grow_refused),
        lacks_op("kv_grow"),
    ),
    Check(
        "kv.all_or_nothing",
        Area.KV,
        "a batched call with one invalid item is refused and applies none of them",
        _each_kv_dtype(_all_or_nothing),
    ),
    Check(
        "kv.exhaustion",
        Area.KV,
        "exhausting the pool, by one block or by a batch that runs out midway, raises "
        "resource_exhausted, changes nothing, and the pool stays usable",
        _exhaustion,
    ),
    Check(
        "kv.pickle",
        Area.KV,
        "KV block handles survive pickling and stay usable",
        _each_kv_dtype(_pickle),
    ),
    Check(
        "kv.long_run",
        Area.KV,
        "thousands of seeded mixed KV operations on one provider keep exact accounting and "
        "every block's bytes",
        _long_run,
    ),
)
