"""Thread safety: several threads on one provider end with exact accounting and no deadlock."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import TypeVar

from sagellm_backend.errors import KernelExistsError
from sagellm_backend.testing.check import (
    Area,
    Check,
    CheckContext,
    ConformanceFailure,
    block_nbytes,
    block_pages,
)
from sagellm_backend.testing.checks.common import first_kv_dtype, kv_counts

__all__ = ["CHECKS", "THREADS"]

T = TypeVar("T")

THREADS = 4
ROUNDS = 25
_JOIN_TIMEOUT_S = 60.0


def _run_threads(count: int, work: Callable[[int], None], what: str) -> None:
    """Run ``work(i)`` on ``count`` threads at once; fail on the first error or a hang."""
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def body(i: int) -> None:
        try:
            start.wait(timeout=_JOIN_TIMEOUT_S)
            work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(_JOIN_TIMEOUT_S)
    if any(thread.is_alive() for thread in threads):
        raise ConformanceFailure(f"{what}: threads did not finish within {_JOIN_TIMEOUT_S} s")
    if errors:
        raise ConformanceFailure(
            f"{what}: a thread failed with {type(errors[0]).__name__}: {errors[0]}"
        ) from errors[0]


def _kv_accounting(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    dtype = first_kv_dtype(ctx)
    tpb = p.kv_layout.tokens_per_block
    base = kv_counts(p)
    seeds = [ctx.rng.randrange(2**31) for _ in range(THREADS)]
    can_copy = ctx.capability.has_kv_block_copy

    def work(i: int) -> None:
        rng = random.Random(seeds[i])
        for _ in range(ROUNDS):
            src = p.kv_block_alloc(rng.randint(1, 3 * tpb), dtype)
            dst = p.kv_block_alloc(block_pages(p, src) * tpb, dtype)
            data = rng.randbytes(block_nbytes(p, src))
            p.kv_block_write(src, data)
            if can_copy:
                p.kv_block_copy(src, dst)
            else:
                p.kv_block_write(dst, data)
            p.synchronize()
            if p.kv_block_read(dst) != data:
                raise ConformanceFailure("a block's bytes changed under concurrent use")
            p.kv_blocks_free([src, dst])

    _run_threads(THREADS, work, "concurrent allocate, write, copy and free")
    got = kv_counts(p)
    if got != base:
        raise ConformanceFailure(
            f"after {THREADS} threads freed everything they allocated, (blocks, pages) in use "
            f"is {got}, expected {base}"
        )
    ctx.note(f"{THREADS} threads x {ROUNDS} rounds")


def _kernel_races(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    winners: list[int] = []
    lock = threading.Lock()

    def same_name(i: int) -> None:
        try:
            p.register_kernel("conformance_race", lambda: i)
        except KernelExistsError:
            return
        with lock:
            winners.append(i)

    _run_threads(THREADS * 2, same_name, "concurrent registration of one name")
    if len(winners) != 1:
        raise ConformanceFailure(
            f"{len(winners)} threads registered the same kernel name; exactly one may"
        )
    if p.get_kernel("conformance_race")() != winners[0]:
        raise ConformanceFailure("the registered kernel is not the one whose registration won")

    def distinct_names(i: int) -> None:
        p.register_kernel(f"conformance_thread_{i}", lambda: i)

    _run_threads(THREADS * 2, distinct_names, "concurrent registration of distinct names")
    names = {s.name for s in p.list_kernels()}
    missing = [i for i in range(THREADS * 2) if f"conformance_thread_{i}" not in names]
    if missing:
        raise ConformanceFailure(f"kernels registered concurrently were lost: threads {missing}")


CHECKS = (
    Check(
        "threads.kv_accounting",
        Area.THREADS,
        "threads allocating, copying and freeing on one provider end with exact accounting",
        _kv_accounting,
    ),
    Check(
        "threads.kernel_registry",
        Area.THREADS,
        "concurrent registrations of one name: exactly one wins; of distinct names: none lost",
        _kernel_races,
    ),
)
