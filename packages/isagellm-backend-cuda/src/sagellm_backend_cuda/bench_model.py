"""The model's kernels and sampling on a GPU against the hardware and torch, in one run.

The rows of the device suite (:mod:`sagellm_backend_cuda.bench`) for the kernels the cuda
backend registers under the standard op names (:mod:`sagellm_backend_cuda.layers`,
:mod:`sagellm_backend_cuda.kv_write`, :mod:`sagellm_backend_cuda.sampling`), each checked on its
data before it is timed:

- KV slot write (8 KV heads x 128, 16 tokens per block, slots a random permutation of the
  cache), fused add + rms_norm, rotary (NeoX, 32/8 heads of 128) and silu_and_mul at 16384
  tokens of hidden 4096 in bf16: bytes read plus written over the time, against the same run's
  copy roofline, and against the straightforward torch code;
- sampling at batch 64 over a 128256-token vocabulary of fp32 logits: greedy against the
  roofline of one read of the logits (and ``argmax``); top-k, top-p and both against the
  straightforward torch version (sort, top-k and top-p masks, ``multinomial``). The logits
  rotate through four buffers, so no run reads what the last left in L2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sagellm_backend.torch_backend.provider import TorchBackendProvider
from sagellm_backend.torch_backend.rotary import rotary_cos_sin_cache
from sagellm_backend_cuda.bench_attention import TimeOp

__all__ = ["MODEL_TARGETS", "format_model_kernels", "model_kernels"]

MODEL_TOKENS = 16384
MODEL_HIDDEN = 4096
MODEL_HEADS = (32, 8, 128)
"""Query heads, KV heads and head size: hidden 4096, and 8 KV heads of 128 for the KV write."""
SAMPLE_BATCH = 64
SAMPLE_VOCAB = 128256
SAMPLE_BUFFERS = 4
"""Logits buffers the sampling rows rotate through (4 x 33 MB), so no run reads another's L2."""
MODEL_TARGETS = {
    "kv_cache_write": 0.80,
    "fused_add_rms_norm": 0.80,
    "rotary_embedding": 0.80,
    "silu_and_mul": 0.80,
    "sample_greedy": 0.50,
    "sample_top_k": 3.0,
    "sample_top_p": 3.0,
    "sample_top_k_top_p": 3.0,
}
"""Copy-roofline fractions for the kernels and greedy; speed-ups over the torch sort otherwise."""


def _gbps(nbytes: int, ms: float) -> float:
    return nbytes / ms / 1e6


def model_kernels(
    provider: TorchBackendProvider[Any, Any],
    time_op: TimeOp,
    roofline: float,
    *,
    seed: int = 0,
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """The kernel rows at 16384 tokens, hidden 4096, bf16, and the sampling rows at batch 64,
    vocab 128256, fp32 logits: each checked on its data, then timed."""
    g = torch.Generator(device=provider.torch_device).manual_seed(seed)
    rows = []
    for name, measure in (
        ("kv_cache_write", _kv_write_row),
        ("fused_add_rms_norm", _fused_add_rms_norm_row),
        ("rotary_embedding", _rotary_row),
        ("silu_and_mul", _silu_and_mul_row),
    ):
        say(name)
        row = measure(provider, time_op, g)
        row["gbps"] = _gbps(row["bytes"], row["ms"])
        row["of_roofline"] = row["gbps"] / roofline
        row["vs_torch"] = row["torch_ms"] / row["ms"]
        rows.append({"kernel": name, **row})
        torch.cuda.empty_cache()
    say("sample")
    sampling = _sample_rows(provider, time_op, g, roofline)
    torch.cuda.empty_cache()
    figures = {
        "tokens": MODEL_TOKENS,
        "hidden": MODEL_HIDDEN,
        "dtype": "bf16",
        "kernels": rows,
        "sampling": sampling,
    }
    figures["checks"] = _checks(figures)
    return figures


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(shape, generator=g, device=g.device).to(dtype)


def _relative_error(result: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (result.double() - expected.double()).norm()
    return float(diff / expected.double().norm())


def _kv_write_row(
    provider: TorchBackendProvider[Any, Any], time_op: TimeOp, g: torch.Generator
) -> dict[str, Any]:
    write = provider.get_kernel("kv_cache_write")
    n, (_, kv_heads, head_size), tokens_per_block = MODEL_TOKENS, MODEL_HEADS, 16
    pages = n // tokens_per_block * 2
    cache = torch.full(
        (pages, 2, tokens_per_block, kv_heads, head_size),
        float("nan"),
        dtype=torch.bfloat16,
        device=g.device,
    )
    key, value = _randn(g, n, kv_heads, head_size), _randn(g, n, kv_heads, head_size)
    slots = torch.randperm(pages * tokens_per_block, generator=g, device=g.device)[:n]
    write(key, value, cache, slots)
    flat = (
        cache.view(pages, 2, tokens_per_block, -1)
        .transpose(1, 2)
        .reshape(-1, 2, kv_heads * head_size)
    )
    exact = bool(
        torch.equal(flat[slots, 0].view(torch.int16), key.view(n, -1).view(torch.int16))
        and torch.equal(flat[slots, 1].view(torch.int16), value.view(n, -1).view(torch.int16))
        and int(torch.isnan(flat[:, 0]).all(dim=-1).sum()) == pages * tokens_per_block - n
    )
    ms, _ = time_op(lambda: write(key, value, cache, slots), None)
    view = cache.view(-1, kv_heads, head_size)

    def by_index() -> None:
        at = (slots // tokens_per_block) * 2 * tokens_per_block + slots % tokens_per_block
        view.index_copy_(0, at, key)
        view.index_copy_(0, at + tokens_per_block, value)

    torch_ms, _ = time_op(by_index, None)
    moved = 2 * key.numel() * key.element_size()
    return {"bytes": 2 * moved, "ms": ms, "torch_ms": torch_ms, "exact": exact}


def _fused_add_rms_norm_row(
    provider: TorchBackendProvider[Any, Any], time_op: TimeOp, g: torch.Generator
) -> dict[str, Any]:
    fused = provider.get_kernel("fused_add_rms_norm")
    x, residual = _randn(g, MODEL_TOKENS, MODEL_HIDDEN), _randn(g, MODEL_TOKENS, MODEL_HIDDEN)
    weight = _randn(g, MODEL_HIDDEN)
    head_x, head_residual = x[:256].double(), residual[:256].double()
    fused(x, residual, weight)
    expected_residual = head_x + head_residual
    expected = (
        expected_residual
        * torch.rsqrt(expected_residual.pow(2).mean(-1, keepdim=True) + 1e-6)
        * weight.double()
    )
    error = _relative_error(x[:256], expected)
    ms, _ = time_op(lambda: fused(x, residual, weight), None)

    def straightforward() -> None:
        residual.add_(x)
        wide = residual.float()
        x.copy_(wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.float())

    torch_ms, _ = time_op(straightforward, None)
    return {
        "bytes": 4 * x.numel() * x.element_size(),
        "ms": ms,
        "torch_ms": torch_ms,
        "rel_error": error,
        "exact": error < 1e-2,
    }


def _rotary_row(
    provider: TorchBackendProvider[Any, Any], time_op: TimeOp, g: torch.Generator
) -> dict[str, Any]:
    rotate = provider.get_kernel("rotary_embedding")
    heads, kv_heads, head_size = MODEL_HEADS
    max_position = 8192
    query = _randn(g, MODEL_TOKENS, heads, head_size)
    key = _randn(g, MODEL_TOKENS, kv_heads, head_size)
    positions = torch.randint(0, max_position, (MODEL_TOKENS,), generator=g, device=g.device)
    cache = rotary_cos_sin_cache(max_position, head_size, device=g.device)
    head = query[:64].double()
    rotate(positions, query, key, cache)
    cos, sin = cache.double()[positions[:64]].chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = head.chunk(2, dim=-1)
    expected = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    error = _relative_error(query[:64], expected)
    ms, _ = time_op(lambda: rotate(positions, query, key, cache), None)

    def straightforward() -> None:
        c, s = cache[positions].chunk(2, dim=-1)
        for x in (query, key):
            a, b = x.float().chunk(2, dim=-1)
            cc, ss = c[:, None], s[:, None]
            x.copy_(torch.cat([a * cc - b * ss, b * cc + a * ss], dim=-1))

    torch_ms, _ = time_op(straightforward, None)
    moved = (query.numel() + key.numel()) * query.element_size()
    return {
        "bytes": 2 * moved + positions.numel() * positions.element_size(),
        "ms": ms,
        "torch_ms": torch_ms,
        "rel_error": error,
        "exact": error < 1e-2,
    }


def _silu_and_mul_row(
    provider: TorchBackendProvider[Any, Any], time_op: TimeOp, g: torch.Generator
) -> dict[str, Any]:
    silu = provider.get_kernel("silu_and_mul")
    x = _randn(g, MODEL_TOKENS, 2 * MODEL_HIDDEN)
    out = silu(x)
    gate, up = x[:256].double().chunk(2, dim=-1)
    error = _relative_error(out[:256], gate * torch.sigmoid(gate) * up)
    ms, _ = time_op(lambda: silu(x), None)

    def straightforward() -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    torch_ms, _ = time_op(straightforward, None)
    return {
        "bytes": (x.numel() + out.numel()) * x.element_size(),
        "ms": ms,
        "torch_ms": torch_ms,
        "rel_error": error,
        "exact": error < 1e-2,
    }


def _sort_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward torch version: sort, mask top-k and top-p, multinomial.

    Returns the tokens and the allowed-token mask in vocabulary order."""
    scaled = logits / temperature[:, None]
    ordered, order = torch.sort(scaled, dim=-1, descending=True)
    rank = torch.arange(scaled.shape[1], device=scaled.device)
    k = torch.where(top_k > 0, top_k, scaled.shape[1])
    ordered = ordered.masked_fill(rank[None, :] >= k[:, None], float("-inf"))
    probs = ordered.softmax(dim=-1)
    cut = (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    cut[:, 0] = False
    probs = probs.masked_fill(cut, 0.0)
    choice = torch.multinomial(probs, 1)
    allowed = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, order, probs > 0)
    return order.gather(1, choice).squeeze(1), allowed


def _sample_rows(
    provider: TorchBackendProvider[Any, Any], time_op: TimeOp, g: torch.Generator, roofline: float
) -> list[dict[str, Any]]:
    sample = provider.get_kernel("sample")
    batch, vocab = SAMPLE_BATCH, SAMPLE_VOCAB
    buffers = [_randn(g, batch, vocab, dtype=torch.float32) * 3 for _ in range(SAMPLE_BUFFERS)]
    seeds = torch.randint(-(2**62), 2**62, (batch,), generator=g, device=g.device)
    turn = [0]

    def logits() -> torch.Tensor:
        turn[0] += 1
        return buffers[turn[0] % SAMPLE_BUFFERS]

    def full(value: float, dtype: torch.dtype) -> torch.Tensor:
        return torch.full((batch,), value, dtype=dtype, device=g.device)

    def time_both(args: tuple[torch.Tensor, ...]) -> tuple[float, float]:
        ours, _ = time_op(lambda: sample(logits(), *args, seeds), None)
        sort, _ = time_op(lambda: _sort_sample(logits(), *args), None)
        return ours, sort

    rows = []
    greedy = (full(0.0, torch.float32), full(0, torch.int64), full(1.0, torch.float32))
    exact = bool(torch.equal(sample(buffers[0], *greedy, seeds), buffers[0].argmax(dim=-1)))
    ms, _ = time_op(lambda: sample(logits(), *greedy, seeds), None)
    torch_ms, _ = time_op(lambda: logits().argmax(dim=-1), None)
    read = batch * vocab * 4
    rows.append(
        {
            "case": "greedy",
            "ms": ms,
            "torch_ms": torch_ms,
            "gbps": _gbps(read, ms),
            "of_roofline": _gbps(read, ms) / roofline,
            "vs_torch": torch_ms / ms,
            "exact": exact,
        }
    )
    for case, k, p in (("top_k", 50, 1.0), ("top_p", 0, 0.9), ("top_k_top_p", 50, 0.9)):
        args = (full(0.8, torch.float32), full(k, torch.int64), full(p, torch.float32))
        tokens = sample(buffers[0], *args, seeds)
        again = sample(buffers[0], *args, seeds)
        _, allowed = _sort_sample(buffers[0], *args)
        inside = bool(allowed.gather(1, tokens[:, None]).all())
        ms, torch_ms = time_both(args)
        rows.append(
            {
                "case": case,
                "top_k": k,
                "top_p": p,
                "temperature": 0.8,
                "ms": ms,
                "torch_ms": torch_ms,
                "vs_torch": torch_ms / ms,
                "exact": inside and bool(torch.equal(tokens, again)),
            }
        )
    return rows


def _checks(f: dict[str, Any]) -> list[dict[str, Any]]:
    measured: dict[str, float] = {r["kernel"]: r["of_roofline"] for r in f["kernels"]}
    for r in f["sampling"]:
        key = f"sample_{r['case']}"
        measured[key] = r["of_roofline"] if r["case"] == "greedy" else r["vs_torch"]
    return [
        {"target": name, "goal": goal, "measured": measured[name], "met": measured[name] >= goal}
        for name, goal in MODEL_TARGETS.items()
        if name in measured
    ]


def format_model_kernels(f: dict[str, Any]) -> list[str]:
    """The rows as markdown tables, for the device suite's report."""
    lines = [
        f"model kernels: {f['tokens']} tokens, hidden {f['hidden']}, {f['dtype']} "
        "(KV write: 8 KV heads x 128, 16 tokens per block, scattered slots)",
        "",
        "| kernel | ms | GB/s | of roofline | torch ms | vs torch | checked |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in f["kernels"]:
        lines.append(
            f"| {r['kernel']} | {r['ms']:.4f} | {r['gbps']:.0f} | {r['of_roofline']:.1%} | "
            f"{r['torch_ms']:.4f} | {r['vs_torch']:.2f}x | {'yes' if r['exact'] else 'NO'} |"
        )
    lines += [
        "",
        f"sampling: batch {SAMPLE_BATCH}, vocab {SAMPLE_VOCAB}, fp32 logits; torch: argmax for "
        "greedy, else sort + top-k/top-p masks + multinomial",
        "",
        "| case | ms | of roofline | torch ms | vs torch | checked |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in f["sampling"]:
        share = f"{r['of_roofline']:.1%}" if "of_roofline" in r else "-"
        lines.append(
            f"| {r['case']} | {r['ms']:.4f} | {share} | {r['torch_ms']:.4f} | "
            f"{r['vs_torch']:.2f}x | {'yes' if r['exact'] else 'NO'} |"
        )
    return lines
