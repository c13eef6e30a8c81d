"""Bad inputs: each is refused with its typed error and stable code, and changes nothing."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from sagellm_backend.device import HOST
from sagellm_backend.errors import (
    BlockNotFoundError,
    ErrorCode,
    EventStateError,
    InvalidArgumentError,
    InvalidBlockError,
    KernelNotFoundError,
)
from sagellm_backend.kv import KVBlock
from sagellm_backend.protocols import BackendProvider
from sagellm_backend.testing.check import (
    Area,
    Check,
    CheckContext,
    ConformanceFailure,
    call_untyped,
    claims,
    expect_refusal,
)
from sagellm_backend.testing.checks.common import (
    assert_unchanged,
    first_kv_dtype,
    pool_pages,
    snapshot,
)

__all__ = ["CHECKS"]

T = TypeVar("T")


def _num_tokens(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    dtype = first_kv_dtype(ctx)
    bad: list[object] = [0, -1, -p.kv_layout.tokens_per_block, True, 1.5, "16", None]
    capacity = pool_pages(p, dtype)
    if capacity is not None:
        bad.append((capacity + 1) * p.kv_layout.tokens_per_block)
    else:
        ctx.note("the pool size is unknown; an over-large count was not tried")
    before = snapshot(p)
    for value in bad:
        expect_refusal(
            f"num_tokens={value!r} is refused",
            InvalidArgumentError,
            call_untyped(p.kv_block_alloc, value, dtype),
            code=ErrorCode.INVALID_ARGUMENT,
        )
    assert_unchanged(p, before, "a refused num_tokens")


def _dtype(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    before = snapshot(p)
    for value in ("fp64", "float16", "", 3, None):
        expect_refusal(
            f"the unknown dtype {value!r} is refused",
            InvalidArgumentError,
            call_untyped(p.kv_block_alloc, 1, value),
            code=ErrorCode.INVALID_ARGUMENT,
        )
    assert_unchanged(p, before, "a refused dtype")


def _double_free(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    keep = p.kv_block_alloc(1, first_kv_dtype(ctx))
    ctx.fill(p, keep)
    block = p.kv_block_alloc(1, first_kv_dtype(ctx))
    p.kv_block_free(block)
    before = snapshot(p, [keep])
    expect_refusal(
        "a double free is refused",
        BlockNotFoundError,
        lambda: p.kv_block_free(block),
        code=ErrorCode.BLOCK_NOT_FOUND,
    )
    expect_refusal(
        "a double free in a batch is refused",
        BlockNotFoundError,
        lambda: p.kv_blocks_free([block]),
        code=ErrorCode.BLOCK_NOT_FOUND,
    )
    assert_unchanged(p, before, "a refused double free")


def _uses(
    ctx: CheckContext[Any], p: BackendProvider[Any], live: KVBlock, block: object
) -> dict[str, Callable[[], object]]:
    """Every call of ``p`` that names ``block`` (with the live ``live`` where it needs two)."""
    size = len(p.kv_block_read(live))
    tokens = p.kv_layout.tokens_per_block
    uses: dict[str, Callable[[], object]] = {
        "kv_block_free": call_untyped(p.kv_block_free, block),
        "kv_blocks_free": call_untyped(p.kv_blocks_free, [live, block]),
        "kv_block_info": call_untyped(p.kv_block_info, block),
        "kv_block_read": call_untyped(p.kv_block_read, block),
        "kv_block_write": call_untyped(p.kv_block_write, block, ctx.random_bytes(size)),
    }
    if ctx.capability.has_kv_block_copy:
        uses["kv_block_copy from it"] = call_untyped(p.kv_block_copy, block, live)
        uses["kv_block_copy into it"] = call_untyped(p.kv_block_copy, live, block)
    if ctx.capability.has_kv_block_migrate:
        uses["kv_block_migrate"] = call_untyped(p.kv_block_migrate, block, HOST)
        uses["kv_blocks_migrate"] = call_untyped(p.kv_blocks_migrate, [live, block], HOST)
    if ctx.capability.supports_op("kv_grow"):
        uses["kv_block_grow"] = call_untyped(p.kv_block_grow, block, tokens)
        uses["kv_blocks_grow"] = call_untyped(p.kv_blocks_grow, [live, block], [tokens] * 2)
    return uses


def _use_after_free(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    live = p.kv_block_alloc(1, first_kv_dtype(ctx))
    ctx.fill(p, live)
    gone = p.kv_block_alloc(1, first_kv_dtype(ctx))
    ctx.fill(p, gone)
    p.kv_block_free(gone)
    stale = {"use after free": gone}
    moved = []
    if ctx.capability.has_kv_block_migrate:
        away = p.kv_block_alloc(1, first_kv_dtype(ctx))
        ctx.fill(p, away)
        moved.append(p.kv_block_migrate(away, HOST))
        stale["use after migrate"] = away
    before = snapshot(p, [live, *moved])
    for what, block in stale.items():
        for name, use in _uses(ctx, p, live, block).items():
            expect_refusal(
                f"{what} ({name}) is refused",
                BlockNotFoundError,
                use,
                code=ErrorCode.BLOCK_NOT_FOUND,
            )
    assert_unchanged(p, before, "a refused use of a freed or migrated block")


def _foreign_block(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    other = ctx.new_provider()
    mine = p.kv_block_alloc(1, first_kv_dtype(ctx))
    ctx.fill(p, mine)
    theirs = other.kv_block_alloc(1, first_kv_dtype(ctx))
    ctx.fill(other, theirs)
    before, before_other = snapshot(p, [mine]), snapshot(other, [theirs])
    # The provider has handed out one handle, ``mine``: every other int is foreign to it.
    foreign = {
        "a block of another provider": theirs,
        "the int 0": 0,
        "the int -1": -1,
        "the int after the only handle given out": mine + 1,
        "the only handle given out plus 2**64": mine + (1 << 64),
    }
    for what, block in foreign.items():
        for name, use in _uses(ctx, p, mine, block).items():
            expect_refusal(
                f"{what} is refused with foreign_block ({name})",
                InvalidBlockError,
                use,
                code=ErrorCode.FOREIGN_BLOCK,
            )
    assert_unchanged(p, before, "a refused foreign block")
    assert_unchanged(other, before_other, "a refused foreign block (on its owner)")


def _handle_type(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    mine = p.kv_block_alloc(1, first_kv_dtype(ctx))
    ctx.fill(p, mine)
    before = snapshot(p, [mine])
    bad: list[object] = [str(mine), f"{mine:#x}", float(mine), True, False, None, (mine,)]
    for block in bad:
        for name, use in _uses(ctx, p, mine, block).items():
            expect_refusal(
                f"the handle {block!r} ({type(block).__name__}, not an int) is refused ({name})",
                InvalidArgumentError,
                use,
                code=ErrorCode.INVALID_ARGUMENT,
            )
    assert_unchanged(p, before, "a refused handle that is not an int")


def _mismatched_copy(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    dtypes = ctx.capability.kv_dtypes
    tpb = p.kv_layout.tokens_per_block
    src = p.kv_block_alloc(tpb, dtypes[0])
    longer = p.kv_block_alloc(2 * tpb, dtypes[0])
    targets = [("a different page count", longer)]
    if len(dtypes) > 1:
        targets.append(
            (f"{dtypes[0].value} into {dtypes[1].value}", p.kv_block_alloc(1, dtypes[1]))
        )
    else:
        ctx.note("one dtype is claimed; a copy across dtypes was not tried")
    for block in (src, *(b for _, b in targets)):
        ctx.fill(p, block)
    before = snapshot(p, [src, *(b for _, b in targets)])
    for what, dst in targets:
        expect_refusal(
            f"a copy between blocks of {what} is refused",
            InvalidBlockError,
            functools.partial(p.kv_block_copy, src, dst),
            code=ErrorCode.KV_BLOCK_MISMATCH,
        )
    assert_unchanged(p, before, "a refused mismatched copy")


def _migrate_target(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    block = p.kv_block_alloc(1, first_kv_dtype(ctx))
    ctx.fill(p, block)
    before = snapshot(p, [block])
    for target in ("", "cuda::0", "Mock:0", "host:x", " host", "nosuchdevice:99"):
        expect_refusal(
            f"migrating to {target!r} is refused",
            InvalidArgumentError,
            functools.partial(p.kv_block_migrate, block, target),
            code=ErrorCode.INVALID_ARGUMENT,
        )
    assert_unchanged(p, before, "a refused migration target")


def _event_state(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    recorded = p.create_event(enable_timing=True)
    recorded.record()
    never = p.create_event(enable_timing=True)
    expect_refusal(
        "elapsed_ms to an event that was never recorded is refused",
        EventStateError,
        lambda: never.elapsed_ms(recorded),
        code=ErrorCode.INVALID_EVENT_STATE,
    )
    expect_refusal(
        "elapsed_ms from an event that was never recorded is refused",
        EventStateError,
        lambda: recorded.elapsed_ms(never),
        code=ErrorCode.INVALID_EVENT_STATE,
    )
    start = p.create_event(enable_timing=False)
    end = p.create_event(enable_timing=False)
    start.record()
    end.record()
    end.synchronize()
    expect_refusal(
        "elapsed_ms between events created without timing is refused",
        EventStateError,
        lambda: end.elapsed_ms(start),
        code=ErrorCode.INVALID_EVENT_STATE,
    )


def _write_size(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    block = p.kv_block_alloc(1, first_kv_dtype(ctx))
    size = len(ctx.fill(p, block))
    before = snapshot(p, [block])
    for wrong in (0, size - 1, size + 1):
        expect_refusal(
            f"writing {wrong} bytes into a block of {size} is refused",
            InvalidArgumentError,
            functools.partial(p.kv_block_write, block, ctx.random_bytes(wrong)),
            code=ErrorCode.INVALID_ARGUMENT,
        )
    assert_unchanged(p, before, "a refused write")


def _unknown_kernel(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    p.register_kernel("conformance_known", lambda: None)
    error = expect_refusal(
        "get_kernel of an unknown name is refused",
        KernelNotFoundError,
        lambda: p.get_kernel("conformance_unknown"),
        code=ErrorCode.OPERATOR_NOT_FOUND,
    )
    if "conformance_known" not in str(error):
        raise ConformanceFailure(
            f"the error for an unknown kernel does not list the registered names: {error}"
        )
    expect_refusal(
        "kernel_spec of an unknown name is refused",
        KernelNotFoundError,
        lambda: p.kernel_spec("conformance_unknown"),
    )


CHECKS = (
    Check(
        "inputs.num_tokens",
        Area.INPUTS,
        "num_tokens that is not a positive int, or more than the pool could ever hold, is "
        "refused with invalid_argument",
        _num_tokens,
    ),
    Check(
        "inputs.dtype",
        Area.INPUTS,
        "an unknown dtype is refused with invalid_argument (not a capability error)",
        _dtype,
    ),
    Check(
        "inputs.double_free",
        Area.INPUTS,
        "a double free is refused with block_not_found and changes nothing",
        _double_free,
    ),
    Check(
        "inputs.use_after_free",
        Area.INPUTS,
        "every use of a freed block is refused with block_not_found",
        _use_after_free,
    ),
    Check(
        "inputs.foreign_block",
        Area.INPUTS,
        "a block of another provider is refused with foreign_block",
        _foreign_block,
    ),
    Check(
        "inputs.handle_type",
        Area.INPUTS,
        "a KV block handle that is not an int (a str, a float, a bool, None, a tuple) is refused "
        "with invalid_argument",
        _handle_type,
    ),
    Check(
        "inputs.mismatched_copy",
        Area.INPUTS,
        "a copy between blocks of different page counts or dtypes is refused with "
        "kv_block_mismatch",
        _mismatched_copy,
        claims("has_kv_block_copy"),
    ),
    Check(
        "inputs.migrate_target",
        Area.INPUTS,
        "migrating to a malformed or unknown device is refused with invalid_argument",
        _migrate_target,
        claims("has_kv_block_migrate"),
    ),
    Check(
        "inputs.event_state",
        Area.INPUTS,
        "elapsed_ms on an unrecorded event or on events without timing is refused with "
        "invalid_event_state",
        _event_state,
        claims("has_event"),
    ),
    Check(
        "inputs.write_size",
        Area.INPUTS,
        "kv_block_write with data of the wrong size is refused with invalid_argument",
        _write_size,
    ),
    Check(
        "inputs.unknown_kernel",
        Area.INPUTS,
        "get_kernel of an unknown name is refused with operator_not_found, listing the "
        "registered names",
        _unknown_kernel,
    ),
)
