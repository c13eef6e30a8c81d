"""Concurrency on the mock: many threads on one provider end with exact accounting and no
deadlock; concurrent collectives on simulated worlds finish or time out, never hang."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable

from sagellm_backend import (
    HOST,
    BlockNotFoundError,
    CommGroupBrokenError,
    CommTimeoutError,
    DType,
    MockBackendProvider,
    MockTensor,
    ResourceExhaustedError,
    create_mock_world,
)

JOIN_TIMEOUT_S = 60.0


def _run_all(bodies: list[Callable[[], None]]) -> list[BaseException]:
    """Run every body on its own thread, started together; fail if any is still running."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(bodies))

    def main(body: Callable[[], None]) -> None:
        try:
            start.wait(JOIN_TIMEOUT_S)
            body()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=main, args=(b,), daemon=True) for b in bodies]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    hung = [t.name for t in threads if t.is_alive()]
    assert not hung, f"threads still running after {JOIN_TIMEOUT_S} s (deadlock?): {hung}"
    return errors


def test_threads_allocating_copying_migrating_and_freeing_end_with_exact_accounting(
    reliability_counts: Counter[str],
) -> None:
    provider = MockBackendProvider(max_memory_mb=8, supported_dtypes=["fp16", "fp32"])
    threads, rounds = 8, 40
    ops = Counter[str]()
    lock = threading.Lock()

    def worker(seed: int) -> Callable[[], None]:
        def body() -> None:
            rng = random.Random(seed)
            stream = provider.create_stream()
            done = Counter[str]()
            for _ in range(rounds):
                dtype = rng.choice(["fp16", "fp32"])
                tokens = rng.randint(1, 64)
                try:
                    src, dst = provider.kv_blocks_alloc([tokens, tokens], dtype)
                except ResourceExhaustedError:
                    done["exhausted"] += 1
                    continue
                try:
                    one = provider.kv_block_alloc(rng.randint(1, 16), dtype)  # one page
                except ResourceExhaustedError:
                    provider.kv_blocks_free([src, dst])
                    done["exhausted"] += 1
                    continue
                infos = [provider.kv_block_info(b) for b in (src, dst, one)]
                assert [(i.block, i.device, i.dtype) for i in infos] == [
                    (b, provider.device, DType(dtype)) for b in (src, dst, one)
                ], "each block where and of the dtype it was allocated"
                size = len(provider.kv_block_read(src))
                assert size == infos[0].num_pages * provider.kv_layout.page_bytes(dtype)
                data = rng.randbytes(size)
                with stream:
                    provider.kv_block_write(src, data)
                    provider.kv_block_copy(src, dst)
                    assert provider.kv_block_read(dst) == data
                moved = provider.kv_block_migrate(dst, HOST)
                provider.synchronize()
                assert provider.kv_block_read(moved) == data
                assert provider.kv_block_info(moved).device == HOST
                try:
                    assert provider.kv_block_grow(src, tokens + 64) == src, "grown in place"
                except ResourceExhaustedError:
                    done["growth exhausted"] += 1
                else:
                    grown = provider.kv_block_info(src)
                    assert grown.pages[: infos[0].num_pages] == infos[0].pages
                    assert provider.kv_block_read(src)[:size] == data, "bytes kept"
                provider.kv_blocks_free([src, moved, one])
                try:
                    provider.kv_block_free(src)
                except BlockNotFoundError:
                    done["double frees refused"] += 1
                done["rounds"] += 1
            with lock:
                ops.update(done)

        return body

    errors = _run_all([worker(seed) for seed in range(threads)])
    assert not errors, errors[0]
    stats = provider.memory_stats()
    assert (stats.kv_blocks_in_use, stats.kv_pages_in_use, stats.used_bytes) == (0, 0, 0)
    assert provider.live_blocks() == []
    assert ops["rounds"] + ops["exhausted"] == threads * rounds
    assert ops["double frees refused"] == ops["rounds"]
    reliability_counts["threads on one provider"] += threads
    reliability_counts["thread rounds (alloc, write, copy, migrate, free)"] += ops["rounds"]
    provider.close()


def test_concurrent_collectives_on_several_worlds_finish(reliability_counts: Counter[str]) -> None:
    worlds, ranks, calls = 4, 4, 25
    bodies: list[Callable[[], None]] = []
    for _ in range(worlds):
        for provider in create_mock_world(ranks):

            def body(p: MockBackendProvider = provider) -> None:
                for i in range(calls):
                    out = p.all_reduce(MockTensor([p.rank + i], "fp16"), timeout=10.0)
                    assert out.tolist() == [sum(range(ranks)) + ranks * i]
                p.barrier(timeout=10.0)

            bodies.append(body)
    errors = _run_all(bodies)
    assert not errors, errors[0]
    reliability_counts["collective threads (ranks)"] += worlds * ranks
    reliability_counts["collectives completed"] += worlds * ranks * (calls + 1)


def test_collectives_with_a_rank_that_leaves_time_out_and_never_hang(
    reliability_counts: Counter[str],
) -> None:
    worlds, ranks, timeout = 3, 4, 0.3
    outcomes = Counter[str]()
    lock = threading.Lock()
    bodies: list[Callable[[], None]] = []
    for w in range(worlds):
        leaves_after = w + 1
        for provider in create_mock_world(ranks):

            def body(p: MockBackendProvider = provider, stop: int = leaves_after) -> None:
                calls = stop if p.rank == ranks - 1 else stop + 3
                for _ in range(calls):
                    start = time.monotonic()
                    try:
                        p.all_reduce(MockTensor([1.0], "fp16"), timeout=timeout)
                    except CommTimeoutError:
                        result = "timed out"
                    except CommGroupBrokenError:
                        result = "group broken"
                    else:
                        result = "completed"
                    assert time.monotonic() - start < timeout + 2.0
                    with lock:
                        outcomes[result] += 1

            bodies.append(body)
    errors = _run_all(bodies)
    assert not errors, errors[0]
    assert outcomes["timed out"] >= worlds
    assert outcomes["completed"] == sum(ranks * (w + 1) for w in range(worlds))
    assert outcomes["timed out"] + outcomes["group broken"] == worlds * (ranks - 1) * 3
    reliability_counts["faults injected (ranks leaving a world)"] += worlds
    reliability_counts["collectives timed out or refused on a broken group"] += (
        outcomes["timed out"] + outcomes["group broken"]
    )
