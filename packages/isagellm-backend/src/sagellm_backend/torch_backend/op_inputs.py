"""Fresh random inputs for the standard kernels, from a seed, on one device.

Consecutive seeds cycle through :data:`SHAPES` (head sizes 64 and 128; GQA, MQA and plain
multi-head attention), so any four consecutive seeds cover them all. Attention inputs are
variable-length batches of random lengths over a cache whose every unused slot and page is NaN:
past each sequence's length, the pages no sequence owns, and page 0, which pads the block
tables. Every other seed also passes ``out=`` filled with NaN, so an output not written in full
shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from sagellm_backend.dtypes import DType
from sagellm_backend.kernels import KernelInputs
from sagellm_backend.torch_backend.dtypes import to_torch_dtype
from sagellm_backend.torch_backend.rotary import rotary_cos_sin_cache

__all__ = ["SHAPES", "AttentionShape", "OpInputs"]


@dataclass(frozen=True)
class AttentionShape:
    head_size: int
    heads: int
    kv_heads: int
    tokens_per_block: int


SHAPES = (
    AttentionShape(64, 8, 2, 16),
    AttentionShape(128, 4, 1, 8),
    AttentionShape(64, 4, 4, 16),
    AttentionShape(128, 8, 2, 16),
)
"""GQA, MQA, multi-head and GQA again, over head sizes 64 and 128."""


class OpInputs:
    """``make_inputs(seed, dtype)`` of every standard kernel, on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def _randn(self, g: torch.Generator, *shape: int, dtype: DType) -> torch.Tensor:
        values = torch.randn(shape, generator=g, dtype=torch.float64)
        return values.to(dtype=to_torch_dtype(dtype), device=self.device)

    def _ints(
        self, values: list[int] | list[list[int]], dtype: torch.dtype = torch.int32
    ) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _paged(
        self, g: torch.Generator, lengths: list[int], shape: AttentionShape, dtype: DType
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A NaN cache holding random K and V in each sequence's live slots, and its tables."""
        tokens = shape.tokens_per_block
        needed = [math.ceil(n / tokens) for n in lengths]
        num_pages = 1 + sum(needed) + 3  # page 0 pads the tables; three pages nobody owns
        order = (torch.randperm(num_pages - 1, generator=g) + 1).tolist()
        width = max(needed, default=0) + 1
        cache = torch.full(
            (num_pages, 2, tokens, shape.kv_heads, shape.head_size),
            float("nan"),
            dtype=to_torch_dtype(dtype),
            device=self.device,
        )
        rows = []
        for length, count in zip(lengths, needed, strict=True):
            pages, order = order[:count], order[count:]
            for t in range(length):
                live = self._randn(g, 2, shape.kv_heads, shape.head_size, dtype=dtype)
                cache[pages[t // tokens], :, t % tokens] = live
            rows.append(pages + [0] * (width - count))
        return cache, self._ints(rows).reshape(len(lengths), width)

    def _out(self, seed: int, like: torch.Tensor) -> dict[str, Any]:
        return {"out": torch.full_like(like, float("nan"))} if seed % 2 else {}

    def kv_cache_write(self, seed: int, dtype: DType) -> KernelInputs:
        g = torch.Generator().manual_seed(seed)
        shape = SHAPES[seed % len(SHAPES)]
        num_pages, tokens = 12, shape.tokens_per_block
        cache = self._randn(g, num_pages, 2, tokens, shape.kv_heads, shape.head_size, dtype=dtype)
        cache[int(torch.randint(num_pages, (1,), generator=g))] = float("nan")
        new = int(torch.randint(1, 3 * tokens, (1,), generator=g))
        slots = torch.randperm(num_pages * tokens, generator=g)[:new]
        slots[torch.rand(new, generator=g) < 0.2] = -1
        slots[new // 2] = -1  # at least one padding token
        key = self._randn(g, new, shape.kv_heads, shape.head_size, dtype=dtype)
        value = self._randn(g, new, shape.kv_heads, shape.head_size, dtype=dtype)
        index_dtype = torch.int64 if seed % 2 else torch.int32
        return (key, value, cache, slots.to(dtype=index_dtype, device=self.device)), {}

    def paged_attention_decode(self, seed: int, dtype: DType) -> KernelInputs:
        g = torch.Generator().manual_seed(seed)
        shape = SHAPES[seed % len(SHAPES)]
        batch = int(torch.randint(3, 7, (1,), generator=g))
        lengths = torch.randint(1, 90, (batch,), generator=g).tolist()
        if seed % 2:
            lengths[int(torch.randint(batch, (1,), generator=g))] = 0
        cache, tables = self._paged(g, lengths, shape, dtype)
        query = self._randn(g, batch, shape.heads, shape.head_size, dtype=dtype)
        args = (query, cache, tables, self._ints(lengths), shape.head_size**-0.5)
        return args, self._out(seed, query)

    def paged_attention_prefill(self, seed: int, dtype: DType) -> KernelInputs:
        g = torch.Generator().manual_seed(seed)
        shape = SHAPES[seed % len(SHAPES)]
        batch = int(torch.randint(2, 6, (1,), generator=g))
        prefix = torch.randint(0, 50, (batch,), generator=g).tolist()
        new = torch.randint(1, 24, (batch,), generator=g).tolist()
        if seed % 2:
            prefix[0], new[-1] = 0, 0  # a whole prompt, and a sequence with nothing new
        lengths = [p + q for p, q in zip(prefix, new, strict=True)]
        cache, tables = self._paged(g, lengths, shape, dtype)
        starts = [0]
        for q in new:
            starts.append(starts[-1] + q)
        query = self._randn(g, starts[-1], shape.heads, shape.head_size, dtype=dtype)
        args = (
            query,
            cache,
            tables,
            self._ints(lengths),
            self._ints(starts),
            max(new) + (seed % 3),
            shape.head_size**-0.5,
        )
        return args, self._out(seed, query)

    def rotary_cos_sin_cache(self, seed: int, dtype: DType) -> KernelInputs:
        g = torch.Generator().manual_seed(seed)
        rotary = (64, 128, 32, 96)[seed % 4]
        max_position = int(torch.randint(16, 200, (1,), generator=g))
        base = (10000.0, 500000.0, 1000000.0)[seed % 3]
        return (max_position, rotary, base), {"dtype": dtype.value if seed % 2 else dtype}

    def rotary_embedding(self, seed: int, dtype: DType) -> KernelInputs:
        g = torch.Generator().manual_seed(seed)
        shape = SHAPES[seed % len(SHAPES)]
        n, d = int(torch.randint(1, 24, (1,), generator=g)), shape.head_size
        rotary = d if seed % 3 else d // 2  # partial rotary_dim every third seed
        max_position = 1024
        positions = torch.randint(0, max_position, (n,), generator=g).to(self.device)
        # query and key are views into one fused qkv tensor, as a model's projection gives them
        qkv = self._randn(g, n, shape.heads + 2 * shape.kv_heads, d, dtype=dtype)
        query, key = qkv[:, : shape.heads], qkv[:, shape.heads : shape.heads + shape.kv_heads]
        table_dtype = dtype if seed % 4 == 3 else DType.FP32
        cache = rotary_cos_sin_cache(max_position, rotary, dtype=table_dtype, device=self.device)
        return (positions, query, key, cache), {"is_neox": seed % 2 == 0}

    def rms_norm(self, seed: int, dtype: DType) -> KernelInputs:
        g = torch.Generator().manual_seed(seed)
        rows, hidden = int(torch.randint(1, 9, (1,), generator=g)), (512, 96, 4096, 64)[seed % 4]
        x, weight = self._randn(g, rows, hidden, dtype=dtype), self._randn(g, hidden, dtype=dtype)
        return (x, weight), {"eps": (1e-6, 1e-5)[seed % 2]}

    def fused_add_rms_norm(self, seed: int, dtype: DType) -> KernelInputs:
        g = torch.Generator().manual_seed(seed)
        rows, hidden = int(torch.randint(1, 9, (1,), generator=g)), (512, 96, 4096, 64)[seed % 4]
        x, residual = (self._randn(g, rows, hidden, dtype=dtype) for _ in range(2))
        return (x, residual, self._randn(g, hidden, dtype=dtype), (1e-6, 1e-5)[seed % 2]), {}

    def silu_and_mul(self, seed: int, dtype: DType) -> KernelInputs:
        g = torch.Generator().manual_seed(seed)
        rows, d = int(torch.randint(1, 9, (1,), generator=g)), (1376, 64, 96, 512)[seed % 4]
        return (self._randn(g, rows, 2 * d, dtype=dtype),), {}

    def sample(self, seed: int, dtype: DType) -> KernelInputs:
        """Greedy rows (one with tied maxima), plain, top-k and top-p rows; each top-p value
        lies halfway between two cumulative probabilities, so no precision decides a token."""
        g = torch.Generator().manual_seed(seed)
        batch, vocab = 8, int(torch.randint(40, 300, (1,), generator=g))
        logits = self._randn(g, batch, vocab, dtype=dtype) * 3
        logits[0, vocab // 3] = logits[0, vocab // 2] = logits[0].max() + 1  # a greedy tie
        temperature = (torch.rand(batch, generator=g, dtype=torch.float64) + 0.3).tolist()
        temperature[0] = temperature[1] = 0.0
        temperature[3] = 5.0  # flat: only top-k 1 makes this row draw its argmax
        top_k = [0] * batch
        top_k[3], top_k[4], top_k[5] = 1, int(torch.randint(2, vocab, (1,), generator=g)), vocab + 5
        top_p = [1.0] * batch
        for row in (5, 6, 7):
            top_p[row] = self._between(g, logits[row], temperature[row], top_k[row])
        seeds = torch.randint(-(2**62), 2**62, (batch,), generator=g, dtype=torch.int64)
        args = (
            logits,
            torch.tensor(temperature, dtype=torch.float32, device=self.device),
            self._ints(top_k),
            torch.tensor(top_p, dtype=torch.float32, device=self.device),
            seeds.to(self.device),
        )
        return args, {}

    @staticmethod
    def _between(g: torch.Generator, logits: torch.Tensor, temperature: float, k: int) -> float:
        probs = torch.softmax(logits.double().cpu() / temperature, dim=-1)
        ranked = probs.sort(descending=True, stable=True).values
        ranked = ranked[: k if 0 < k < len(ranked) else len(ranked)]
        cumulative = (ranked / ranked.sum()).cumsum(0)
        sizeable = [r for r in range(1, min(8, len(ranked))) if ranked[r] > 1e-3 * ranked.sum()]
        if not sizeable:
            return 1.0
        r = sizeable[int(torch.randint(len(sizeable), (1,), generator=g))]
        return float(cumulative[r - 1] + cumulative[r]) / 2
