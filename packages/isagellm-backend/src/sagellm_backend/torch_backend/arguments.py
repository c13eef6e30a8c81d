"""Argument checks shared by the torch layer's ops: typed errors before any work is queued."""

from __future__ import annotations

import math
from typing import NoReturn

import torch

from sagellm_backend.errors import InvalidArgumentError

__all__ = ["cache_arg", "fail", "number_arg", "same_device", "tensor_arg", "written_arg"]

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDICES = (torch.int32, torch.int64)


def fail(op: str, message: str, hint: str) -> NoReturn:
    raise InvalidArgumentError(f"{op}: {message}", hint=hint)


def tensor_arg(
    op: str,
    name: str,
    value: object,
    shape: str,
    *,
    index: bool = False,
    leading: int | None = None,
) -> torch.Tensor:
    """``value`` as a tensor shaped like ``shape`` (``...`` there: any number of leading
    dimensions), floating, or int32/int64 if ``index``; its first dimension ``leading`` where
    given."""
    if not isinstance(value, torch.Tensor):
        fail(
            op, f"{name} must be a torch.Tensor, got {type(value).__name__}", f"pass {name}{shape}"
        )
    open_ended = "..." in shape
    dims = shape.count(",") + 1 - open_ended
    if value.dim() < dims if open_ended else value.dim() != dims:
        fail(op, f"{name} must be {name}{shape}, got shape {tuple(value.shape)}", f"reshape {name}")
    if index and value.dtype not in INDICES:
        fail(op, f"{name} must be int32 or int64, got {value.dtype}", f"build {name} as int32")
    if not index and value.dtype not in FLOATS:
        fail(op, f"{name} must be a floating tensor, got {value.dtype}", f"cast {name} to fp32")
    if leading is not None and value.shape[0] != leading:
        fail(
            op,
            f"{name} has {value.shape[0]} rows where {leading} are needed",
            f"pass {name}{shape} with one row per item",
        )
    return value


def cache_arg(op: str, kv_cache: object, head_size: int | None = None) -> torch.Tensor:
    """One layer's KV cache ``[pages, 2, tokens_per_block, kv_heads, head_size]``."""
    cache = tensor_arg(op, "kv_cache", kv_cache, "[pages, 2, tokens_per_block, kv_heads, d]")
    if cache.shape[1] != 2:
        fail(
            op,
            f"kv_cache dimension 1 must hold K and V (2), got {cache.shape[1]}",
            "pass kv_cache(layer)",
        )
    if head_size is not None and cache.shape[4] != head_size:
        fail(
            op,
            f"the cache's head size is {cache.shape[4]}, the query's {head_size}",
            "use the cache of this model's layer",
        )
    return cache


def same_device(op: str, anchor: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, value in others.items():
        if value is not None and value.device != anchor.device:
            fail(
                op,
                f"{name} is on {value.device}, not {anchor.device}",
                f"move {name} to {anchor.device}",
            )


def number_arg(op: str, name: str, value: object, *, minimum: float | None = None) -> float:
    """A finite float (an int is accepted), at least ``minimum`` where given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(op, f"{name} must be a finite number, got {value!r}", f"pass {name} as a float")
    if minimum is not None and value < minimum:
        fail(op, f"{name} must be at least {minimum}, got {value!r}", f"pass {name} >= {minimum}")
    return float(value)


def written_arg(op: str, name: str, tensor: torch.Tensor, *others: torch.Tensor) -> None:
    """Refuse ``tensor``, which ``op`` writes in place, where its elements share memory (an
    expanded view) or it shares memory with ``others``."""
    strides = tensor.stride()
    if 0 in strides and any(
        size > 1 and not stride for size, stride in zip(tensor.shape, strides, strict=True)
    ):
        fail(
            op,
            f"{name} is written in place, but elements of it share memory (strides {strides})",
            f"pass a tensor of its own for {name} (.clone()), not an expanded view",
        )
    for other in others:
        if other.numel() and tensor.numel() and _spans_meet(tensor, other):
            fail(
                op,
                f"{name} is written in place and shares memory with another argument",
                f"pass {name} as a tensor of its own",
            )


def _spans_meet(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory ``a`` and ``b`` span, first byte to last, overlaps."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1
