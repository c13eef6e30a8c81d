"""The fused cache and attention operators, computed with ordinary ops on NPU tensors.

Signatures follow torch_npu's documentation: ``_npu_reshape_and_cache`` scatters new keys and
values into the paged caches by slot (``block * block_size + offset``);
``npu_fused_infer_attention_score`` with a ``block_table`` reads K and V from paged caches of
shape ``[num_blocks, block_size, num_kv_heads * head_size]`` and returns
``(attention_out, softmax_lse)``.
"""

from __future__ import annotations

import torch


def _npu_reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_indices: torch.Tensor,
) -> None:
    block_size = key_cache.shape[1]
    slots = slot_indices.long()
    blocks, offsets = slots // block_size, slots % block_size
    key_cache.index_put_((blocks, offsets), key)
    value_cache.index_put_((blocks, offsets), value)


def npu_fused_infer_attention_score(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    block_table: torch.Tensor,
    actual_seq_lengths_kv: list[int],
    num_heads: int,
    num_key_value_heads: int,
    scale: float,
    input_layout: str = "BSH",
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    if input_layout != "BNSD":
        raise RuntimeError(f"input_layout {input_layout} is not supported with a block_table")
    batch, _, _, head_size = query.shape
    pages = key[block_table.long()]  # [batch, max_pages, block_size, kv_heads * head_size]
    span = pages.shape[1] * block_size
    keys = pages.reshape(batch, span, num_key_value_heads, head_size)
    values = value[block_table.long()].reshape(batch, span, num_key_value_heads, head_size)
    group = num_heads // num_key_value_heads
    keys = keys.repeat_interleave(group, dim=2).float()
    values = values.repeat_interleave(group, dim=2).float()
    scores = torch.einsum("bhqd,bshd->bhqs", query.float(), keys) * scale
    lengths = torch.tensor(actual_seq_lengths_kv, device=query.device)
    beyond = torch.arange(span, device=query.device)[None, :] >= lengths[:, None]
    scores = scores.masked_fill(beyond[:, None, None, :], float("-inf"))
    values = values.masked_fill(beyond[:, :, None, None], 0.0)  # only live tokens are read
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.einsum("bhqs,bshd->bhqd", (scores - lse).exp(), values)
    return out.to(query.dtype), lse
