"""kv_cache_write: new tokens' K and V into their cache slots (vLLM's ``reshape_and_cache``).

Slot ``s`` is token ``s % tokens_per_block`` of page ``s // tokens_per_block``; a slot of -1
is padding and skipped. This reference reads the slot mapping on the host to refuse a slot
outside the cache before writing anything, so it never writes outside; device wheels register
kernels that skip such slots instead.
"""

from __future__ import annotations

import torch

from sagellm_backend.torch_backend.arguments import cache_arg, fail, same_device, tensor_arg

__all__ = ["kv_cache_write"]


def kv_cache_write(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write ``key[i]`` and ``value[i]`` (``[n, kv_heads, d]``) into slot ``slot_mapping[i]``."""
    op = "kv_cache_write"
    cache = cache_arg(op, kv_cache)
    pages, _, tokens, kv_heads, head_size = cache.shape
    k = tensor_arg(op, "key", key, "[n, kv_heads, d]")
    v = tensor_arg(op, "value", value, "[n, kv_heads, d]")
    slots = tensor_arg(op, "slot_mapping", slot_mapping, "[n]", index=True, leading=k.shape[0])
    for name, x in (("key", k), ("value", v)):
        if x.shape != (k.shape[0], kv_heads, head_size) or x.dtype != cache.dtype:
            fail(
                op,
                f"{name} is {tuple(x.shape)} {x.dtype}; the cache holds [{kv_heads}, "
                f"{head_size}] {cache.dtype} per token",
                f"pass {name}[n, {kv_heads}, {head_size}] in {cache.dtype}",
            )
    same_device(op, cache, key=k, value=v, slot_mapping=slots)
    if slots.numel() == 0:
        return
    low, high = (int(n) for n in torch.aminmax(slots))
    if low < -1 or high >= pages * tokens:
        fail(
            op,
            f"slot_mapping holds slots {low}..{high}; this cache has slots 0..{pages * tokens - 1} "
            "(and -1 for padding)",
            "map each token to page * tokens_per_block + offset of one of its block's pages",
        )
    index = slots.to(torch.int64)
    if low == -1:
        keep = (index >= 0).nonzero().squeeze(1)
        index, k, v = index[keep], k[keep], v[keep]
    page, offset = index // tokens, index % tokens
    cache[:, 0].index_put_((page, offset), k)
    cache[:, 1].index_put_((page, offset), v)
