"""What the check modules share: accounting snapshots and synchronised reads."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sagellm_backend.dtypes import DType
from sagellm_backend.kv import KVBlock
from sagellm_backend.protocols import BackendProvider
from sagellm_backend.testing.check import CheckContext, ConformanceFailure

__all__ = ["assert_unchanged", "first_dtype", "kv_counts", "read_now", "snapshot"]

Snapshot = tuple[tuple[int, int], dict[KVBlock, bytes]]


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


def first_dtype(ctx: CheckContext[Any]) -> DType:
    """The first dtype the provider claims; the checks' default block dtype."""
    return ctx.capability.supported_dtypes[0]
