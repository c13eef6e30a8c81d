"""Sweep the launch shapes of the Triton paged attention on a GPU, in one process.

    python benchmarks/tune_cuda_attention.py [results.json [prefill | decode | decode:D ...]]

For each goal shape of the device suite (32 query / 8 KV heads, bf16, 16 tokens per block,
pages in a random order) it times every candidate ``DecodeTiles`` / ``PrefillTiles`` and, for
decode, every split count, with ``triton.testing.do_bench`` (median, L2 flushed between calls),
and checks each variant's output against SDPA on the same K and V laid out contiguously. Decode
is reported in GB/s of K and V read and as a fraction of a 4 GiB device copy measured in the
same run; prefill in TFLOP/s (4 x head size x heads x unmasked pairs) beside SDPA's flash kernel.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from itertools import product
from typing import Any

import torch
import torch.nn.functional as F
import triton

from sagellm_backend_cuda.attention import (
    DecodeTiles,
    PrefillTiles,
    paged_attention_decode,
    paged_attention_prefill,
)
from sagellm_backend_cuda.bench_attention import contiguous_kv, flash_prefill, paged_case

HEADS, KV_HEADS = 32, 8
DTYPE = torch.bfloat16
DEVICE = torch.device("cuda")

DECODE_SHAPES = [(64, 2048, 128), (256, 512, 128), (4, 32768, 128), (64, 2048, 64)]
DECODE_TILES = [
    DecodeTiles(block_n, warps, stages)
    for block_n, (warps, stages) in product(
        (32, 64, 128, 256), ((2, 3), (2, 4), (4, 2), (4, 3), (4, 4), (8, 3))
    )
]
SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48)
PREFILL_SHAPES = [(4, 4096, 0), (8, 512, 8192)]
PREFILL_TILES = [
    PrefillTiles(*t)
    for t in (
        (128, 64, 8, 3),
        (128, 64, 8, 2),
        (128, 64, 8, 4),
        (128, 128, 8, 2),
        (128, 128, 8, 3),
        (128, 64, 4, 3),
        (128, 32, 4, 3),
        (64, 64, 4, 3),
        (64, 128, 4, 3),
        (64, 64, 4, 4),
    )
]


def _ms(fn: Callable[[], object]) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def _say(*parts: object) -> None:
    print(*parts, flush=True)


def _paged(batch: int, context: int, d: int) -> tuple[torch.Tensor, ...]:
    cache, tables, lengths = paged_case(batch, context, d, DEVICE)
    return (cache, tables, lengths, *contiguous_kv(cache, tables))


def _roofline() -> float:
    src = torch.empty(4 << 30, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    ms = _ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def decode(roofline: float, head_size: int | None) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for batch, context, d in DECODE_SHAPES:
        if head_size not in (None, d):
            continue
        results += _decode_shape(batch, context, d, roofline)
        torch.cuda.empty_cache()
    return results


def _decode_shape(batch: int, context: int, d: int, roofline: float) -> list[dict[str, Any]]:
    cache, tables, lengths, k, v = _paged(batch, context, d)
    query = torch.randn((batch, HEADS, d), dtype=DTYPE, device=DEVICE)
    scale = d**-0.5

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(
            query[:, :, None], k, v, scale=scale, enable_gqa=True
        )[:, :, 0]

    expected = sdpa()
    moved = 2 * batch * context * KV_HEADS * d * DTYPE.itemsize
    sdpa_ms = _ms(sdpa)
    _say(f"decode B{batch} ctx{context} d{d}: SDPA {moved / sdpa_ms / 1e6:.0f} GB/s")
    out = torch.empty_like(query)
    best: tuple[float, DecodeTiles] = (float("inf"), DECODE_TILES[0])
    results = []
    for tiles, splits in [(t, None) for t in DECODE_TILES] + [(None, s) for s in SPLITS]:
        shape = tiles or best[1]

        def run(t: DecodeTiles = shape, s: int | None = splits) -> None:
            paged_attention_decode(
                query, cache, tables, lengths, scale, out=out, num_splits=s, tiles=t
            )

        try:
            run()
            diff = (out.float() - expected.float()).abs().max().item()
            ms = _ms(run)
        except Exception as error:  # a shape the GPU cannot hold: record and go on
            _say(f"  {shape} splits={splits}: {type(error).__name__} {str(error)[:400]}")
            continue
        gbps = moved / ms / 1e6
        results.append(
            {
                "batch": batch,
                "context": context,
                "head_size": d,
                "tiles": shape.__dict__,
                "splits": splits,
                "ms": ms,
                "gbps": gbps,
                "of_roofline": gbps / roofline,
                "sdpa_gbps": moved / sdpa_ms / 1e6,
                "max_abs_diff": diff,
            }
        )
        _say(
            f"  {shape} splits={splits}: {ms * 1e3:.1f} us {gbps:.0f} GB/s "
            f"{gbps / roofline:.1%} diff {diff:.1e}"
        )
        if tiles is not None and ms < best[0] and diff < 0.05:
            best = (ms, tiles)
    _say(f"  best {best}")
    return results


def prefill() -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for batch, new, cached in PREFILL_SHAPES:
        results += _prefill_shape(batch, new, cached)
        torch.cuda.empty_cache()
    return results


def _prefill_shape(batch: int, new: int, cached: int, d: int = 128) -> list[dict[str, Any]]:
    context = new + cached
    cache, tables, lengths, k, v = _paged(batch, context, d)
    query = torch.randn((batch * new, HEADS, d), dtype=DTYPE, device=DEVICE)
    starts = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE) * new
    q = query.view(batch, new, HEADS, d).transpose(1, 2).contiguous()
    scale = d**-0.5
    sdpa, baseline = flash_prefill(q, k, v, cached, scale)
    _say(f"prefill baseline: {baseline}")
    expected = sdpa().transpose(1, 2).reshape(query.shape)
    flops = 4 * d * HEADS * batch * (new * cached + new * (new + 1) // 2)
    flash_ms = _ms(sdpa)
    _say(f"prefill {batch}x{new}+{cached}: flash {flops / flash_ms / 1e9:.0f} TFLOP/s")
    out = torch.empty_like(query)
    results = []
    for tiles in PREFILL_TILES:

        def run(t: PrefillTiles = tiles) -> None:
            paged_attention_prefill(
                query, cache, tables, lengths, starts, new, scale, out=out, tiles=t
            )

        try:
            run()
            diff = (out.float() - expected.float()).abs().max().item()
            ms = _ms(run)
        except Exception as error:  # a shape the GPU cannot hold: record and go on
            _say(f"  {tiles}: {type(error).__name__} {str(error)[:400]}")
            continue
        row = {
            "batch": batch,
            "new": new,
            "cached": cached,
            "tiles": tiles.__dict__,
            "ms": ms,
            "tflops": flops / ms / 1e9,
            "flash_tflops": flops / flash_ms / 1e9,
            "vs_flash": flash_ms / ms,
            "max_abs_diff": diff,
        }
        results.append(row)
        _say(
            f"  {tiles}: {ms:.3f} ms {row['tflops']:.0f} TFLOP/s "
            f"{row['vs_flash']:.2f}x flash, diff {diff:.1e}"
        )
    return results


def main(argv: list[str]) -> None:
    """``argv``: [results.json] then what to sweep: ``prefill``, ``decode`` or ``decode:D``
    (head size D only); all by default."""
    roofline = _roofline()
    _say(f"{torch.cuda.get_device_name()}: copy roofline {roofline:.0f} GB/s")
    figures: dict[str, Any] = {"roofline_gbps": roofline}
    for what in argv[2:] or ["prefill", "decode"]:
        name, _, size = what.partition(":")
        if name == "prefill":
            figures[what] = prefill()
        else:
            figures[what] = decode(roofline, int(size) if size else None)
        if len(argv) > 1:
            with open(argv[1], "w") as f:
                json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main(sys.argv)
