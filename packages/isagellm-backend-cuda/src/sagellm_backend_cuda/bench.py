"""KV-cache movement on a GPU against the hardware, as ratios measured in one run.

``sagellm-backend bench cuda --device-suite`` (this module's :func:`device_suite`) builds
a cuda backend with a Llama-3-8B-like cache (32 layers, 8 KV heads, head size 128, 16 tokens per
block, bf16: 2 MiB per block over all layers) in the torch layer's pool layout, draws block
indices as a random permutation of the pool, and for each batch size times:

- the backend's batched copy (one launch) against the roofline, a contiguous device-to-device
  copy of 4 GiB (bytes read plus written), and against the straightforward ways: one ``copy_``
  per block per layer, and one ``index_select`` + ``index_copy_`` per layer;
- the backend's swap out to pinned host memory and swap in, against a contiguous pinned copy of
  the same bytes in the same direction, and against one ``copy_`` per block per layer;
- the host cost of an event pair with elapsed_ms through the provider against raw
  ``torch.cuda.Event``, and pool alloc+free in batches;
- the paged attention kernels (:mod:`sagellm_backend_cuda.bench_attention`): decode against the
  roofline, prefill against SDPA's flash kernel, both against the torch layer's reference;
- the model's other kernels and sampling (:mod:`sagellm_backend_cuda.bench_model`): KV slot
  write, fused add + rms_norm, rotary and silu_and_mul against the roofline and torch; greedy
  sampling against one read of the logits, top-k / top-p against a torch sort.

Device times are CUDA-event medians after a warm-up. Before each timed region the GPU is kept
busy (``torch.cuda._sleep``) for longer than the host needs to issue the operation, so the
events time the device's work, not the host's issue latency; the host's cost per call is
reported beside it. The straightforward loops issue so many operations that the host bounds
them anyway, as it does in an engine.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import torch

from sagellm_backend.device import HOST
from sagellm_backend.errors import InvalidArgumentError
from sagellm_backend.kv import KVBlock
from sagellm_backend.registry import get_backend
from sagellm_backend.torch_backend.provider import TorchBackendProvider
from sagellm_backend_cuda.adapter import PooledEvent, new_cuda_event
from sagellm_backend_cuda.bench_attention import attention_suite, format_attention
from sagellm_backend_cuda.bench_model import format_model_kernels, model_kernels

__all__ = ["LLAMA_3_8B", "KVMovementReport", "device_suite", "format_table", "run"]

LLAMA_3_8B: dict[str, Any] = {
    "num_layers": 32,
    "num_kv_heads": 8,
    "head_size": 128,
    "tokens_per_block": 16,
    "kv_dtype": "bf16",
}
SIZES = tuple(2**i for i in range(13))
ROOFLINE_BYTES = 4 << 30
TARGETS = {
    "copy_1024": 0.85,
    "copy_64": 0.65,
    "swap_out_1024": 0.90,
    "swap_in_1024": 0.90,
    "event_cost_ratio": 1.25,
    "alloc_free_blocks_per_s": 1e6,
}

Provider = TorchBackendProvider[torch.cuda.Stream, PooledEvent]


def _spin(cycles: int) -> None:
    """Keep the GPU busy for ``cycles`` clock cycles on the current stream."""
    torch.cuda._sleep(cycles)  # type: ignore[no-untyped-call]  # unannotated in torch


class Timer:
    """CUDA-event medians of device work, with the GPU kept busy while the host issues it."""

    def __init__(self, repeats: int) -> None:
        self.repeats = repeats
        start, end = new_cuda_event(True), new_cuda_event(True)
        _spin(1000)
        start.record()
        _spin(10_000_000)
        end.record()
        end.synchronize()
        self.cycles_per_ms = 10_000_000 / start.elapsed_time(end)

    def time(self, op: Callable[[], object], repeats: int | None = None) -> tuple[float, float]:
        """(median device ms, median host ms to issue) of ``op`` after one warm-up."""
        op()
        torch.cuda.synchronize()
        begin = time.perf_counter()
        op()
        host_ms = (time.perf_counter() - begin) * 1e3
        torch.cuda.synchronize()
        spin = int(min(host_ms * 1.5 + 0.05, 100.0) * self.cycles_per_ms)
        device, issue = [], []
        start, end = new_cuda_event(True), new_cuda_event(True)
        for _ in range(repeats or self.repeats):
            _spin(spin)
            start.record()
            begin = time.perf_counter()
            op()
            issue.append((time.perf_counter() - begin) * 1e3)
            end.record()
            end.synchronize()
            device.append(start.elapsed_time(end))
        return statistics.median(device), statistics.median(issue)


def _gbps(nbytes: int, ms: float) -> float:
    return nbytes / ms / 1e6


def run(
    spec: str | None = "cuda",
    sizes: Sequence[int] = SIZES,
    *,
    repeats: int = 7,
    seed: int = 0,
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Every figure of the benchmark on the device ``spec`` selects, as a JSON-ready dict."""
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
        raise InvalidArgumentError(
            f"sizes must be positive ints, got {sizes!r}",
            hint="pass a non-empty sequence of block counts of at least 1",
        )
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise InvalidArgumentError(
            f"repeats must be a positive int, got {repeats!r}",
            hint="pass repeats as an int of at least 1",
        )
    most = max(sizes)
    provider = get_backend(
        spec or "cuda",
        **LLAMA_3_8B,
        num_blocks=2 * most,
        host_num_blocks=most,
        validate_collectives=False,
    )
    if not isinstance(provider, TorchBackendProvider) or provider.kind != "cuda":
        provider.close()
        raise InvalidArgumentError(
            f"{spec!r} selects a {provider.kind} backend", hint="name a cuda device: cuda:N"
        )
    try:
        return _run(provider, sizes, repeats, seed, say)
    finally:
        provider.close()


def _run(
    provider: Provider,
    sizes: Sequence[int],
    repeats: int,
    seed: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    timer = Timer(repeats)
    layout = provider.kv_layout
    block_bytes = layout.page_bytes("bf16")
    cache = provider.kv_pool()
    device = provider.torch_device
    say("filling the device pool with random values")
    cache.normal_()

    say("alloc+free")
    alloc = _alloc_free(provider, timer.repeats)
    say("events")
    events = _events(provider, timer.repeats)

    say("roofline: contiguous device-to-device copy of 4 GiB")
    roofline = _roofline(timer, device)

    rng = random.Random(seed)
    blocks = provider.kv_blocks_alloc([layout.tokens_per_block] * (2 * max(sizes)), "bf16")
    rng.shuffle(blocks)
    pinned_dev = torch.empty(max(sizes) * block_bytes, dtype=torch.uint8, device=device).random_()
    pinned_host = torch.empty(pinned_dev.numel(), dtype=torch.uint8, pin_memory=True)
    rows = []
    for n in sizes:
        say(f"{n} blocks")
        rows.append(_size(provider, timer, blocks, n, pinned_dev, pinned_host, roofline))
        torch.cuda.empty_cache()
    del pinned_dev, pinned_host
    attention = attention_suite(timer.time, roofline, device, say)
    figures = {
        "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "layout": LLAMA_3_8B,
        "block_bytes": block_bytes,
        "repeats": timer.repeats,
        "seed": seed,
        "roofline_gbps": roofline,
        "rows": rows,
        "events": events,
        "alloc_free": alloc,
        "attention": attention,
        "model_kernels": model_kernels(provider, timer.time, roofline, seed=seed, say=say),
    }
    figures["checks"] = _verdicts(figures)
    return figures


def _size(
    provider: Provider,
    timer: Timer,
    blocks: list[KVBlock],
    n: int,
    pinned_dev: torch.Tensor,
    pinned_host: torch.Tensor,
    roofline: float,
) -> dict[str, Any]:
    cache, host_cache = provider.kv_pool(), provider.kv_pool(HOST)
    layers = provider.kv_layout.num_layers
    block_bytes = provider.kv_layout.page_bytes("bf16")
    moved = n * block_bytes
    sources, targets = blocks[:n], blocks[n : 2 * n]
    pairs = list(zip(sources, targets, strict=True))
    src_pages = [provider.kv_block_info(b).pages[0] for b in sources]
    dst_pages = [provider.kv_block_info(b).pages[0] for b in targets]
    src_index = torch.tensor(src_pages, device=cache.device)
    dst_index = torch.tensor(dst_pages, device=cache.device)

    # Correctness on this data: poison the targets, copy, compare every byte.
    cache[:, dst_index] = float("nan")
    provider.kv_blocks_copy(pairs).synchronize()
    exact = bool(
        torch.equal(cache[:, dst_index].view(torch.int16), cache[:, src_index].view(torch.int16))
    )

    ours, ours_host = timer.time(lambda: provider.kv_blocks_copy(pairs))

    def per_layer() -> None:
        for layer in range(layers):
            pages = cache[layer]
            pages.index_copy_(0, dst_index, pages.index_select(0, src_index))

    def per_block() -> None:
        for s, d in zip(src_pages, dst_pages, strict=True):
            for layer in range(layers):
                cache[layer, d].copy_(cache[layer, s])

    index_ms, _ = timer.time(per_layer)
    loop_ms, _ = timer.time(per_block, 3 if n > 256 else None)

    # Swaps: the same scattered blocks out to pinned host memory and back in.
    swapped = list(sources)
    out_ms, in_ms, out_host = [], [], []
    start, end = new_cuda_event(True), new_cuda_event(True)
    spin = int((0.5 + 0.01 * n) * timer.cycles_per_ms)  # 0.5 ms + 10 us per block to issue
    for attempt in range(timer.repeats + 1):
        _spin(spin)
        start.record()
        begin = time.perf_counter()
        out, _ = provider.kv_blocks_migrate(swapped, HOST)
        issued = (time.perf_counter() - begin) * 1e3
        end.record()
        end.synchronize()
        t_out = start.elapsed_time(end)
        _spin(spin)
        start.record()
        swapped, _ = provider.kv_blocks_migrate(out, provider.device)
        end.record()
        end.synchronize()
        if attempt:
            out_ms.append(t_out)
            in_ms.append(start.elapsed_time(end))
            out_host.append(issued)
    blocks[:n] = swapped
    back_pages = [provider.kv_block_info(b).pages[0] for b in swapped]
    swap_exact = bool(
        torch.equal(
            cache[:, torch.tensor(back_pages, device=cache.device)].view(torch.int16),
            cache[:, dst_index].view(torch.int16),
        )
    )

    host_pages = list(range(n))

    def swap_loop() -> None:
        for s, h in zip(src_pages, host_pages, strict=True):
            for layer in range(layers):
                host_cache[layer, h].copy_(cache[layer, s], non_blocking=True)

    swap_loop_ms, _ = timer.time(swap_loop, 3 if n > 256 else None)
    d2h_ms, _ = timer.time(lambda: pinned_host[:moved].copy_(pinned_dev[:moved], non_blocking=True))
    h2d_ms, _ = timer.time(lambda: pinned_dev[:moved].copy_(pinned_host[:moved], non_blocking=True))
    copy_bw = _gbps(2 * moved, ours)
    swap_out_bw, swap_in_bw = (
        _gbps(moved, statistics.median(out_ms)),
        _gbps(moved, statistics.median(in_ms)),
    )
    return {
        "blocks": n,
        "bytes": moved,
        "copy_exact": exact,
        "swap_exact": swap_exact,
        "copy_gbps": copy_bw,
        "copy_host_issue_ms": ours_host,
        "copy_of_roofline": copy_bw / roofline,
        "index_per_layer_gbps": _gbps(2 * moved, index_ms),
        "per_block_loop_gbps": _gbps(2 * moved, loop_ms),
        "copy_vs_index_per_layer": index_ms / ours,
        "copy_vs_per_block_loop": loop_ms / ours,
        "swap_out_gbps": swap_out_bw,
        "swap_in_gbps": swap_in_bw,
        "swap_out_host_issue_ms": statistics.median(out_host),
        "pinned_d2h_gbps": _gbps(moved, d2h_ms),
        "pinned_h2d_gbps": _gbps(moved, h2d_ms),
        "swap_out_of_pinned": swap_out_bw / _gbps(moved, d2h_ms),
        "swap_in_of_pinned": swap_in_bw / _gbps(moved, h2d_ms),
        "swap_per_block_loop_gbps": _gbps(moved, swap_loop_ms),
    }


def _roofline(timer: Timer, device: torch.device) -> float:
    """GB/s of a contiguous device-to-device copy of 4 GiB, bytes read plus written."""
    src = torch.empty(ROOFLINE_BYTES, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms, _ = timer.time(lambda: dst.copy_(src), max(timer.repeats, 10))
    return _gbps(2 * ROOFLINE_BYTES, ms)


def _events(provider: Provider, repeats: int, pairs: int = 2000) -> dict[str, float]:
    """Host microseconds per (two events, two records, synchronize, elapsed_ms)."""

    def ours() -> None:
        for _ in range(pairs):
            start, end = provider.create_event(), provider.create_event()
            start.record()
            end.record()
            end.synchronize()
            end.elapsed_ms(start)

    def raw() -> None:
        for _ in range(pairs):
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]  # unannotated in torch
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]  # unannotated in torch
            start.record()
            end.record()
            end.synchronize()
            start.elapsed_time(end)

    ours_us: list[float] = []
    raw_us: list[float] = []
    ours()
    raw()
    for _ in range(repeats):
        for fn, into in ((ours, ours_us), (raw, raw_us)):
            begin = time.perf_counter()
            fn()
            into.append((time.perf_counter() - begin) / pairs * 1e6)
    o, r = statistics.median(ours_us), statistics.median(raw_us)
    return {"provider_us": o, "raw_torch_us": r, "ratio": o / r}


def _alloc_free(provider: Provider, repeats: int, batch: int = 1024) -> dict[str, float]:
    """Blocks per second through kv_blocks_alloc + kv_blocks_free in batches of ``batch``.

    Measured twice: with the heap of start-up (torch's modules, the pool) moved out of the
    collector's reach by ``gc.freeze()``, as serving engines do once they have started, and
    without, where full collections scan every object torch created.
    """
    tokens = [provider.kv_layout.tokens_per_block] * batch
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    provider.kv_blocks_free(provider.kv_blocks_alloc(tokens, "bf16"))

    def rate() -> float:
        seconds = []
        for _ in range(repeats * 5):
            begin = time.perf_counter()
            provider.kv_blocks_free(provider.kv_blocks_alloc(tokens, "bf16"))
            seconds.append(time.perf_counter() - begin)
        return batch / statistics.median(seconds)

    unfrozen = rate()
    gc.collect()
    gc.freeze()
    try:
        frozen = rate()
    finally:
        gc.unfreeze()
    return {
        "batch": batch,
        "blocks_per_s": frozen,
        "blocks_per_s_without_gc_freeze": unfrozen,
        "device_bytes_allocated": torch.cuda.memory_allocated() - before,
    }


def _verdicts(f: dict[str, Any]) -> list[dict[str, Any]]:
    by_n = {r["blocks"]: r for r in f["rows"]}
    measured = {
        "copy_1024": by_n.get(1024, {}).get("copy_of_roofline"),
        "copy_64": by_n.get(64, {}).get("copy_of_roofline"),
        "swap_out_1024": by_n.get(1024, {}).get("swap_out_of_pinned"),
        "swap_in_1024": by_n.get(1024, {}).get("swap_in_of_pinned"),
        "event_cost_ratio": f["events"]["ratio"],
        "alloc_free_blocks_per_s": f["alloc_free"]["blocks_per_s"],
    }
    out = []
    for name, target in TARGETS.items():
        value = measured[name]
        if value is None:
            continue
        met = value <= target if name == "event_cost_ratio" else value >= target
        out.append({"target": name, "goal": target, "measured": value, "met": met})
    attention: list[dict[str, Any]] = f["attention"]["checks"]
    model: list[dict[str, Any]] = f["model_kernels"]["checks"]
    return out + attention + model


def format_table(f: dict[str, Any]) -> str:
    lines = [
        f"{f['gpu']}, torch {f['torch']} (CUDA {f['cuda']}), {f['date']}; Llama-3-8B-like "
        f"cache, {f['block_bytes'] >> 20} MiB per block; median of {f['repeats']}",
        f"roofline (contiguous D2D copy of 4 GiB, read+write): {f['roofline_gbps']:.0f} GB/s",
        "",
        "| blocks | copy GB/s | of roofline | index/layer GB/s | per-block GB/s | "
        "swap out GB/s | of pinned | swap in GB/s | of pinned | exact |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in f["rows"]:
        lines.append(
            f"| {r['blocks']} | {r['copy_gbps']:.0f} | {r['copy_of_roofline']:.1%} | "
            f"{r['index_per_layer_gbps']:.0f} | {r['per_block_loop_gbps']:.1f} | "
            f"{r['swap_out_gbps']:.1f} | {r['swap_out_of_pinned']:.1%} | "
            f"{r['swap_in_gbps']:.1f} | {r['swap_in_of_pinned']:.1%} | "
            f"{'yes' if r['copy_exact'] and r['swap_exact'] else 'NO'} |"
        )
    e, a = f["events"], f["alloc_free"]
    lines += [
        "",
        f"event pair + elapsed_ms, host cost: provider {e['provider_us']:.2f} us, raw torch "
        f"{e['raw_torch_us']:.2f} us, ratio {e['ratio']:.2f}",
        f"alloc+free in batches of {a['batch']}: {a['blocks_per_s'] / 1e6:.2f} M blocks/s "
        f"after gc.freeze(), {a['blocks_per_s_without_gc_freeze'] / 1e6:.2f} M without, "
        f"{a['device_bytes_allocated']} device bytes allocated",
        "",
        *format_attention(f["attention"]),
        "",
        *format_model_kernels(f["model_kernels"]),
        "",
        "| target | goal | measured | met |",
        "|---|---:|---:|---|",
    ]
    for c in f["checks"]:
        lines.append(
            f"| {c['target']} | {c['goal']:g} | {c['measured']:.3g} | "
            f"{'yes' if c['met'] else 'NO'} |"
        )
    return "\n".join(lines)


class KVMovementReport:
    """The figures of one run, as the ``sagellm-backend bench`` command prints them."""

    def __init__(self, figures: dict[str, Any]) -> None:
        self.figures = figures

    def to_dict(self) -> dict[str, Any]:
        return self.figures

    def format_table(self) -> str:
        return format_table(self.figures)


def device_suite(
    spec: str | None,
    *,
    repeats: int = 7,
    seed: int = 0,
    quick: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> KVMovementReport:
    """The ``sagellm.bench`` entry point: every size from 1 to 4096 blocks (quick: 1, 64, 1024)."""
    sizes = (1, 64, 1024) if quick else SIZES
    return KVMovementReport(run(spec, sizes, repeats=repeats, seed=seed, say=progress))
