# Triton kernels take untyped parameters (Triton reads their annotations itself) and triton.jit
# is untyped, so these two checks cannot apply to the kernel bodies in this module.
# mypy: disable-error-code="untyped-decorator,no-untyped-def"
"""Paged attention on the GPU: decode (flash-decoding) and varlen causal prefill, in Triton.

Both read one layer's cache ``[num_pages, 2, tokens_per_block, kv_heads, head_size]`` (K at
index 0, V at 1) through a block table, and never read a page at or past a sequence's length,
so whatever the unused slots and other sequences' pages hold never reaches the output. Softmax
runs online in fp32; fp16 and bf16 feed the tensor cores, fp32 is multiplied in IEEE fp32.

- :func:`paged_attention_decode`: one program per (sequence, KV head, context split) handles
  every query head of the KV head's group, so each K and V tile is read once per group; the
  group's scores and outputs are each one ``tl.dot`` with the group padded to 16 rows (on an
  H200, 6 to 10 times faster than a broadcast multiply and sum over a group of 4, which the
  tensor cores' idle rows cost nothing against: decode is bound by reading K and V). Few long
  sequences are split over the context (flash-decoding): each split writes a partial result
  and its log-sum-exp, and a second kernel combines them.
- :func:`paged_attention_prefill`: FlashAttention-2 tiles of ``block_m`` new tokens of one
  query head against ``block_n`` keys. New token ``j`` of ``q`` attends to positions
  ``0 .. seq_len - q + j`` (the mask aligned to the sequence's end, so a cached prefix is
  attended in full); key tiles every row of a query tile sees skip the mask, and key tiles no
  row sees are never loaded.

Both run on the GPU and, for development without one, under Triton's interpreter
(``TRITON_INTERPRET=1``, set before this module is imported) on CPU tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sagellm_backend.errors import InvalidArgumentError

__all__ = [
    "DecodeTiles",
    "PrefillTiles",
    "decode_splits",
    "decode_tiles",
    "paged_attention_decode",
    "paged_attention_prefill",
    "prefill_tiles",
]

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HEAD_SIZES = (16, 32, 64, 128, 256)
_SMS_OFF_GPU = 132
"""Multiprocessors the split heuristic assumes off the GPU (an H200's), under the interpreter."""
_sm_counts: dict[int, int] = {}


@dataclass(frozen=True)
class DecodeTiles:
    """Launch shape of the decode kernel: ``block_n`` keys per step, warps and pipeline
    stages per program."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self) -> None:
        _check_tiles(self, blocks=("block_n",))


@dataclass(frozen=True)
class PrefillTiles:
    """Launch shape of the prefill kernel: ``block_m`` queries by ``block_n`` keys per step."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        _check_tiles(self, blocks=("block_m", "block_n"))


def _check_tiles(tiles: DecodeTiles | PrefillTiles, *, blocks: tuple[str, ...]) -> None:
    """Tile sizes of at least 16 and warps powers of 2, pipeline stages at least 1."""
    for name in (*blocks, "num_warps", "num_stages"):
        value = getattr(tiles, name)
        least = 16 if name in blocks else 1
        power = name != "num_stages"
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < least
            or (power and value & (value - 1))
        ):
            raise InvalidArgumentError(
                f"{type(tiles).__name__}.{name} must be "
                f"{'a power of 2' if power else 'an int'} of at least {least}, got {value!r}",
                hint="pass tiles such as decode_tiles() or prefill_tiles() return",
            )


def decode_tiles(head_size: int, dtype: torch.dtype, *, split: bool) -> DecodeTiles:
    """The decode launch shape for a head size and dtype, split over the context or not.

    Measured on an H200 (bf16, 32/8 heads, benchmarks/tune_cuda_attention.py): 64 keys per
    step for head size 128, 128 for 64 and for split launches (each split's context is short).
    """
    if dtype == torch.float32 or head_size > 128:
        return DecodeTiles(block_n=32, num_warps=4, num_stages=2)
    if split:
        return DecodeTiles(block_n=128, num_warps=4, num_stages=2)
    if head_size <= 64:
        return DecodeTiles(block_n=128, num_warps=4, num_stages=4)
    return DecodeTiles(block_n=64, num_warps=4, num_stages=4)


def prefill_tiles(head_size: int, dtype: torch.dtype) -> PrefillTiles:
    """The prefill launch shape for a head size and dtype (measured as for decode)."""
    if dtype == torch.float32 or head_size > 128:
        return PrefillTiles(block_m=64, block_n=32, num_warps=4, num_stages=2)
    return PrefillTiles(block_m=128, block_n=64, num_warps=4, num_stages=3)


_WAVES = 2
"""Decode programs per multiprocessor that the split heuristic aims for."""
_MIN_SPLIT_TOKENS = 512
_MAX_SPLITS = 64


def decode_splits(programs: int, max_tokens: int, multiprocessors: int) -> int:
    """How many parts to split each sequence's context into (1: no split).

    ``programs`` (batch x KV heads) that already fill ``_WAVES`` programs per multiprocessor
    are not split; fewer are split until they do, keeping at least ``_MIN_SPLIT_TOKENS`` of
    the longest possible context (``max_tokens``, the block table's width in tokens) per split.
    On an H200 a split costs 5% at batch 64 x context 2048 and gains 4.4 times at batch 4 x
    context 32768.
    """
    wanted = _WAVES * multiprocessors
    if programs >= wanted:
        return 1
    return max(1, min(_cdiv(wanted, programs), max_tokens // _MIN_SPLIT_TOKENS, _MAX_SPLITS))


# Kernels.


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """Fold scores ``s`` (log2 units, -inf where masked) and values ``v`` into the state."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    query,
    cache,
    block_tables,
    seq_lens,
    out,
    lse,
    scale,
    q_stride_b,
    q_stride_h,
    o_stride_b,
    o_stride_h,
    o_stride_s,
    page_stride,
    kv_stride,
    token_stride,
    head_stride,
    table_stride,
    table_width,
    split_tokens,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    TOKENS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Program (sequence, KV head, split): every query head of the group over one context part.
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.minimum(tl.load(seq_lens + seq), table_width * TOKENS)
    start = split * split_tokens
    end = tl.minimum(length, start + split_tokens)
    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows
    live = rows < GROUP
    dims = tl.arange(0, HEAD_SIZE)
    q = tl.load(
        query + seq * q_stride_b + heads[:, None] * q_stride_h + dims[None, :],
        mask=live[:, None],
        other=0.0,
    )
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_SIZE], tl.float32)
    table = block_tables + seq * table_stride
    keys_base = cache + kv_head * head_stride
    for first in range(start, end, BLOCK_N):
        tokens = first + tl.arange(0, BLOCK_N)
        inside = tokens < end
        page = tl.load(table + tokens // TOKENS, mask=inside, other=0).to(tl.int64)
        where = (page * page_stride + (tokens % TOKENS) * token_stride)[:, None] + dims[None, :]
        k = tl.load(keys_base + where, mask=inside[:, None], other=0.0)
        v = tl.load(keys_base + kv_stride + where, mask=inside[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(inside[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, PRECISION)
    seen = l_i > 0.0
    result = acc / tl.where(seen, l_i, 1.0)[:, None]
    target = out + seq * o_stride_b + heads[:, None] * o_stride_h + split * o_stride_s
    tl.store(target + dims[None, :], result.to(out.dtype.element_ty), mask=live[:, None])
    if SPLIT:
        total = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        splits = tl.num_programs(2)
        where_lse = (seq * GROUP * tl.num_programs(1) + heads) * splits + split
        tl.store(lse + where_lse, total, mask=live)


@triton.jit
def _combine_kernel(
    parts,
    lse,
    out,
    splits,
    o_stride_b,
    o_stride_h,
    HEAD_SIZE: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    # Program (sequence, head): the splits' partial results weighted by their softmax mass.
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = seq * tl.num_programs(1) + head
    parts_index = tl.arange(0, SPLITS_PAD)
    live = parts_index < splits
    dims = tl.arange(0, HEAD_SIZE)
    mass = tl.load(lse + row * splits + parts_index, mask=live, other=float("-inf"))
    top = tl.max(mass, axis=0)
    weights = tl.exp2(mass - tl.where(top == float("-inf"), 0.0, top))
    partial = tl.load(
        parts + (row * splits + parts_index)[:, None] * HEAD_SIZE + dims[None, :],
        mask=live[:, None],
        other=0.0,
    )
    total = tl.sum(weights, axis=0)
    result = tl.sum(weights[:, None] * partial, axis=0) / tl.where(total > 0.0, total, 1.0)
    target = out + seq * o_stride_b + head * o_stride_h + dims
    tl.store(target, result.to(out.dtype.element_ty))


@triton.jit
def _prefill_kernel(
    query,
    cache,
    block_tables,
    seq_lens,
    query_start_loc,
    out,
    scale,
    q_stride_n,
    q_stride_h,
    o_stride_n,
    o_stride_h,
    page_stride,
    kv_stride,
    token_stride,
    head_stride,
    table_stride,
    table_width,
    GROUP: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    TOKENS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Program (head, query tile, sequence); the tiles run last to first, the longest first.
    head = tl.program_id(0)
    first_row = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    seq = tl.program_id(2).to(tl.int64)
    q_start = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_start
    if first_row >= q_len:
        return
    length = tl.minimum(tl.load(seq_lens + seq), table_width * TOKENS)
    context = length - q_len
    rows = first_row + tl.arange(0, BLOCK_M)
    live = rows < q_len
    positions = context + rows
    dims = tl.arange(0, HEAD_SIZE)
    token_rows = (q_start + rows).to(tl.int64)
    q = tl.load(
        query + token_rows[:, None] * q_stride_n + head * q_stride_h + dims[None, :],
        mask=live[:, None],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_SIZE], tl.float32)
    table = block_tables + seq * table_stride
    keys_base = cache + (head // GROUP) * head_stride
    # Keys 0 .. context + first_row are visible to every row of the tile: no mask there.
    unmasked = tl.maximum(context + first_row + 1, 0) // BLOCK_N * BLOCK_N
    end = tl.minimum(context + tl.minimum(first_row + BLOCK_M, q_len), length)
    for first in range(0, unmasked, BLOCK_N):
        keys = first + tl.arange(0, BLOCK_N)
        page = tl.load(table + keys // TOKENS).to(tl.int64)
        where = (page * page_stride + (keys % TOKENS) * token_stride)[:, None] + dims[None, :]
        k = tl.load(keys_base + where)
        v = tl.load(keys_base + kv_stride + where)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, PRECISION)
    for first in range(unmasked, end, BLOCK_N):
        keys = first + tl.arange(0, BLOCK_N)
        inside = keys < length
        page = tl.load(table + keys // TOKENS, mask=inside, other=0).to(tl.int64)
        where = (page * page_stride + (keys % TOKENS) * token_stride)[:, None] + dims[None, :]
        k = tl.load(keys_base + where, mask=inside[:, None], other=0.0)
        v = tl.load(keys_base + kv_stride + where, mask=inside[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        allowed = (keys[None, :] <= positions[:, None]) & inside[None, :]
        s = tl.where(allowed, s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, PRECISION)
    result = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    target = out + token_rows[:, None] * o_stride_n + head * o_stride_h + dims[None, :]
    tl.store(target, result.to(out.dtype.element_ty), mask=live[:, None])


# Launches.


def paged_attention_decode(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    tiles: DecodeTiles | None = None,
) -> torch.Tensor:
    """Attention of ``query[i]`` (``[b, heads, d]``) over the first ``seq_lens[i]`` cached tokens
    of sequence ``i``, read through row ``i`` of ``block_tables``; a length of 0 gives zeros.

    ``num_splits`` parts of the context per sequence (None: :func:`decode_splits` picks from
    the batch, the KV heads, the multiprocessors and the block table's width; the parts are
    whole key tiles, so a short table gets fewer) and ``tiles`` (None: :func:`decode_tiles`)
    tune the launch. Returns ``out`` (written in full) or a new
    ``[b, heads, d]`` tensor. Queued on the current stream; nothing is read back to the host.
    """
    op = "paged_attention_decode"
    query, kv_cache, block_tables, seq_lens = _check_cache_args(
        op, query, kv_cache, block_tables, seq_lens, scale
    )
    batch, heads, head_size = query.shape
    if block_tables.shape[0] != batch or seq_lens.shape[0] != batch:
        raise InvalidArgumentError(
            f"{op}: {batch} queries but block_tables has {block_tables.shape[0]} rows and "
            f"seq_lens {seq_lens.shape[0]}",
            hint="pass one query, one block table row and one length per sequence",
        )
    result = _output(op, query, out)
    if num_splits is not None and (
        isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1
    ):
        raise InvalidArgumentError(
            f"{op}: num_splits must be a positive int, got {num_splits!r}",
            hint="pass num_splits=None to let the heuristic choose",
        )
    if batch == 0:
        return result
    tokens, kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = heads // kv_heads
    width = block_tables.shape[1]
    if num_splits is None:
        num_splits = decode_splits(batch * kv_heads, width * tokens, _multiprocessors(query.device))
    shape = tiles or decode_tiles(head_size, query.dtype, split=num_splits > 1)
    # Whole key tiles per split, and no split wholly past the block table.
    split_tokens = max(
        shape.block_n,
        _cdiv(_cdiv(width * tokens, num_splits), shape.block_n) * shape.block_n,
    )
    splits = max(1, _cdiv(width * tokens, split_tokens))
    tables, lengths = block_tables.contiguous(), seq_lens.contiguous()
    if splits == 1:
        target, lse = result, result
        strides = (result.stride(0), result.stride(1), 0)
    else:
        target = torch.empty(
            (batch, heads, splits, head_size), dtype=torch.float32, device=query.device
        )
        lse = torch.empty((batch, heads, splits), dtype=torch.float32, device=query.device)
        strides = (target.stride(0), target.stride(1), target.stride(2))
    _decode_kernel[(batch, kv_heads, splits)](
        query,
        kv_cache,
        tables,
        lengths,
        target,
        lse,
        float(scale) * _LOG2E,
        query.stride(0),
        query.stride(1),
        *strides,
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        tables.stride(0),
        width,
        split_tokens,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_SIZE=head_size,
        TOKENS=tokens,
        BLOCK_N=shape.block_n,
        SPLIT=splits > 1,
        PRECISION=_precision(query.dtype),
        num_warps=shape.num_warps,
        num_stages=shape.num_stages,
    )
    if splits > 1:
        _combine_kernel[(batch, heads)](
            target,
            lse,
            result,
            splits,
            result.stride(0),
            result.stride(1),
            HEAD_SIZE=head_size,
            SPLITS_PAD=triton.next_power_of_2(splits),
            num_warps=4,
        )
    return result


def paged_attention_prefill(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    tiles: PrefillTiles | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cache, themselves included.

    Sequence ``i``'s new tokens are ``query[query_start_loc[i]:query_start_loc[i + 1]]``, the
    last ``q`` of its ``seq_lens[i]`` tokens (their K and V already written); new token ``j``
    attends to positions ``0 .. seq_lens[i] - q + j``. ``max_query_len`` bounds every ``q``;
    the sequences' new tokens cover ``query``'s rows. ``tiles`` (None: :func:`prefill_tiles`)
    tunes the launch. Returns ``out`` or a new ``[n, heads, d]`` tensor.
    """
    op = "paged_attention_prefill"
    query, kv_cache, block_tables, seq_lens = _check_cache_args(
        op, query, kv_cache, block_tables, seq_lens, scale
    )
    batch = seq_lens.shape[0]
    if block_tables.shape[0] != batch:
        raise InvalidArgumentError(
            f"{op}: {batch} sequence lengths but {block_tables.shape[0]} block table rows",
            hint="pass one block table row and one length per sequence",
        )
    if (
        not isinstance(query_start_loc, torch.Tensor)
        or query_start_loc.dtype != torch.int32
        or tuple(query_start_loc.shape) != (batch + 1,)
        or query_start_loc.device != query.device
    ):
        raise InvalidArgumentError(
            f"{op}: query_start_loc must be an int32 [{batch + 1}] tensor on {query.device}, "
            f"got {_describe(query_start_loc)}",
            hint="pass each sequence's first row in query, then the total row count",
        )
    if isinstance(max_query_len, bool) or not isinstance(max_query_len, int) or max_query_len < 0:
        raise InvalidArgumentError(
            f"{op}: max_query_len must be a non-negative int, got {max_query_len!r}",
            hint="pass the most new tokens of any sequence in the batch",
        )
    result = _output(op, query, out)
    rows, heads, head_size = query.shape
    longest = min(max_query_len, rows)
    if batch == 0 or longest == 0:
        return result
    tokens, kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    shape = tiles or prefill_tiles(head_size, query.dtype)
    tables = block_tables.contiguous()
    _prefill_kernel[(heads, _cdiv(longest, shape.block_m), batch)](
        query,
        kv_cache,
        tables,
        seq_lens.contiguous(),
        query_start_loc.contiguous(),
        result,
        float(scale) * _LOG2E,
        query.stride(0),
        query.stride(1),
        result.stride(0),
        result.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        tables.stride(0),
        tables.shape[1],
        GROUP=heads // kv_heads,
        HEAD_SIZE=head_size,
        TOKENS=tokens,
        BLOCK_M=shape.block_m,
        BLOCK_N=shape.block_n,
        PRECISION=_precision(query.dtype),
        num_warps=shape.num_warps,
        num_stages=shape.num_stages,
    )
    return result


# Validation.


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {tuple(value.shape)} on {value.device}"
    return type(value).__name__


def _tensor(op: str, name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InvalidArgumentError(
            f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}",
            hint=f"pass {name} as a tensor on the cache's device",
        )
    return value


def _check_cache_args(
    op: str,
    query: object,
    kv_cache: object,
    block_tables: object,
    seq_lens: object,
    scale: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shapes, dtypes and devices common to both ops, checked before anything is queued."""
    query = _tensor(op, "query", query)
    kv_cache = _tensor(op, "kv_cache", kv_cache)
    block_tables = _tensor(op, "block_tables", block_tables)
    seq_lens = _tensor(op, "seq_lens", seq_lens)
    if query.dim() != 3 or query.dtype not in _DTYPES:
        raise InvalidArgumentError(
            f"{op}: query must be a float16, bfloat16 or float32 [tokens, heads, head_size] "
            f"tensor, got {_describe(query)}",
            hint="pass the projected queries in the model's dtype",
        )
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2 or kv_cache.dtype != query.dtype:
        raise InvalidArgumentError(
            f"{op}: kv_cache must be one layer's {query.dtype} cache [num_pages, 2, "
            f"tokens_per_block, kv_heads, head_size], got {_describe(kv_cache)}",
            hint="pass kv_cache(layer) of a pool whose kv_dtype is the query's dtype",
        )
    heads, head_size = query.shape[1], query.shape[2]
    tokens, kv_heads, cache_head_size = kv_cache.shape[2:]
    if cache_head_size != head_size or head_size not in _HEAD_SIZES:
        raise InvalidArgumentError(
            f"{op}: head sizes of query ({head_size}) and cache ({cache_head_size}) must match "
            f"and be one of {', '.join(map(str, _HEAD_SIZES))}",
            hint="configure the KV layout with the model's head size",
        )
    if kv_heads == 0 or tokens == 0 or heads % kv_heads:
        raise InvalidArgumentError(
            f"{op}: {heads} query heads are not a multiple of the cache's {kv_heads} KV heads "
            f"(or the cache has no slots)",
            hint="configure the KV layout with the model's KV heads",
        )
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32:
        raise InvalidArgumentError(
            f"{op}: block_tables must be int32 [sequences, pages], got {_describe(block_tables)}",
            hint="pass the block_tables of the batch metadata (create_batch_metadata, then plan)",
        )
    if seq_lens.dim() != 1 or seq_lens.dtype != torch.int32:
        raise InvalidArgumentError(
            f"{op}: seq_lens must be int32 [sequences], got {_describe(seq_lens)}",
            hint="pass each sequence's length as an int32 tensor",
        )
    for name, value in (("kv_cache", kv_cache), ("block_tables", block_tables)):
        if value.device != query.device:
            raise InvalidArgumentError(
                f"{op}: {name} is on {value.device}, query on {query.device}",
                hint="move the tensors to the cache's device",
            )
    if query.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise InvalidArgumentError(
            f"{op}: query and kv_cache must be contiguous in the head dimension, got strides "
            f"{query.stride()} and {kv_cache.stride()}",
            hint="pass query.contiguous()",
        )
    if seq_lens.device != query.device:
        raise InvalidArgumentError(
            f"{op}: seq_lens is on {seq_lens.device}, query on {query.device}",
            hint="move the tensors to the cache's device",
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InvalidArgumentError(
            f"{op}: scale must be a finite number, got {scale!r}",
            hint="pass head_size ** -0.5 or the model's softmax scale",
        )
    return query, kv_cache, block_tables, seq_lens


def _output(op: str, query: torch.Tensor, out: object) -> torch.Tensor:
    if out is None:
        return torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if (
        not isinstance(out, torch.Tensor)
        or out.shape != query.shape
        or out.dtype != query.dtype
        or out.device != query.device
        or out.stride(-1) != 1
    ):
        raise InvalidArgumentError(
            f"{op}: out must be a {query.dtype} {tuple(query.shape)} tensor on {query.device}, "
            f"contiguous in its last dimension, got {_describe(out)}",
            hint="allocate out like the query, or pass out=None",
        )
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _precision(dtype: torch.dtype) -> str:
    """fp32 products in IEEE fp32; fp16 and bf16 take the tensor cores either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return _SMS_OFF_GPU
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]
