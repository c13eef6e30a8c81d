"""Rotary position embedding: the cos/sin table and the in-place rotation of query and key.

The table is ``[max_position, rotary_dim]``: the cosines of the angles ``position * base **
(-2i / rotary_dim)`` (``i < rotary_dim / 2``) in its first half, their sines in the second.
Angle ``i`` turns the pair of features ``(i, i + rotary_dim / 2)`` in NeoX style, the pair
``(2i, 2i + 1)`` in the interleaved (GPT-J) style; features past ``rotary_dim`` are untouched.
"""

from __future__ import annotations

import torch

from sagellm_backend.dtypes import DType, coerce
from sagellm_backend.torch_backend.arguments import (
    fail,
    number_arg,
    same_device,
    tensor_arg,
    written_arg,
)
from sagellm_backend.torch_backend.dtypes import to_torch_dtype

__all__ = ["CosSinCache", "rotary_args", "rotary_cos_sin_cache", "rotary_embedding"]


def rotary_cos_sin_cache(
    max_position: int,
    rotary_dim: int,
    base: float = 10000.0,
    *,
    dtype: DType | str = DType.FP32,
    device: torch.device | None = None,
) -> torch.Tensor:
    """``[max_position, rotary_dim]`` on ``device``, computed in float64 then cast."""
    op = "rotary_cos_sin_cache"
    for name, value in (("max_position", max_position), ("rotary_dim", rotary_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail(op, f"{name} must be a positive int, got {value!r}", f"pass {name} >= 1")
    if rotary_dim % 2:
        fail(op, f"rotary_dim must be even, got {rotary_dim}", "rotate whole pairs of features")
    if number_arg(op, "base", base) <= 1:
        fail(op, f"base must be above 1, got {base!r}", "pass the model's rope_theta")
    element = to_torch_dtype(coerce(DType, dtype, "dtype"))
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    angles = torch.outer(torch.arange(max_position, dtype=torch.float64), base**-exponents)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype=element, device=device)


class CosSinCache:
    """``rotary_cos_sin_cache`` building its tables on one device (a provider's op)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(
        self,
        max_position: int,
        rotary_dim: int,
        base: float = 10000.0,
        *,
        dtype: DType | str = DType.FP32,
    ) -> torch.Tensor:
        return rotary_cos_sin_cache(max_position, rotary_dim, base, dtype=dtype, device=self.device)

    def __repr__(self) -> str:
        return f"CosSinCache({self.device})"


def rotary_args(
    positions: object, query: object, key: object, cos_sin_cache: object, is_neox: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rotary_embedding``'s tensors checked, without reading their values: positions, query,
    key and table (a device wheel's kernels share it)."""
    op = "rotary_embedding"
    pos = tensor_arg(op, "positions", positions, "[n]", index=True)
    q = tensor_arg(op, "query", query, "[n, heads, d]", leading=pos.shape[0])
    k = tensor_arg(op, "key", key, "[n, kv_heads, d]", leading=pos.shape[0])
    table = tensor_arg(op, "cos_sin_cache", cos_sin_cache, "[max_position, rotary_dim]")
    same_device(op, q, positions=pos, key=k, cos_sin_cache=table)
    if not isinstance(is_neox, bool):
        fail(op, f"is_neox must be a bool, got {is_neox!r}", "pass is_neox=True or False")
    written_arg(op, "query", q)
    written_arg(op, "key", k)
    if q.numel() and q.data_ptr() == k.data_ptr():
        fail(op, "query and key start at one address", "pass query and key as separate views")
    return pos, q, k, table


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first ``rotary_dim`` features of every head of ``query[n, heads, d]`` and
    ``key[n, kv_heads, d]`` in place by the angles of ``positions[n]``; returns them."""
    op = "rotary_embedding"
    pos, q, k, table = rotary_args(positions, query, key, cos_sin_cache, is_neox)
    rotary = table.shape[1]
    if rotary % 2 or rotary > min(q.shape[2], k.shape[2]) or q.dtype != k.dtype:
        fail(
            op,
            f"cannot rotate {rotary} features of query {tuple(q.shape)} {q.dtype} and key "
            f"{tuple(k.shape)} {k.dtype}",
            "build the table with an even rotary_dim up to the head size; pass query and key "
            "in one dtype",
        )
    if pos.numel():
        low, high = (int(n) for n in torch.aminmax(pos))
        if low < 0 or high >= table.shape[0]:
            fail(
                op,
                f"positions run {low}..{high}; the table covers 0..{table.shape[0] - 1}",
                "build the cos/sin table with max_position above the longest sequence",
            )
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    cos, sin = table.index_select(0, pos).to(wide)[:, None, :].chunk(2, dim=-1)
    half = rotary // 2
    for x in (q, k):
        if is_neox:
            first, second = x[..., :half], x[..., half:rotary]
        else:
            first, second = x[..., 0:rotary:2], x[..., 1:rotary:2]
        a, b = first.to(wide), second.to(wide)
        turned_a = torch.addcmul(a * cos, b, sin, value=-1.0)
        turned_b = torch.addcmul(b * cos, a, sin)
        first.copy_(turned_a)
        second.copy_(turned_b)
    return query, key
