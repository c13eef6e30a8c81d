"""What the check modules share: KV dtypes and block sizes, accounting snapshots and
synchronised reads."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from sagellm_backend.dtypes import DType
from sagellm_backend.kv import KVBlock
from sagellm_backend.protocols import BackendProvider
from sagellm_backend.testing.check import CheckContext, ConformanceFailure

__all__ = [
    "UNKNOWN_POOL_PAGES",
    "assert_unchanged",
    "first_kv_dtype",
    "kv_counts",
    "kv_dtypes",
    "pool_pages",
    "random_tokens",
    "read_now",
    "snapshot",
]

Snapshot = tuple[tuple[int, int], dict[KVBlock, bytes]]

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
    """Accounting and the bytes of ``blocks``, to compare after a refused call."""
    return kv_counts(provider), {b: read_now(provider, b) for b in blocks}


def assert_unchanged(provider: BackendProvider[Any], before: Snapshot, what: str) -> None:
    """Fail unless accounting and block bytes are as in ``before`` (a refused call's promise)."""
    counts, data = before
    now = kv_counts(provider)
    if now != counts:
        raise ConformanceFailure(
            f"{what} changed the accounting: (blocks, pages) in use went from {counts} to {now}"
        )
    for block, expected in data.items():
        if read_now(provider, block) != expected:
            raise ConformanceFailure(f"{what} changed the bytes of block {block.handle}")


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
