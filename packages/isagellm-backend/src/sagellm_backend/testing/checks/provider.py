"""The provider as a whole: protocol shape, a stable capability matrix, close()."""

from __future__ import annotations

from typing import TypeVar

from sagellm_backend.capability import CapabilityDescriptor
from sagellm_backend.device import DeviceRef, MemoryStats
from sagellm_backend.errors import BackendError, InvalidArgumentError
from sagellm_backend.kv import KVLayout
from sagellm_backend.protocols import BackendProvider
from sagellm_backend.testing.check import (
    Area,
    Check,
    CheckContext,
    ConformanceFailure,
    expect_refusal,
)
from sagellm_backend.testing.checks.common import first_kv_dtype

__all__ = ["CHECKS"]

T = TypeVar("T")


def _protocol(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    shape: object = p
    if not isinstance(shape, BackendProvider):
        missing = sorted(
            name
            for name in dir(BackendProvider)
            if not name.startswith("_") and not hasattr(shape, name)
        )
        raise ConformanceFailure(f"the provider lacks BackendProvider members: {missing}")
    capability = p.capability()
    if not isinstance(capability, CapabilityDescriptor):
        raise ConformanceFailure(f"capability() returned a {type(capability).__name__}")
    if p.capability() != capability:
        raise ConformanceFailure("capability() returned two different matrices")
    if CapabilityDescriptor.from_json(capability.to_json()) != capability:
        raise ConformanceFailure("the capability matrix does not survive a JSON round trip")
    if not capability.supported_dtypes:
        raise ConformanceFailure("the capability matrix claims no dtype at all")
    if not capability.kv_dtypes:
        raise ConformanceFailure("the capability matrix claims no KV dtype (kv_dtypes is empty)")
    if not isinstance(p.kv_layout, KVLayout):
        raise ConformanceFailure(f"kv_layout is a {type(p.kv_layout).__name__}, not a KVLayout")
    stats = p.memory_stats()
    if not isinstance(stats, MemoryStats):
        raise ConformanceFailure(f"memory_stats() returned a {type(stats).__name__}")
    if stats.kv_blocks_in_use != 0 or stats.kv_pages_in_use != 0:
        raise ConformanceFailure(f"a new provider already has KV blocks in use: {stats}")
    try:
        DeviceRef.parse(p.device)
    except InvalidArgumentError as exc:
        raise ConformanceFailure(f"the provider's device {p.device!r} is malformed") from exc
    if not 0 <= p.rank < p.world_size:
        raise ConformanceFailure(f"rank {p.rank} is outside a world of {p.world_size}")


def _close(ctx: CheckContext[T]) -> None:
    p = ctx.target.make_provider()
    dtype = first_kv_dtype(ctx)
    p.kv_block_alloc(1, dtype)
    p.close()
    for what, call in (
        ("allocation", lambda: p.kv_block_alloc(1, dtype)),
        ("memory_stats", p.memory_stats),
        ("kernel lookups", p.list_kernels),
        ("new streams", p.create_stream),
    ):
        expect_refusal(f"a closed provider refuses {what}", BackendError, call)


CHECKS = (
    Check(
        "provider.protocol",
        Area.PROVIDER,
        "the provider has every BackendProvider member and a stable, serialisable capability "
        "matrix",
        _protocol,
    ),
    Check(
        "provider.close",
        Area.PROVIDER,
        "after close(), the provider refuses further calls with a BackendError",
        _close,
    ),
)
