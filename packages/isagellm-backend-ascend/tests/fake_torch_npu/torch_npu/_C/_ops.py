"""torch_npu's fused inference operators, computed with ordinary ops on NPU tensors.

Signatures, dtypes and constraints follow torch_npu's documentation; what a real operator
refuses (a dtype it lacks, a non-contiguous input it cannot take, a SoC it does not run on)
raises the RuntimeError the real one raises, and an argument it does not have is a TypeError.
Values are computed in float32 (float64 never: the NPU has none) and stored in the input's
dtype.

- ``npu_rms_norm(self, gamma, epsilon=1e-06) -> (y, rstd)``
- ``npu_add_rms_norm(x1, x2, gamma, epsilon=1e-06) -> (y, rstd, x)``, ``x = x1 + x2``
  (Atlas A2 and A3)
- ``npu_swiglu(input, dim=-1) -> Tensor``: ``silu(a) * b`` of the two halves along ``dim``;
  contiguous input only (Atlas A2 and A3)
- ``npu_rotary_mul(input, r1, r2, rotary_mode='half') -> Tensor``: ``input * r1 +
  rotate(input) * r2``, 4-D, ``half`` or ``interleave``
- ``_npu_reshape_and_cache(key, value, key_cache, value_cache, slot_indices)``: scatters new
  keys and values into paged caches ``[num_blocks, block_size, num_heads, head_size]`` by
  slot (``block * block_size + offset``); a negative slot is skipped
- ``npu_fused_infer_attention_score`` with a ``block_table``: reads K and V from paged caches
  ``[num_blocks, block_size, num_kv_heads * head_size]``, the first ``actual_seq_lengths_kv[b]``
  tokens of each sequence and nothing else, and returns ``(attention_out, softmax_lse)``
  (Atlas A2 and A3)
"""

from __future__ import annotations

import os

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_HALVES = (torch.float16, torch.bfloat16)
_A2_A3 = ("ascend910b", "ascend910_93")


def _soc_check(op: str) -> None:
    soc = os.environ.get("FAKE_TORCH_NPU_SOC", "Ascend910B3")
    if not soc.lower().startswith(_A2_A3):
        raise RuntimeError(
            f"{op}: EZ1001: [PID: {os.getpid()}] the operator is not supported on {soc}"
        )


def _dtype_check(op: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if tensor.dtype not in allowed:
        raise RuntimeError(f"{op}: EZ1001: dtype {tensor.dtype} is not supported")


def npu_rms_norm(
    self: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-06
) -> tuple[torch.Tensor, torch.Tensor]:
    _dtype_check("RmsNorm", self, _FLOATS)
    if gamma.dtype != self.dtype or not 1 <= self.dim() <= 8:
        raise RuntimeError("RmsNorm: EZ1001: gamma must have the dtype of x; x is 1-8 D")
    if tuple(self.shape[-gamma.dim() :]) != tuple(gamma.shape):
        raise RuntimeError("RmsNorm: EZ1001: gamma's shape must match the last dims of x")
    dims = tuple(range(-gamma.dim(), 0))
    wide = self.float()
    rstd = torch.rsqrt(wide.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    return (wide * rstd * gamma.float()).to(self.dtype), rstd


def npu_add_rms_norm(
    x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-06
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _soc_check("AddRmsNorm")
    _dtype_check("AddRmsNorm", x1, _FLOATS)
    if x2.dtype != x1.dtype or x2.shape != x1.shape:
        raise RuntimeError("AddRmsNorm: EZ1001: x1 and x2 must have one dtype and shape")
    total = x1.float() + x2.float()
    y, rstd = npu_rms_norm(total, gamma.float(), epsilon)
    return y.to(x1.dtype), rstd, total.to(x1.dtype)


def npu_swiglu(input: torch.Tensor, dim: int = -1) -> torch.Tensor:
    _soc_check("SwiGlu")
    _dtype_check("SwiGlu", input, _FLOATS)
    if not input.is_contiguous():
        raise RuntimeError("SwiGlu: EZ1001: the input must be contiguous")
    if input.shape[dim] % 2:
        raise RuntimeError("SwiGlu: EZ1001: the split dim must be even")
    a, b = input.float().chunk(2, dim=dim)
    return (torch.nn.functional.silu(a) * b).to(input.dtype)


def npu_rotary_mul(
    input: torch.Tensor,
    r1: torch.Tensor,
    r2: torch.Tensor,
    rotary_mode: str = "half",
) -> torch.Tensor:
    _dtype_check("RotaryMul", input, _FLOATS)
    if rotary_mode not in ("half", "interleave"):
        raise RuntimeError(f"RotaryMul: EZ1001: rotary_mode {rotary_mode!r} is not supported")
    if input.dim() != 4 or r1.dim() != 4 or r2.dim() != 4 or r1.shape != r2.shape:
        raise RuntimeError("RotaryMul: EZ1001: input, r1 and r2 must be 4-D, r1 shaped as r2")
    d = input.shape[-1]
    if d % 2 or d >= 896 or r1.shape[-1] != d:
        raise RuntimeError("RotaryMul: EZ1001: D must be even and below 896, as r1's")
    if any(r not in (1, n) for r, n in zip(r1.shape, input.shape, strict=True)):
        raise RuntimeError("RotaryMul: EZ1001: r1 and r2 must broadcast to the input")
    x = input.float()
    if rotary_mode == "half":
        x1, x2 = x.chunk(2, dim=-1)
        turned = torch.cat((-x2, x1), dim=-1)
    else:
        turned = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    return (x * r1.float() + turned * r2.float()).to(input.dtype)


def _npu_reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_indices: torch.Tensor,
) -> None:
    for name, tensor in (("key", key), ("value", value), ("key_cache", key_cache)):
        _dtype_check("ReshapeAndCache", tensor, (*_HALVES, torch.int8))
        if not tensor.is_contiguous():
            raise RuntimeError(f"ReshapeAndCache: EZ1001: {name} must be contiguous")
    if not value_cache.is_contiguous() or value_cache.shape != key_cache.shape:
        raise RuntimeError("ReshapeAndCache: EZ1001: the caches must be contiguous, one shape")
    if key_cache.dim() != 4 or key.shape != value.shape or key.shape[1:] != key_cache.shape[2:]:
        raise RuntimeError("ReshapeAndCache: EZ1001: shapes do not match the caches")
    if slot_indices.dtype != torch.int32 or slot_indices.shape != key.shape[:1]:
        raise RuntimeError("ReshapeAndCache: EZ1001: slot_indices must be int32 [num_tokens]")
    rows = key_cache.shape[0] * key_cache.shape[1]
    slots = slot_indices.long()
    target = torch.where(slots >= 0, slots, rows)  # skipped slots land in a scratch row
    for new, cache in ((key, key_cache), (value, value_cache)):
        flat = cache.view(rows, *cache.shape[2:])
        scratch = torch.cat([flat, flat[:1]])
        scratch.index_copy_(0, target, new)
        flat.copy_(scratch[:rows])


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
    _soc_check("FusedInferAttentionScore")
    _dtype_check("FusedInferAttentionScore", query, _HALVES)
    if input_layout != "BNSD":
        raise RuntimeError(f"input_layout {input_layout} is not supported with a block_table")
    if not (key.is_contiguous() and value.is_contiguous()) or block_table.dtype != torch.int32:
        raise RuntimeError("FusedInferAttentionScore: EZ1001: paged K/V must be contiguous")
    batch, _, steps, head_size = query.shape
    group = num_heads // num_key_value_heads
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    lse = torch.zeros((batch, num_heads, steps, 1), dtype=torch.float32, device=query.device)
    for b, length in enumerate(actual_seq_lengths_kv):
        if length == 0:
            continue
        pages = block_table[b, : -(-length // block_size)].long()
        keys = key[pages].reshape(-1, num_key_value_heads, head_size)[:length].float()
        values = value[pages].reshape(-1, num_key_value_heads, head_size)[:length].float()
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("hqd,shd->hqs", query[b].float(), keys) * scale
        lse[b] = torch.logsumexp(scores, dim=-1, keepdim=True)
        out[b] = torch.einsum("hqs,shd->hqd", (scores - lse[b]).exp(), values)
    return out.to(query.dtype), lse
