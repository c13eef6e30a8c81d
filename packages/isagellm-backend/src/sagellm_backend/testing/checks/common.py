"""What the check modules share: KV dtypes and block sizes, where a block is, accounting
snapshots and synchronised reads."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Any

from sagellm_backend.dtypes import DType
from sagellm_backend.kv import KVBlock, KVBlockInfo
from sagellm_backend.protocols import BackendProvider
from sagellm_backend.testing.check import CheckContext, ConformanceFailure

__all__ = [
    "UNKNOWN_POOL_PAGES",
    "assert_unchanged",
    "expect_info",
    "first_kv_dtype",
    "keeps_old_pages",
    "kv_counts",
    "kv_dtypes",
    "pool_pages",
    "random_tokens",
    "read_now",
    "snapshot",
]

Snapshot = tuple[tuple[int, int], dict[KVBlock, tuple[KVBlockInfo, bytes]]]

UNKNOWN_POOL_PAGES = 512
"""Pages assumed for a pool that states no size (neither kv_pages_total nor max_memory_mb)."""


def kv_counts(provider: BackendProvider[Any]) -> tuple[int, int]:
    """(KV blocks in use, KV pages in use) from the provider's memory statistics."""
    stats = provider.memory_stats()
    return stats.kv_blocks_in_use, stats.kv_pages_in_use


def read_now(provider: BackendProvider[Any], block: KVBlock) -> bytes:
    """The block's bytes after every stream of the device has finished its work."""
    provider.synchronize()
    return provider.kv_block_read(block)


def snapshot(provider: BackendProvider[Any], blocks: Iterable[KVBlock] = ()) -> Snapshot:
    """Accounting, and where ``blocks`` are and their bytes, to compare after a refused call."""
    return kv_counts(provider), {
        b: (provider.kv_block_info(b), read_now(provider, b)) for b in blocks
    }


def assert_unchanged(provider: BackendProvider[Any], before: Snapshot, what: str) -> None:
    """Fail unless accounting, where the blocks are and their bytes are as in ``before`` (a
    refused call's promise)."""
    counts, blocks = before
    now = kv_counts(provider)
    if now != counts:
        raise ConformanceFailure(
            f"{what} changed the accounting: (blocks, pages) in use went from {counts} to {now}"
        )
    for block, (info, data) in blocks.items():
        after = provider.kv_block_info(block)
        if after != info:
            raise ConformanceFailure(f"{what} changed where block {block:#x} is: {info} -> {after}")
        if read_now(provider, block) != data:
            raise ConformanceFailure(f"{what} changed the bytes of block {block:#x}")


def expect_info(
    provider: BackendProvider[Any],
    block: KVBlock,
    what: str,
    *,
    dtype: DType,
    device: str,
    num_pages: int,
) -> KVBlockInfo:
    """``kv_block_info(block)``; fail unless ``block`` is an int handle of ``num_pages`` distinct
    pages of ``dtype`` on ``device``."""
    if type(block) is not int:
        raise ConformanceFailure(f"{what}: the handle is {block!r}, not an int")
    info = provider.kv_block_info(block)
    if (info.block, info.device, info.dtype, info.num_pages) != (block, device, dtype, num_pages):
        raise ConformanceFailure(
            f"{what}: kv_block_info({block:#x}) says {info}; expected {num_pages} pages of "
            f"{dtype.value} on {device}"
        )
    if len(set(info.pages)) != num_pages or any(
        type(page) is not int or page < 0 for page in info.pages
    ):
        raise ConformanceFailure(
            f"{what}: kv_block_info({block:#x}) lists pages {info.pages}, not {num_pages} "
            "distinct page indices"
        )
    return info


def keeps_old_pages(provider: BackendProvider[Any], dtype: DType, got: bytes, old: bytes) -> bool:
    """Whether ``got``, the bytes of a grown block, hold ``old``, its bytes before, in its old
    pages.

    How a block's bytes are ordered is the backend's own, so each order of the layout's
    dimensions is tried with the page dimension after those in front of it: chunk ``o`` of
    ``old`` must start chunk ``o`` of ``got`` (a page-major order has one chunk per block, a
    layer-major one one per layer).
    """
    layout = provider.kv_layout
    page_bytes = layout.page_bytes(dtype)
    old_pages, new_pages = len(old) // page_bytes, len(got) // page_bytes
    dims = (layout.num_layers, 2, layout.tokens_per_block, layout.num_kv_heads, layout.head_size)
    outers = sorted(
        {math.prod(c) for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)}
    )
    for outer in outers:
        if page_bytes % outer:
            continue
        inner = page_bytes // outer
        before, after = old_pages * inner, new_pages * inner
        if all(
            got[o * after : o * after + before] == old[o * before : (o + 1) * before]
            for o in range(outer)
        ):
            return True
    return False


def kv_dtypes(ctx: CheckContext[Any]) -> tuple[DType, ...]:
    """Every dtype the provider's KV blocks can hold; the KV checks run over each."""
    return ctx.capability.kv_dtypes


def first_kv_dtype(ctx: CheckContext[Any]) -> DType:
    """The first KV dtype claimed: the dtype of blocks that checks of other areas use."""
    return ctx.capability.kv_dtypes[0]


def pool_pages(provider: BackendProvider[Any], dtype: DType) -> int | None:
    """Pages of ``dtype`` the provider's pool can hold at most, where it says."""
    total = provider.memory_stats().kv_pages_total
    if total is not None:
        return total
    max_mb = provider.capability().max_memory_mb
    if max_mb is None:
        return None
    return (max_mb << 20) // provider.kv_layout.page_bytes(dtype)


def random_tokens(
    ctx: CheckContext[Any], provider: BackendProvider[Any], dtype: DType, count: int, *, share: int
) -> list[int]:
    """``count`` random token counts for blocks of ``dtype``, each up to 1/``share`` of the pool.

    Page counts are log-uniform from 1 to that limit (most blocks small, some very large); the
    last page is filled partly or fully at random.
    """
    capacity = pool_pages(provider, dtype) or UNKNOWN_POOL_PAGES
    limit = max(1, capacity // share)
    tokens_per_block = provider.kv_layout.tokens_per_block
    counts = []
    for _ in range(count):
        pages = min(limit, int(math.exp(ctx.rng.uniform(0.0, math.log(limit + 1)))))
        pages = max(1, pages)
        counts.append((pages - 1) * tokens_per_block + ctx.rng.randint(1, tokens_per_block))
    return counts
