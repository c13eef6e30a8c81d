# Triton kernels take untyped parameters (Triton reads their annotations itself) and triton.jit
# is untyped, so these two checks cannot apply to the kernel bodies in this module.
# mypy: disable-error-code="untyped-decorator,no-untyped-def"
"""The KV slot write: new keys and values into one layer's paged cache, one launch.

One layer's cache is ``[num_pages, 2, tokens_per_block, kv_heads, head_size]`` (the torch
layer's layout, :class:`sagellm_backend.kv.KVLayout`), and slot ``s`` is token ``s %
tokens_per_block`` of page ``s // tokens_per_block``. Token ``i``'s K and V rows
(``kv_heads * head_size`` values each) are copied byte for byte into its slot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sagellm_backend.errors import InvalidArgumentError
from sagellm_backend_cuda.arguments import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    dtype_name,
    require_dtype,
    require_same_device,
    require_shape,
)

__all__ = ["kv_cache_write"]

_TILE = 4096
"""Values of K (and as many of V) one program moves."""


@triton.jit
def _kv_cache_write_kernel(
    key,
    key_token_stride,
    key_head_stride,
    value,
    value_token_stride,
    value_head_stride,
    cache,
    slot_mapping,
    tokens,
    num_slots,
    HEADS: tl.constexpr,
    HEADS_P2: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_SIZE_P2: tl.constexpr,
    TOKENS_PER_BLOCK: tl.constexpr,
    TOKENS: tl.constexpr,
):
    # TOKENS tokens a program, as a [token, head, feature] tile: features contiguous on both
    # sides, so loads and stores are whole vectors.
    token = (tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)).to(tl.int64)
    slot = tl.load(slot_mapping + token, mask=token < tokens, other=-1).to(tl.int64)
    live = (token < tokens) & (slot >= 0) & (slot < num_slots)
    head = tl.arange(0, HEADS_P2)[None, :, None]
    feature = tl.arange(0, HEAD_SIZE_P2)[None, None, :]
    mask = live[:, None, None] & (head < HEADS) & (feature < HEAD_SIZE)
    width = HEADS * HEAD_SIZE
    row = (slot // TOKENS_PER_BLOCK) * (2 * TOKENS_PER_BLOCK * width) + (
        slot % TOKENS_PER_BLOCK
    ) * width
    target = cache + row[:, None, None] + head * HEAD_SIZE + feature
    token = token[:, None, None]
    k = tl.load(key + token * key_token_stride + head * key_head_stride + feature, mask=mask)
    tl.store(target, k, mask=mask)
    v = tl.load(value + token * value_token_stride + head * value_head_stride + feature, mask=mask)
    tl.store(target + TOKENS_PER_BLOCK * width, v, mask=mask)


def kv_cache_write(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write ``key[i]`` and ``value[i]`` (``[n, kv_heads, d]``) into slot ``slot_mapping[i]``.

    ``kv_cache`` is one layer's contiguous cache, of the dtype of ``key`` and ``value`` (whose
    other strides are free, e.g. views of a fused QKV output, with contiguous features);
    ``slot_mapping[n]`` is int32 or int64. A slot of -1, or any slot outside
    ``[0, num_pages * tokens_per_block)``, is skipped: nothing outside the given slots is
    written.
    """
    op = "kv_cache_write"
    require_dtype(op, "kv_cache", kv_cache, FLOAT_DTYPES)
    require_dtype(op, "slot_mapping", slot_mapping, INDEX_DTYPES)
    require_dtype(op, "key", key, FLOAT_DTYPES)
    require_dtype(op, "value", value, FLOAT_DTYPES)
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2:
        raise InvalidArgumentError(
            f"{op}: kv_cache has shape {list(kv_cache.shape)}, expected "
            "[num_pages, 2, tokens_per_block, kv_heads, head_size]",
            hint="pass one layer's cache as kv_cache(layer) returns it",
        )
    if not kv_cache.is_contiguous():
        raise InvalidArgumentError(
            f"{op}: kv_cache is not contiguous", hint="pass the layer's cache, not a view of it"
        )
    num_pages, _, tokens_per_block, kv_heads, head_size = kv_cache.shape
    require_shape(op, "key", key, (-1, kv_heads, head_size))
    n = key.shape[0]
    require_shape(op, "value", value, (n, kv_heads, head_size))
    require_shape(op, "slot_mapping", slot_mapping, (n,))
    for name, tensor in (("key", key), ("value", value)):
        if tensor.dtype != kv_cache.dtype:
            raise InvalidArgumentError(
                f"{op}: {name} is {dtype_name(tensor.dtype)}, the cache holds "
                f"{dtype_name(kv_cache.dtype)}",
                hint=f"convert {name} to the cache's dtype",
            )
        if head_size > 1 and tensor.stride(2) != 1:
            raise InvalidArgumentError(
                f"{op}: {name}'s head features are not contiguous",
                hint=f"pass {name}.contiguous()",
            )
    require_same_device(op, key=key, value=value, kv_cache=kv_cache, slot_mapping=slot_mapping)
    if n == 0 or kv_cache.numel() == 0:
        return
    heads_p2, head_size_p2 = triton.next_power_of_2(kv_heads), triton.next_power_of_2(head_size)
    per_token = heads_p2 * head_size_p2
    tokens = max(1, min(_TILE // per_token, triton.next_power_of_2(n)))
    _kv_cache_write_kernel[(triton.cdiv(n, tokens),)](
        key,
        key.stride(0),
        key.stride(1),
        value,
        value.stride(0),
        value.stride(1),
        kv_cache,
        slot_mapping.contiguous(),  # read as one run of slots
        n,
        num_pages * tokens_per_block,
        HEADS=kv_heads,
        HEADS_P2=heads_p2,
        HEAD_SIZE=head_size,
        HEAD_SIZE_P2=head_size_p2,
        TOKENS_PER_BLOCK=tokens_per_block,
        TOKENS=tokens,
        num_warps=min(8, max(1, tokens * per_token // 512)),
    )
