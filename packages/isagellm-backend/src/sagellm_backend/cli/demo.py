"""``sagellm-backend demo [SPEC]``: a short workload that checks its own results.

Each step is independent (it allocates what it uses and frees it), so one failure does not hide
the others. Steps a backend's capability matrix does not claim are skipped with the reason.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sagellm_backend.cli import EXIT_BACKEND_FAILURE, EXIT_OK
from sagellm_backend.device import HOST
from sagellm_backend.dtypes import DType
from sagellm_backend.errors import BackendError, BlockNotFoundError
from sagellm_backend.kv import KVBlock
from sagellm_backend.protocols import BackendProvider
from sagellm_backend.registry import get_backend

__all__ = ["STEPS", "StepResult", "add_arguments", "run", "run_steps"]

Provider = BackendProvider[Any]
MOCK_WORLD_SIZE = 4
COLLECTIVE_TIMEOUT_S = 30.0


class Skip(Exception):
    """A step does not apply to this backend; the message says why."""


@dataclass(frozen=True)
class StepResult:
    name: str
    status: str
    """"ok", "FAIL" or "skip"."""
    millis: float
    detail: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "spec", nargs="?", help="config string (default: $SAGELLM_BACKEND, else 'mock')"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the data written")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    provider = get_backend(args.spec)
    created_ms = (time.perf_counter() - started) * 1e3
    print(f"demo on backend {provider.kind!r}, device {provider.device}")
    print(_line(StepResult("create", "ok", created_ms, f"get_backend({args.spec!r})")))
    try:
        results = run_steps(provider, random.Random(args.seed))
    finally:
        provider.close()
    failed = sum(r.status == "FAIL" for r in results)
    skipped = sum(r.status == "skip" for r in results)
    print(
        f"{len(results) + 1} steps: {len(results) + 1 - failed - skipped} ok, "
        f"{failed} failed, {skipped} skipped"
    )
    return EXIT_BACKEND_FAILURE if failed else EXIT_OK


def run_steps(provider: Provider, rng: random.Random) -> list[StepResult]:
    """Run every step on ``provider``, printing each result as it completes."""
    results = []
    for name, step in STEPS:
        started = time.perf_counter()
        try:
            status, detail = "ok", step(provider, rng)
        except Skip as exc:
            status, detail = "skip", str(exc)
        except (AssertionError, BackendError) as exc:
            status, detail = "FAIL", f"{type(exc).__name__}: {exc}"
        result = StepResult(name, status, (time.perf_counter() - started) * 1e3, detail)
        print(_line(result))
        results.append(result)
    return results


def _line(result: StepResult) -> str:
    return f"  {result.status:<4} {result.millis:9.3f} ms  {result.name:<11} {result.detail}"


# Steps: each returns what it did, raises Skip, or raises AssertionError on a wrong result.


def _capability(provider: Provider, rng: random.Random) -> str:
    cap = provider.capability()
    dtypes = ", ".join(d.value for d in cap.supported_dtypes)
    return (
        f"{cap.device_type}: dtypes {dtypes}; collectives {'yes' if cap.has_collective else 'no'}"
    )


def _allocate_fill(provider: Provider, rng: random.Random) -> str:
    dtype = _dtype(provider)
    tokens = [1, 40, 3 * provider.kv_layout.tokens_per_block]
    blocks = provider.kv_blocks_alloc(tokens, dtype)
    try:
        written = 0
        for block in blocks:
            data = _pattern(provider, block, rng)
            provider.kv_block_write(block, data)
            assert provider.kv_block_read(block) == data, f"block {block:#x} reads back wrong"
            written += len(data)
    finally:
        provider.kv_blocks_free(blocks)
    pages = sum(provider.kv_layout.pages_for(t) for t in tokens)
    return f"{len(blocks)} blocks ({pages} pages, {dtype.value}), {written} bytes verified"


def _copy(provider: Provider, rng: random.Random) -> str:
    _require(provider, "has_kv_block_copy")
    dtype = _dtype(provider)
    blocks = provider.kv_blocks_alloc([40] * 6, dtype)
    try:
        src, dst = blocks[0], blocks[1]
        data = _pattern(provider, src, rng)
        provider.kv_block_write(src, data)
        provider.kv_block_copy(src, dst)
        assert provider.kv_block_read(dst) == data, "kv_block_copy: destination differs"
        pairs = [(blocks[2], blocks[3]), (blocks[4], blocks[5])]
        expected = []
        for s, _ in pairs:
            expected.append(_pattern(provider, s, rng))
            provider.kv_block_write(s, expected[-1])
        provider.kv_blocks_copy(pairs).synchronize()
        for (_, d), want in zip(pairs, expected, strict=True):
            assert provider.kv_block_read(d) == want, "kv_blocks_copy: destination differs"
    finally:
        provider.kv_blocks_free(blocks)
    return "1 block copied, then 2 in one batched copy; bytes verified"


def _migrate(provider: Provider, rng: random.Random) -> str:
    _require(provider, "has_kv_block_migrate")
    block = provider.kv_block_alloc(40, _dtype(provider))
    data = _pattern(provider, block, rng)
    provider.kv_block_write(block, data)
    live = block
    try:
        on_host = provider.kv_block_migrate(block, HOST)
        live = on_host
        assert provider.kv_block_read(on_host) == data, "bytes differ after migrating to host"
        _assert_released(provider, block)
        back = provider.kv_block_migrate(on_host, provider.device)
        live = back
        assert provider.kv_block_read(back) == data, f"bytes differ back on {provider.device}"
        _assert_released(provider, on_host)
    finally:
        provider.kv_block_free(live)
    return f"{provider.device} -> {HOST} -> {provider.device}; bytes verified, sources released"


def _free(provider: Provider, rng: random.Random) -> str:
    before = provider.memory_stats()
    blocks = provider.kv_blocks_alloc([16, 64], _dtype(provider))
    during = provider.memory_stats()
    provider.kv_blocks_free(blocks)
    after = provider.memory_stats()
    assert during.kv_blocks_in_use == before.kv_blocks_in_use + 2, "allocation not counted"
    assert after.kv_blocks_in_use == before.kv_blocks_in_use, "blocks still counted after free"
    assert after.kv_pages_in_use == before.kv_pages_in_use, "pages still counted after free"
    _assert_released(provider, blocks[0])
    return f"{during.kv_pages_in_use - before.kv_pages_in_use} pages returned; stale handle refused"


def _streams(provider: Provider, rng: random.Random) -> str:
    _require(provider, "has_stream")
    _require(provider, "has_event")
    block = provider.kv_block_alloc(40, _dtype(provider))
    try:
        side = provider.create_stream()
        start, end = provider.create_event(True), provider.create_event(True)
        writes = 8
        with side:
            start.record()
            for _ in range(writes):
                data = _pattern(provider, block, rng)
                provider.kv_block_write(block, data)
            end.record()
        provider.current_stream().wait_event(end)
        assert provider.kv_block_read(block) == data, "read after wait_event shows stale data"
        end.synchronize()
        elapsed = end.elapsed_ms(start)
        assert elapsed >= 0, f"elapsed_ms is negative: {elapsed}"
    finally:
        provider.kv_block_free(block)
    return f"{writes} writes on a side stream, waited by event; {elapsed:.3f} ms between events"


def _collective(provider: Provider, rng: random.Random) -> str:
    if not provider.capability().has_collective:
        raise Skip("capability has_collective is off")
    if provider.kind == "mock":
        return _mock_world_collective()
    provider.barrier(timeout=COLLECTIVE_TIMEOUT_S)
    return f"barrier over the provider's own world of {provider.world_size} rank(s)"


def _mock_world_collective() -> str:
    from sagellm_backend.mock import MockTensor, create_mock_world

    world = create_mock_world(MOCK_WORLD_SIZE)
    results: dict[int, list[float]] = {}
    errors: list[BaseException] = []

    def rank_main(member: BackendProvider[MockTensor]) -> None:
        try:
            values = [float(member.rank + 1)] * 4
            tensor = MockTensor(values, _dtype(member))
            reduced = member.all_reduce(tensor, timeout=COLLECTIVE_TIMEOUT_S)
            results[member.rank] = reduced.tolist()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(m,)) for m in world]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for member in world:
            member.close()
    if errors:
        raise errors[0]
    expected = [float(sum(range(1, MOCK_WORLD_SIZE + 1)))] * 4
    for rank, got in sorted(results.items()):
        assert got == expected, f"rank {rank}: all_reduce gave {got}, expected {expected}"
    assert len(results) == MOCK_WORLD_SIZE, f"only ranks {sorted(results)} finished"
    return f"all_reduce(sum) over a simulated world of {MOCK_WORLD_SIZE} ranks (threads); verified"


def _kernel(provider: Provider, rng: random.Random) -> str:
    def axpy(a: float, x: list[float], y: list[float]) -> list[float]:
        return [a * xi + yi for xi, yi in zip(x, y, strict=True)]

    def make_inputs(seed: int, dtype: DType) -> tuple[tuple[Any, ...], dict[str, Any]]:
        gen = random.Random(seed)
        n = 16
        return (2.0, [float(gen.randint(-8, 8)) for _ in range(n)], [1.0] * n), {}

    name = "demo_axpy"
    provider.register_kernel(name, axpy, reference=axpy, make_inputs=make_inputs, override=True)
    kernel = provider.get_kernel(name)
    assert kernel(3.0, [1.0, 2.0], [0.5, 0.5]) == [3.5, 6.5], "kernel returned a wrong result"
    provider.kernel_spec(name).check(rng.randrange(2**31), DType.FP32)
    assert name in {s.name for s in provider.list_kernels()}, "kernel missing from list_kernels"
    return f"registered {name!r}, called it, and checked it against its reference"


STEPS: tuple[tuple[str, Callable[[Provider, random.Random], str]], ...] = (
    ("capability", _capability),
    ("allocate", _allocate_fill),
    ("copy", _copy),
    ("migrate", _migrate),
    ("free", _free),
    ("streams", _streams),
    ("collective", _collective),
    ("kernel", _kernel),
)


# Helpers.


def _dtype(provider: Provider) -> DType:
    """The KV pool's dtype where it has one, else fp16 if supported, else the first supported."""
    if provider.kv_layout.dtype is not None:
        return provider.kv_layout.dtype
    supported = provider.capability().supported_dtypes
    return DType.FP16 if DType.FP16 in supported else supported[0]


def _pattern(provider: Provider, block: KVBlock, rng: random.Random) -> bytes:
    info = provider.kv_block_info(block)
    return rng.randbytes(info.num_pages * provider.kv_layout.page_bytes(info.dtype))


def _require(provider: Provider, flag: str) -> None:
    if not getattr(provider.capability(), flag):
        raise Skip(f"capability {flag} is off")


def _assert_released(provider: Provider, block: KVBlock) -> None:
    try:
        provider.kv_block_read(block)
    except BlockNotFoundError:
        return
    raise AssertionError(f"block {block:#x} is still readable after it was released")
