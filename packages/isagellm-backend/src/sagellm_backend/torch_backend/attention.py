"""Paged attention over one layer's KV cache: decode, and prefill (chunked prefill included).

Each sequence reads only the pages that hold its first ``seq_len`` tokens and, of those, only
the live slots: a NaN in an unused slot, past a sequence's length, or in another sequence's page
(page 0 used as padding of a block table, say) never reaches an output. Query heads attend over
their KV head through a grouped reshape (GQA, MQA), and K and V are widened to fp32 once per
sequence, never copied per query head.

These are the reference versions: lengths and query offsets are read on the host (a
synchronisation on a device). Decode gathers exactly the live slots of the whole batch into a
zero-padded buffer and runs one batched product; prefill runs each sequence as one batched
matrix product over its live pages, cut to its length before any arithmetic. Device wheels
register faster kernels under the same names.
"""

from __future__ import annotations

import torch

from sagellm_backend.torch_backend.arguments import (
    cache_arg,
    fail,
    number_arg,
    same_device,
    tensor_arg,
)

__all__ = ["paged_attention_decode", "paged_attention_prefill"]


def paged_attention_decode(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query[i]`` (``[b, heads, d]``) over the first ``seq_lens[i]`` tokens of
    sequence ``i``, read through row ``i`` of ``block_tables``. Length 0 gives zeros."""
    op = "paged_attention_decode"
    query = tensor_arg(op, "query", query, "[b, heads, d]")
    batch = query.shape[0]
    cache = _cache_for(op, kv_cache, query)
    tables = tensor_arg(op, "block_tables", block_tables, "[b, w]", index=True, leading=batch)
    lengths = tensor_arg(op, "seq_lens", seq_lens, "[b]", index=True, leading=batch)
    result = None if out is None else _output(op, out, query)
    same_device(op, query, kv_cache=cache, block_tables=tables, seq_lens=lengths, out=result)
    factor = number_arg(op, "scale", scale)
    lens = _lengths(op, cache, tables, lengths)
    longest = max(lens, default=0)
    if longest == 0:
        return torch.zeros_like(query) if result is None else result.zero_()
    tokens, kv_heads, d = cache.shape[2], cache.shape[3], cache.shape[4]
    heads = query.shape[1]
    wide = _wide(query)
    # Gather exactly the live slots of every sequence into a buffer padded with zeros.
    span = torch.arange(longest, device=cache.device)
    row, position = (span[None, :] < lengths[:, None]).nonzero().unbind(1)
    pages = tables[row, position // tokens].to(torch.int64)
    _check_pages(op, cache, pages)
    offsets = position % tokens
    if cache.is_contiguous():  # rows of [pages * 2 * tokens]: K then V of each page
        first = pages * (2 * tokens) + offsets
        live = cache.view(-1, kv_heads * d).index_select(0, torch.cat([first, first + tokens]))
    else:
        live = cache[pages, :, offsets].transpose(0, 1).reshape(-1, kv_heads * d)
    kv = torch.zeros((2 * batch * longest, kv_heads * d), dtype=wide, device=cache.device)
    target = row * longest + position
    kv.index_copy_(0, torch.cat([target, target + batch * longest]), live.to(wide))
    keys, values = kv.view(2, batch, longest, kv_heads, d).transpose(2, 3).unbind(0)
    q = (query.to(wide) * factor).view(batch, kv_heads, heads // kv_heads, d)
    scores = torch.matmul(q, keys.transpose(2, 3))  # [batch, kv_heads, group, longest]
    if min(lens) < longest:
        beyond = span[None, :] >= lengths[:, None]
        scores.masked_fill_(beyond[:, None, None, :], float("-inf"))
    mixed = torch.matmul(torch.softmax(scores, dim=-1), values).reshape(batch, heads, d)
    if min(lens) == 0:
        mixed.masked_fill_((lengths == 0)[:, None, None], 0.0)
    return mixed.to(query.dtype) if result is None else result.copy_(mixed)


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
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens (the last of its ``seq_lens[i]`` tokens,
    rows ``query_start_loc[i]:query_start_loc[i + 1]`` of ``query``) over its cache.

    Rows of ``query`` past ``query_start_loc[-1]`` are padding; this reference writes zeros
    there (the protocol leaves them unspecified).
    """
    op = "paged_attention_prefill"
    query = tensor_arg(op, "query", query, "[n, heads, d]")
    cache = _cache_for(op, kv_cache, query)
    tables = tensor_arg(op, "block_tables", block_tables, "[b, w]", index=True)
    batch = tables.shape[0]
    lengths = tensor_arg(op, "seq_lens", seq_lens, "[b]", index=True, leading=batch)
    starts_t = tensor_arg(
        op, "query_start_loc", query_start_loc, "[b + 1]", index=True, leading=batch + 1
    )
    result = torch.empty_like(query) if out is None else _output(op, out, query)
    same_device(op, query, kv_cache=cache, block_tables=tables, seq_lens=lengths, out=result)
    same_device(op, query, query_start_loc=starts_t)
    factor = number_arg(op, "scale", scale)
    if isinstance(max_query_len, bool) or not isinstance(max_query_len, int) or max_query_len < 0:
        fail(op, f"max_query_len must be an int >= 0, got {max_query_len!r}", "pass the longest q")
    starts: list[int] = starts_t.tolist()
    lens = _lengths(op, cache, tables, lengths)
    needed = (lengths.to(torch.int64) + cache.shape[2] - 1) // cache.shape[2]
    used = torch.arange(tables.shape[1], device=tables.device)[None, :] < needed[:, None]
    _check_pages(op, cache, tables[used])
    if starts[0] != 0 or starts[-1] > query.shape[0]:
        fail(
            op,
            f"query_start_loc must run from 0 to at most {query.shape[0]} (the query's rows), "
            f"got {starts[0]}..{starts[-1]}",
            "build query_start_loc as the running sum of the query lengths, from 0",
        )
    for i, length in enumerate(lens):
        new = starts[i + 1] - starts[i]
        if not 0 <= new <= min(length, max_query_len):
            fail(
                op,
                f"sequence {i} has {new} new tokens, {length} tokens in all and "
                f"max_query_len {max_query_len}",
                "new tokens are the last of seq_lens[i]; query_start_loc must not decrease",
            )
    result[starts[-1] :].zero_()
    for i, length in enumerate(lens):
        start, end = starts[i], starts[i + 1]
        _attend(query[start:end], cache, tables[i], length, factor, result[start:end])
    return result


def _cache_for(op: str, kv_cache: object, query: torch.Tensor) -> torch.Tensor:
    cache = cache_arg(op, kv_cache, query.shape[2])
    if cache.dtype != query.dtype:
        fail(op, f"the query is {query.dtype}, the cache {cache.dtype}", "cast the query")
    heads, kv_heads = query.shape[1], cache.shape[3]
    if not kv_heads or heads % kv_heads:
        fail(
            op,
            f"{heads} query heads are not a multiple of the cache's {kv_heads} KV heads",
            "use as many query heads as KV heads, or a multiple of them (GQA, MQA)",
        )
    return cache


def _output(op: str, out: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    shape = "[" + ", ".join(str(n) for n in query.shape) + "]"
    result = tensor_arg(op, "out", out, shape)
    if result.shape != query.shape or result.dtype != query.dtype:
        fail(
            op,
            f"out is {tuple(result.shape)} {result.dtype}, the query {tuple(query.shape)} "
            f"{query.dtype}",
            "pass out shaped and typed like the query",
        )
    return result


def _wide(query: torch.Tensor) -> torch.dtype:
    return torch.float64 if query.dtype == torch.float64 else torch.float32


def _lengths(
    op: str, cache: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor
) -> list[int]:
    """The sequence lengths, on the host, once each is within its row of the block table."""
    tokens, width = cache.shape[2], tables.shape[1]
    lens: list[int] = lengths.tolist()
    for i, length in enumerate(lens):
        if not 0 <= length <= width * tokens:
            fail(
                op,
                f"seq_lens[{i}] is {length}; a row of {width} pages holds 0..{width * tokens}",
                "pass each sequence's token count, within its block table row",
            )
    return lens


def _check_pages(op: str, cache: torch.Tensor, pages: torch.Tensor) -> None:
    """Refuse the pages sequences read (block table entries) outside the cache."""
    if pages.numel() == 0:
        return
    low, high = (int(n) for n in torch.aminmax(pages))
    if low < 0 or high >= cache.shape[0]:
        fail(
            op,
            f"the block tables' entries within the sequences' lengths run {low}..{high}, "
            f"outside the cache's pages 0..{cache.shape[0] - 1}",
            "fill each row with the pages of its sequence's block",
        )


def _attend(
    query: torch.Tensor,
    cache: torch.Tensor,
    pages: torch.Tensor,
    length: int,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Write into ``out`` the attention of ``query[m, heads, d]``, the last ``m`` of ``length``
    tokens, over those tokens, read from ``cache`` through ``pages``."""
    m, heads, d = query.shape
    if m == 0:
        return
    if length == 0:
        out.zero_()
        return
    tokens, kv_heads = cache.shape[2], cache.shape[3]
    group = heads // kv_heads
    count = -(-length // tokens)
    wide = _wide(query)
    live = cache.index_select(0, pages[:count])  # [count, 2, tokens, kv_heads, d]
    kv = live.permute(1, 3, 0, 2, 4).reshape(2, kv_heads, count * tokens, d)[:, :, :length]
    kv = kv.to(wide)
    q = query.to(wide) * scale
    q = q.reshape(m, kv_heads, group, d).permute(1, 2, 0, 3).reshape(kv_heads, group * m, d)
    scores = torch.bmm(q, kv[0].transpose(1, 2))  # [kv_heads, group * m, length]
    if m > 1:
        positions = torch.arange(length, device=query.device)
        future = positions[None, :] > positions[length - m :, None]
        scores.view(kv_heads, group, m, length).masked_fill_(future, float("-inf"))
    mixed = torch.bmm(torch.softmax(scores, dim=-1), kv[1])  # [kv_heads, group * m, d]
    out.copy_(mixed.view(kv_heads, group, m, d).permute(2, 0, 1, 3).reshape(m, heads, d))
