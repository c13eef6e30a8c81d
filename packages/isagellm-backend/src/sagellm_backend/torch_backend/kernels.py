"""Reference torch kernels every torch backend starts with; device wheels override them.

Each kernel is registered with its input generator and a reference that computes the same
result another way, in float64 (per-element formulas, complex rotation, a per-sequence loop over
gathered pages), so ``KernelSpec.check`` compares two independent computations. A device wheel
replaces one with ``register_kernel(name, fast_impl, ..., override=True)``.

Shapes follow vLLM's conventions:

- ``rms_norm(x[..., hidden], weight[hidden], eps)``
- ``silu_and_mul(x[..., 2 * d]) -> [..., d]``: ``silu(x[..., :d]) * x[..., d:]``
- ``rotary_embedding(positions[n], query[n, heads, rot], key[n, kv_heads, rot],
  cos_sin_cache[max_pos, rot]) -> (query, key)``: NeoX style (the two halves rotate together)
- ``paged_attention_decode(query[b, heads, d], kv_layer[pages, 2, tokens, kv_heads, d],
  block_tables[b, max_pages], seq_lens[b], scale) -> [b, heads, d]``: one decode token per
  sequence, K and V read from a layer of the KV pool through the block table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from sagellm_backend.dtypes import DType, KernelKind
from sagellm_backend.kernels import KernelInputs, KernelTable
from sagellm_backend.torch_backend.dtypes import to_torch_dtype

__all__ = [
    "compare",
    "paged_attention_decode",
    "register_reference_kernels",
    "rms_norm",
    "rotary_cos_sin_cache",
    "rotary_embedding",
    "silu_and_mul",
]

KERNEL_DTYPES = (DType.FP32, DType.FP16, DType.BF16)

_TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def compare(result: object, expected: object, dtype: DType) -> None:
    """Raise AssertionError unless ``result`` matches ``expected`` within ``dtype``'s tolerance."""
    rtol, atol = _TOLERANCES[to_torch_dtype(dtype)]
    torch.testing.assert_close(result, expected, rtol=rtol, atol=atol)


# Kernels.


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(mean(x**2) + eps) * weight`` over the last dimension, accumulated in fp32."""
    wide = x.float() if x.dtype != torch.float64 else x
    normed = wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * weight.to(wide.dtype)).to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``x`` is ``[gate, up]`` along the last dimension."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_cos_sin_cache(
    max_position: int,
    rotary_dim: int,
    base: float = 10000.0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> torch.Tensor:
    """``[max_position, rotary_dim]``: cos of the angles in the first half, sin in the second."""
    inv_freq = base ** -(torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype=dtype, device=device)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``query`` and ``key`` by the angles of ``positions`` (NeoX style), out of place."""
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        c, s = cos.to(x.dtype), sin.to(x.dtype)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    return rotate(query), rotate(key)


def paged_attention_decode(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Softmax attention of each sequence's query over its cached K and V, read through pages."""
    batch, heads, head_size = query.shape
    tokens, kv_heads = kv_layer.shape[2], kv_layer.shape[3]
    pages = kv_layer[block_tables.long()]  # [batch, max_pages, 2, tokens, kv_heads, d]
    span = pages.shape[1] * tokens
    keys = pages[:, :, 0].reshape(batch, span, kv_heads, head_size)
    values = pages[:, :, 1].reshape(batch, span, kv_heads, head_size)
    group = heads // kv_heads
    keys = keys.repeat_interleave(group, dim=2).float()
    values = values.repeat_interleave(group, dim=2).float()
    scores = torch.einsum("bhd,bshd->bhs", query.float(), keys) * scale
    beyond = torch.arange(span, device=query.device)[None, :] >= seq_lens[:, None]
    scores = scores.masked_fill(beyond[:, None, :], float("-inf"))
    out = torch.einsum("bhs,bshd->bhd", scores.softmax(dim=-1), values)
    return out.to(query.dtype)


# References: independent formulas in float64.


def _rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    wide, w = x.double(), weight.double()
    mean_square = (wide * wide).sum(dim=-1, keepdim=True) / wide.shape[-1]
    return (wide / torch.sqrt(mean_square + eps) * w).to(x.dtype)


def _silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    gate, up = x[..., :half].double(), x[..., half:].double()
    return (gate / (1.0 + torch.exp(-gate)) * up).to(x.dtype)


def _rotary_reference(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_sin_cache.double()[positions].chunk(2, dim=-1)
    turn = torch.complex(cos, sin).unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        wide = x.double()
        z = torch.complex(wide[..., :half], wide[..., half:]) * turn
        return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)

    return rotate(query), rotate(key)


def _paged_attention_reference(
    query: torch.Tensor,
    kv_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    tokens = kv_layer.shape[2]
    heads, kv_heads = query.shape[1], kv_layer.shape[3]
    out = torch.empty(query.shape, dtype=torch.float64, device=query.device)
    for b in range(query.shape[0]):
        length = int(seq_lens[b])
        used = block_tables[b, : math.ceil(length / tokens)].tolist()
        keys = torch.cat([kv_layer[p, 0].double() for p in used])[:length]
        values = torch.cat([kv_layer[p, 1].double() for p in used])[:length]
        for h in range(heads):
            kv_head = h * kv_heads // heads
            logits = keys[:, kv_head] @ query[b, h].double() * scale
            weights = torch.exp(logits - logits.max())
            out[b, h] = (weights / weights.sum()) @ values[:, kv_head]
    return out.to(query.dtype)


# Input generators: fresh random values from the seed (never zeros), placed on ``device``.


class _Inputs:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def randn(self, g: torch.Generator, *shape: int, dtype: DType) -> torch.Tensor:
        values = torch.randn(shape, generator=g, dtype=torch.float64)
        return values.to(dtype=to_torch_dtype(dtype), device=self.device)

    def rms_norm(self, seed: int, dtype: DType) -> KernelInputs:
        g = torch.Generator().manual_seed(seed)
        return (self.randn(g, 7, 96, dtype=dtype), self.randn(g, 96, dtype=dtype)), {"eps": 1e-6}

    def silu_and_mul(self, seed: int, dtype: DType) -> KernelInputs:
        return (self.randn(torch.Generator().manual_seed(seed), 5, 96, dtype=dtype),), {}

    def rotary_embedding(self, seed: int, dtype: DType) -> KernelInputs:
        g = torch.Generator().manual_seed(seed)
        positions = torch.randint(0, 512, (9,), generator=g).to(self.device)
        query, key = self.randn(g, 9, 4, 64, dtype=dtype), self.randn(g, 9, 2, 64, dtype=dtype)
        cache = rotary_cos_sin_cache(512, 64, dtype=to_torch_dtype(dtype), device=self.device)
        return (positions, query, key, cache), {}

    def paged_attention_decode(self, seed: int, dtype: DType) -> KernelInputs:
        g = torch.Generator().manual_seed(seed)
        batch, heads, kv_heads, head_size, tokens, num_pages, max_pages = 3, 4, 2, 32, 8, 16, 4
        kv_layer = self.randn(g, num_pages, 2, tokens, kv_heads, head_size, dtype=dtype)
        tables = torch.randperm(num_pages, generator=g)[: batch * max_pages].view(batch, -1)
        seq_lens = torch.randint(1, max_pages * tokens + 1, (batch,), generator=g)
        query = self.randn(g, batch, heads, head_size, dtype=dtype)
        tables = tables.to(dtype=torch.int32, device=self.device)
        lens = seq_lens.to(dtype=torch.int32, device=self.device)
        return (query, kv_layer, tables, lens), {"scale": head_size**-0.5}


def register_reference_kernels(
    table: KernelTable,
    device: torch.device,
    *,
    dtypes: Iterable[DType] = KERNEL_DTYPES,
    override: bool = False,
) -> None:
    """Register the reference kernels for ``dtypes`` (those of KERNEL_DTYPES the device computes
    in), with inputs generated on ``device``."""
    listed = tuple(dtypes)
    inputs = _Inputs(device)
    kernels = (
        ("rms_norm", rms_norm, KernelKind.LAYERNORM, _rms_norm_reference, inputs.rms_norm),
        ("silu_and_mul", silu_and_mul, KernelKind.FUSION, _silu_and_mul_reference,
         inputs.silu_and_mul),
        ("rotary_embedding", rotary_embedding, KernelKind.FUSION, _rotary_reference,
         inputs.rotary_embedding),
        ("paged_attention_decode", paged_attention_decode, KernelKind.ATTENTION,
         _paged_attention_reference, inputs.paged_attention_decode),
    )  # fmt: skip
    for name, impl, kind, reference, make_inputs in kernels:
        table.register(
            name,
            impl,
            kind=kind,
            reference=reference,
            make_inputs=make_inputs,
            dtypes=listed,
            compare=compare,
            override=override,
        )
