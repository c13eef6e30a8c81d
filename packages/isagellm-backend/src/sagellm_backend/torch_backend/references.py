"""float64 references of the standard kernels, each computed another way than the kernel.

Per-element formulas, Python loops over sequences, tokens and heads, slot-by-slot reads of the
cache, complex-number rotations and the sampling noise in Python integers: a kernel checked
against these shares no code with them. Each writes into its arguments what the kernel writes
(``StandardOp.writes``) and returns what it returns, in the inputs' dtype.
"""

from __future__ import annotations

import math

import torch

from sagellm_backend.dtypes import DType, coerce
from sagellm_backend.errors import InvalidArgumentError
from sagellm_backend.torch_backend.dtypes import to_torch_dtype
from sagellm_backend.torch_backend.sampling import GOLDEN, MIX_1, MIX_2

__all__ = [
    "CosSinCacheReference",
    "fused_add_rms_norm_reference",
    "kv_cache_write_reference",
    "paged_attention_decode_reference",
    "paged_attention_prefill_reference",
    "rms_norm_reference",
    "rotary_embedding_reference",
    "sample_reference",
    "silu_and_mul_reference",
    "uniform_reference",
]

_MASK = (1 << 64) - 1


def kv_cache_write_reference(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    tokens = kv_cache.shape[2]
    slots = [int(s) for s in slot_mapping.tolist()]
    if any(not -1 <= s < kv_cache.shape[0] * tokens for s in slots):
        raise InvalidArgumentError(
            "kv_cache_write: a slot is outside the cache",
            hint=f"pass slots in 0..{kv_cache.shape[0] * tokens - 1}, or -1 to skip a token",
        )
    for i, slot in enumerate(slots):
        if slot != -1:
            kv_cache[slot // tokens, 0, slot % tokens] = key[i]
            kv_cache[slot // tokens, 1, slot % tokens] = value[i]


def _sequence_kv(
    kv_cache: torch.Tensor, row: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``[length, kv_heads, d]`` in float64, read slot by slot."""
    tokens = kv_cache.shape[2]
    pages = [int(p) for p in row.tolist()]
    slots = [(pages[t // tokens], t % tokens) for t in range(length)]
    shape = (0, kv_cache.shape[3], kv_cache.shape[4])
    keys = [kv_cache[page, 0, offset].double() for page, offset in slots]
    values = [kv_cache[page, 1, offset].double() for page, offset in slots]
    if not slots:
        empty = torch.empty(shape, dtype=torch.float64, device=kv_cache.device)
        return empty, empty
    return torch.stack(keys), torch.stack(values)


def _attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """float64 ``[m, heads, d]``: query ``j`` of ``m`` sees the first ``len - m + j + 1`` keys."""
    m, heads, d = query.shape
    length, kv_heads = keys.shape[0], keys.shape[1]
    out = torch.zeros((m, heads, d), dtype=torch.float64, device=query.device)
    if length == 0:
        return out
    for h in range(heads):
        kv_head = h * kv_heads // heads
        for j in range(m):
            visible = length - m + j + 1
            logits = keys[:visible, kv_head] @ query[j, h].double() * scale
            weights = torch.exp(logits - logits.max())
            out[j, h] = (weights / weights.sum()) @ values[:visible, kv_head]
    return out


def _result(out: torch.Tensor | None, wide: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return wide.to(like.dtype)
    out.copy_(wide)
    return out


def paged_attention_decode_reference(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    wide = torch.zeros(query.shape, dtype=torch.float64, device=query.device)
    for b, length in enumerate(int(n) for n in seq_lens.tolist()):
        keys, values = _sequence_kv(kv_cache, block_tables[b], length)
        wide[b] = _attention(query[b : b + 1], keys, values, scale)[0]
    return _result(out, wide, query)


def paged_attention_prefill_reference(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    wide = torch.zeros(query.shape, dtype=torch.float64, device=query.device)
    starts = [int(s) for s in query_start_loc.tolist()]
    for b, length in enumerate(int(n) for n in seq_lens.tolist()):
        keys, values = _sequence_kv(kv_cache, block_tables[b], length)
        start, end = starts[b], starts[b + 1]
        wide[start:end] = _attention(query[start:end], keys, values, scale)
    return _result(out, wide, query)


class CosSinCacheReference:
    """The cos/sin table element by element with :mod:`math`, on one device."""

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
        half = rotary_dim // 2
        rows = []
        for position in range(max_position):
            angles = [position * math.pow(base, -2.0 * i / rotary_dim) for i in range(half)]
            rows.append([math.cos(a) for a in angles] + [math.sin(a) for a in angles])
        table = torch.tensor(rows, dtype=torch.float64)
        return table.to(dtype=to_torch_dtype(coerce(DType, dtype, "dtype")), device=self.device)


def rotary_embedding_reference(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    rotary = cos_sin_cache.shape[1]
    half = rotary // 2
    table = cos_sin_cache.double()
    first = list(range(half)) if is_neox else list(range(0, rotary, 2))
    second = list(range(half, rotary)) if is_neox else list(range(1, rotary, 2))
    for x in (query, key):
        wide = x.double()
        for t, position in enumerate(int(p) for p in positions.tolist()):
            turn = torch.complex(table[position, :half], table[position, half:])
            z = torch.complex(wide[t][:, first], wide[t][:, second]) * turn
            wide[t][:, first], wide[t][:, second] = z.real, z.imag
        x.copy_(wide)
    return query, key


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    wide, w = x.double(), weight.double()
    mean_square = (wide * wide).sum(dim=-1, keepdim=True) / wide.shape[-1]
    return (wide / torch.sqrt(mean_square + eps) * w).to(x.dtype)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    residual.copy_(residual.double() + x.double())
    x.copy_(rms_norm_reference(residual.double(), weight, eps))
    return x, residual


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    gate, up = x[..., :half].double(), x[..., half:].double()
    return (gate / (1.0 + torch.exp(-gate)) * up).to(x.dtype)


def uniform_reference(seed: int, token: int) -> float:
    """The sampling noise ``u`` of one (seed, token) in Python integers."""
    z = (seed * GOLDEN + token) & _MASK
    z = ((z ^ (z >> 30)) * MIX_1) & _MASK
    z = ((z ^ (z >> 27)) * MIX_2) & _MASK
    z ^= z >> 31
    return ((z >> 11) + 0.5) * 2.0**-53


def sample_reference(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
) -> torch.Tensor:
    tokens = []
    for row, temp, k, p, seed in zip(
        logits.double().tolist(),
        temperature.double().tolist(),
        top_k.tolist(),
        top_p.double().tolist(),
        seeds.tolist(),
        strict=True,
    ):
        tokens.append(_sample_row(row, temp, int(k), p, int(seed)))
    return torch.tensor(tokens, dtype=torch.int64, device=logits.device)


def _sample_row(row: list[float], temperature: float, k: int, p: float, seed: int) -> int:
    vocab = len(row)
    if temperature == 0:
        return max(range(vocab), key=lambda j: (row[j], -j))
    top = max(row)
    weights = [math.exp((v - top) / temperature) for v in row]
    total = sum(weights)
    probs = [w / total for w in weights]
    ranked = sorted(range(vocab), key=lambda j: (-probs[j], j))
    ranked = ranked[: k if 0 < k < vocab else vocab]
    mass = sum(probs[j] for j in ranked)
    allowed, before = [], 0.0
    for j in ranked:
        if before / mass >= p:
            break
        allowed.append(j)
        before += probs[j]
    race = {j: probs[j] / -math.log(uniform_reference(seed, j)) for j in allowed}
    return max(sorted(race), key=lambda j: race[j])
