"""Paged attention on a GPU against the hardware and torch, as ratios measured in one run.

The rows of the device suite (:mod:`sagellm_backend_cuda.bench`) for the Triton kernels of
:mod:`sagellm_backend_cuda.attention`, at Llama-3-8B's attention shape (32 query / 8 KV heads,
head size 128 unless a row says 64, bf16, 16 tokens per block), every sequence's pages a random
permutation of the cache:

- decode: bytes of K and V read over the time, against the same run's copy roofline; against
  torch's ``scaled_dot_product_attention`` (its own backend choice, ``enable_gqa``) on the same K
  and V laid out contiguously; and against the torch layer's reference kernel;
- prefill: FLOP rate, ``4 x head size x query heads x unmasked (query, key) pairs``, against
  SDPA with ``SDPBackend.FLASH_ATTENTION`` and ``enable_gqa`` on the same queries, keys and values
  laid out contiguously: ``is_causal`` where there is no cached prefix, and the lower-right
  causal bias (``causal_lower_right``, which SDPA runs as the flash kernel's causal mode, aligned
  to the bottom right) over a cached prefix. Both compute the same function (checked) and so
  count the same pairs.

Every row also reports the largest difference between our output and the baseline's.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from sagellm_backend.kernels import KernelTable
from sagellm_backend.torch_backend.kernels import register_reference_kernels
from sagellm_backend_cuda.attention import paged_attention_decode, paged_attention_prefill

__all__ = [
    "DECODE_ROWS",
    "PREFILL_ROWS",
    "TimeOp",
    "attention_suite",
    "contiguous_kv",
    "flash_prefill",
    "format_attention",
    "paged_case",
]

TimeOp = Callable[[Callable[[], object], int | None], tuple[float, float]]
"""``time(op, repeats)``: (median device ms, median host ms to issue) of ``op``."""

HEADS, KV_HEADS, TOKENS_PER_BLOCK = 32, 8, 16
DTYPE = torch.bfloat16
REPEATS = 15
"""Timed runs of ours and of SDPA per row (each well under a few milliseconds)."""


@dataclass(frozen=True)
class DecodeRow:
    name: str
    batch: int
    context: int
    head_size: int = 128
    goal: float | None = None


@dataclass(frozen=True)
class PrefillRow:
    name: str
    batch: int
    new: int
    cached: int = 0
    head_size: int = 128
    goal: float | None = None


DECODE_ROWS = (
    DecodeRow("decode_b64_ctx2048", 64, 2048, goal=0.85),
    DecodeRow("decode_b256_ctx512", 256, 512, goal=0.80),
    DecodeRow("decode_b64_ctx2048_d64", 64, 2048, head_size=64, goal=0.80),
    DecodeRow("decode_b4_ctx32768", 4, 32768, goal=0.75),
)
PREFILL_ROWS = (
    PrefillRow("prefill_4x4096", 4, 4096, goal=0.9),
    PrefillRow("prefill_8x512_over_8192", 8, 512, cached=8192, goal=0.9),
)
DECODE_CURVE = tuple(DecodeRow(f"decode_ctx{c}", 131072 // c, c) for c in (512, 2048, 8192, 32768))
"""Decode bandwidth against context length at 131072 cached tokens per step."""
PREFILL_CURVE = tuple(PrefillRow(f"prefill_len{n}", 16384 // n, n) for n in (512, 1024, 2048, 8192))
"""Prefill FLOP rate against prompt length at 16384 new tokens per batch."""


def attention_suite(
    time_op: TimeOp,
    roofline_gbps: float,
    device: torch.device,
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Every attention row, as a JSON-ready dict; the torch layer's reference is timed on the
    rows with a goal."""
    table = KernelTable()
    register_reference_kernels(table, device)
    references = {spec.name: spec.impl for spec in table.list()}
    decode, prefill = [], []
    for row in DECODE_ROWS + DECODE_CURVE:
        say(f"attention: {row.name}")
        decode.append(_decode(row, time_op, roofline_gbps, device, _timed(row, references)))
        _release()
    for prow in PREFILL_ROWS + PREFILL_CURVE:
        say(f"attention: {prow.name}")
        prefill.append(_prefill(prow, time_op, device, _timed(prow, references)))
        _release()
    checks = [
        {"target": r["name"], "goal": r["goal"], "measured": r["of_roofline"]}
        for r in decode
        if r["goal"] is not None
    ] + [
        {"target": r["name"], "goal": r["goal"], "measured": r["vs_sdpa_flash"]}
        for r in prefill
        if r["goal"] is not None
    ]
    for check in checks:
        check["met"] = check["measured"] >= check["goal"]
    return {"decode": decode, "prefill": prefill, "checks": checks}


def _timed(
    row: DecodeRow | PrefillRow, references: dict[str, Callable[..., Any]]
) -> dict[str, Callable[..., Any]]:
    return references if row.goal is not None else {}


def _reference_ms(time_op: TimeOp, op: Callable[[], object]) -> float | None:
    """The reference's time, or None where it needs more memory than the device has."""
    try:
        return time_op(op, 3)[0]
    except torch.cuda.OutOfMemoryError:
        return None


def _release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def paged_case(
    batch: int, context: int, head_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random cache whose pages are dealt to the sequences in a random order."""
    pages = context // TOKENS_PER_BLOCK
    shape = (batch * pages, 2, TOKENS_PER_BLOCK, KV_HEADS, head_size)
    cache = torch.empty(shape, dtype=DTYPE, device=device).normal_()
    tables = torch.randperm(batch * pages, device=device).view(batch, pages).to(torch.int32)
    lengths = torch.full((batch,), context, dtype=torch.int32, device=device)
    return cache, tables, lengths


def contiguous_kv(cache: torch.Tensor, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V as ``[batch, kv_heads, context, head_size]``, the layout SDPA reads."""
    batch, head_size = tables.shape[0], cache.shape[-1]
    pages = cache[tables.long()]  # [batch, pages, 2, tokens, kv_heads, d]
    k, v = (pages[:, :, i].reshape(batch, -1, KV_HEADS, head_size) for i in (0, 1))
    return k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()


def _decode(
    row: DecodeRow,
    time_op: TimeOp,
    roofline: float,
    device: torch.device,
    references: dict[str, Callable[..., Any]],
) -> dict[str, Any]:
    cache, tables, lengths = paged_case(row.batch, row.context, row.head_size, device)
    query = torch.randn((row.batch, HEADS, row.head_size), dtype=DTYPE, device=device)
    scale = row.head_size**-0.5
    out = torch.empty_like(query)
    ours_ms, host_ms = time_op(
        lambda: paged_attention_decode(query, cache, tables, lengths, scale, out=out), REPEATS
    )
    k, v = contiguous_kv(cache, tables)
    q = query[:, :, None]

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    sdpa_ms, _ = time_op(sdpa, REPEATS)
    diff = (out.float() - sdpa()[:, :, 0].float()).abs().max().item()
    reference = references.get("paged_attention_decode")
    reference_ms = (
        _reference_ms(time_op, lambda: reference(query, cache, tables, lengths, scale))
        if reference is not None
        else None
    )
    moved = 2 * row.batch * row.context * KV_HEADS * row.head_size * DTYPE.itemsize
    gbps = moved / ours_ms / 1e6
    return {
        "name": row.name,
        "batch": row.batch,
        "context": row.context,
        "head_size": row.head_size,
        "kv_bytes": moved,
        "ms": ours_ms,
        "host_issue_ms": host_ms,
        "gbps": gbps,
        "of_roofline": gbps / roofline,
        "sdpa_gbps": moved / sdpa_ms / 1e6,
        "vs_sdpa": sdpa_ms / ours_ms,
        "reference_ms": reference_ms,
        "vs_reference": None if reference_ms is None else reference_ms / ours_ms,
        "max_abs_diff_vs_sdpa": diff,
        "goal": row.goal,
    }


def _prefill(
    row: PrefillRow,
    time_op: TimeOp,
    device: torch.device,
    references: dict[str, Callable[..., Any]],
) -> dict[str, Any]:
    context = row.cached + row.new
    cache, tables, lengths = paged_case(row.batch, context, row.head_size, device)
    query = torch.randn((row.batch * row.new, HEADS, row.head_size), dtype=DTYPE, device=device)
    starts = torch.arange(row.batch + 1, dtype=torch.int32, device=device) * row.new
    scale = row.head_size**-0.5
    out = torch.empty_like(query)
    ours_ms, host_ms = time_op(
        lambda: paged_attention_prefill(
            query, cache, tables, lengths, starts, row.new, scale, out=out
        ),
        REPEATS,
    )
    k, v = contiguous_kv(cache, tables)
    q = query.view(row.batch, row.new, HEADS, row.head_size).transpose(1, 2).contiguous()
    sdpa, baseline = flash_prefill(q, k, v, row.cached, scale)
    sdpa_ms, _ = time_op(sdpa, REPEATS)
    expected = sdpa().transpose(1, 2).reshape(out.shape)
    diff = (out.float() - expected.float()).abs().max().item()
    reference = references.get("paged_attention_prefill")
    reference_ms = None
    if reference is not None:
        reference_ms = _reference_ms(
            time_op, lambda: reference(query, cache, tables, lengths, starts, row.new, scale)
        )
    pairs = row.batch * (row.new * row.cached + row.new * (row.new + 1) // 2)
    flops = 4 * row.head_size * HEADS * pairs
    return {
        "name": row.name,
        "batch": row.batch,
        "new_tokens": row.new,
        "cached_tokens": row.cached,
        "head_size": row.head_size,
        "pairs": pairs,
        "ms": ours_ms,
        "host_issue_ms": host_ms,
        "tflops": flops / ours_ms / 1e9,
        "sdpa_flash_tflops": flops / sdpa_ms / 1e9,
        "vs_sdpa_flash": sdpa_ms / ours_ms,
        "sdpa_baseline": baseline,
        "reference_ms": reference_ms,
        "vs_reference": None if reference_ms is None else reference_ms / ours_ms,
        "max_abs_diff_vs_sdpa": diff,
        "goal": row.goal,
    }


def flash_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cached: int, scale: float
) -> tuple[Callable[[], torch.Tensor], str]:
    """SDPA's flash kernel on ``q[b, heads, new, d]`` over ``k``, ``v`` ``[b, kv_heads, cached +
    new, d]``, causal aligned to the bottom right, and what it runs.

    ``enable_gqa`` where the flash kernel takes it; else K and V repeated to every query head.
    """
    mask: Any = causal_lower_right(q.shape[2], k.shape[2]) if cached else None
    how = "causal_lower_right bias (flash's bottom-right causal)" if cached else "is_causal"

    def run(key: torch.Tensor, value: torch.Tensor, gqa: bool) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(
                q, key, value, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa
            )

    try:
        run(k, v, True)
    except RuntimeError:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return lambda: run(k, v, False), f"SDPA flash, {how}, K/V repeated per query head"
    return lambda: run(k, v, True), f"SDPA flash, {how}, enable_gqa"


def format_attention(figures: dict[str, Any]) -> list[str]:
    """The attention tables of one run, as markdown lines."""
    lines = [
        "| decode | batch x context, d | ms | GB/s | of roofline | SDPA GB/s | vs SDPA | "
        "vs reference | max diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in figures["decode"]:
        lines.append(
            f"| {r['name']} | {r['batch']} x {r['context']}, {r['head_size']} | {r['ms']:.3f} | "
            f"{r['gbps']:.0f} | {r['of_roofline']:.1%} | {r['sdpa_gbps']:.0f} | "
            f"{r['vs_sdpa']:.2f}x | {_times(r['vs_reference'])} | {r['max_abs_diff_vs_sdpa']:.1e} |"
        )
    lines += [
        "",
        "| prefill | batch x new (+cached), d | ms | TFLOP/s | SDPA flash TFLOP/s | vs flash | "
        "vs reference | max diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in figures["prefill"]:
        lines.append(
            f"| {r['name']} | {r['batch']} x {r['new_tokens']} (+{r['cached_tokens']}), "
            f"{r['head_size']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
            f"{r['sdpa_flash_tflops']:.0f} | {r['vs_sdpa_flash']:.2f}x | "
            f"{_times(r['vs_reference'])} | {r['max_abs_diff_vs_sdpa']:.1e} |"
        )
    return lines


def _times(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.0f}x"
