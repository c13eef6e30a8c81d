"""Host cost of the KV bookkeeping and of issuing KV movement, against plain baselines.

An engine issues a step's KV operations from Python while the device runs the previous step, so
a few tenths of a microsecond per block matter. Each case compares the backend's call with the
plainest code that does the same work, timed in the same rounds:

- ``alloc+free, batch 1``: ``kv_block_alloc`` + ``kv_block_free`` of a one-page block, against a
  Python list used as a free list, ``free.append(free.pop())``: the floor of any free list in
  Python, so the ratio is the price of the checks, the lock and the handle;
- ``alloc+free, batch n``: ``kv_blocks_alloc`` + ``kv_blocks_free`` of ``n`` one-page blocks,
  against ``t = free[-n:]; del free[-n:]; free.extend(t)``;
- the same two against another backend's calls (``against``, such as the mock against cpu);
- ``kv_blocks_copy`` of ``n`` one-page blocks, against the device's plain indexed copy of the same
  pages (on torch: ``pool.index_copy_(1, dst, pool.index_select(1, src))`` over the pool laid out
  ``[layers, pages, 2, tokens, kv_heads, head_size]``, index tensors made once), so the excess
  per block is what validation, bookkeeping and building the indices cost;
- ``kv_blocks_migrate`` of ``n`` blocks to host and back, against the same indexed copies between
  the device pool and the host pool; per block and migration (each run is two of them).

Every row is a median over interleaved rounds: each round times every contender in turn (each
``timeit`` run long enough to dwarf the clock), so the load of a shared machine falls on both
sides alike. Device work is waited for after each timed run, off the clock: a row is the time
the calls take the host (the engine's thread), not the time the device takes to do the work.
"""

from __future__ import annotations

import random
import statistics
import timeit
from collections.abc import Callable
from typing import Any

from sagellm_backend.bench.baselines import Baselines
from sagellm_backend.device import HOST
from sagellm_backend.errors import InvalidArgumentError, ResourceExhaustedError
from sagellm_backend.protocols import BackendProvider

__all__ = ["TARGET_SECONDS", "Measured", "host_cost_cases", "interleaved"]

TARGET_SECONDS = 0.002
"""How long one timed run of a contender lasts, roughly."""

Measured = tuple[str, str, str, float, float, str]
"""(case, ours, baseline, ours seconds per block, baseline seconds per block, what it shows)."""


Contender = tuple[str | Callable[[], object], dict[str, Any], int]
"""A statement (or a callable), the names it uses, and the items one run of it covers."""


def interleaved(
    contenders: dict[str, Contender], rounds: int, sync: Callable[[], None]
) -> dict[str, float]:
    """Median seconds per item of each contender over ``rounds`` rounds that time every
    contender in turn, each ``timeit`` run about :data:`TARGET_SECONDS` long."""
    timers = {}
    for name, (statement, names, _) in contenders.items():
        timer = timeit.Timer(statement, globals=names)
        once = max(timer.timeit(1), 1e-7)
        sync()
        timers[name] = (timer, max(1, int(TARGET_SECONDS / once)))
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, (timer, number) in timers.items():
            elapsed = timer.timeit(number)
            sync()
            samples[name].append(elapsed / (number * contenders[name][2]))
    return {name: statistics.median(values) for name, values in samples.items()}


def host_cost_cases(
    provider: BackendProvider[Any],
    baselines: Baselines | None,
    *,
    batch: int,
    rounds: int,
    seed: int,
    against: BackendProvider[Any] | None = None,
) -> tuple[list[Measured], list[str]]:
    """The rows of every host-cost case, and the reasons of those skipped; every block the
    cases allocate is freed before it returns."""
    rows: list[Measured] = []
    skipped: list[str] = []
    rows += _alloc_free(provider, batch, rounds, against)
    if baselines is None:
        skipped.append(f"kv copy and migrate host cost: no baselines for {provider.kind}")
        return rows, skipped
    dtype = provider.capability().kv_dtypes[0]
    tokens = provider.kv_layout.tokens_per_block
    try:
        blocks = provider.kv_blocks_alloc([tokens] * (2 * batch), dtype)
    except ResourceExhaustedError as exc:
        raise InvalidArgumentError(
            f"the host-cost cases need {2 * batch} free KV pages on {provider.device}",
            hint="pass a smaller --host-batch, or a larger pool in the spec (num_blocks=...)",
        ) from exc
    try:
        chosen = random.Random(seed).sample(blocks, 2 * batch)
        srcs, dsts = chosen[:batch], chosen[batch:]
        pairs = list(zip(srcs, dsts, strict=True))
        plain_copy = baselines.paged_copy(
            _first_pages(provider, srcs), _first_pages(provider, dsts)
        )
        times = interleaved(
            {
                "ours": ("copy(pairs)", {"copy": provider.kv_blocks_copy, "pairs": pairs}, batch),
                "plain": (plain_copy, {}, batch),
            },
            rounds,
            provider.synchronize,
        )
        rows.append(
            (
                f"kv_blocks_copy, {batch} blocks",
                "kv_blocks_copy",
                "plain indexed copy of the same pages",
                times["ours"],
                times["plain"],
                "the host cost per block of validating the pairs and issuing the copy",
            )
        )
        if provider.capability().has_kv_block_migrate:
            rows.append(_migrate(provider, baselines, srcs, rounds))
        else:
            skipped.append("kv migrate host cost: the backend does not migrate")
    finally:
        provider.kv_blocks_free(dsts + srcs)  # the migrations leave srcs holding live handles
    return rows, skipped


def _alloc_free(
    provider: BackendProvider[Any],
    batch: int,
    rounds: int,
    against: BackendProvider[Any] | None,
) -> list[Measured]:
    dtype = provider.capability().kv_dtypes[0]
    tokens = provider.kv_layout.tokens_per_block
    counts = [tokens] * batch
    free_list = list(range(max(batch, 1024)))
    plain = {"free": free_list, "n": batch}
    single: dict[str, Contender] = {
        "ours": ("free(alloc(t, d))", _calls(provider, tokens, dtype, single=True), 1),
        "list": ("free.append(free.pop())", plain, 1),
    }
    batched: dict[str, Contender] = {
        "ours": ("free(alloc(t, d))", _calls(provider, counts, dtype, single=False), batch),
        "list": ("t = free[-n:]; del free[-n:]; free.extend(t)", plain, batch),
    }
    if against is not None:
        theirs = against.capability().kv_dtypes[0]
        their_tokens = against.kv_layout.tokens_per_block
        single["other"] = (
            "free(alloc(t, d))",
            _calls(against, their_tokens, theirs, single=True),
            1,
        )
        batched["other"] = (
            "free(alloc(t, d))",
            _calls(against, [their_tokens] * batch, theirs, single=False),
            batch,
        )
    rows = []
    for label, contenders, call, statement, path in (
        (
            "batch 1",
            single,
            "kv_block_alloc + kv_block_free",
            "free.append(free.pop())",
            "the single-block path",
        ),
        (
            f"batch {batch}",
            batched,
            "kv_blocks_alloc + kv_blocks_free",
            "t = free[-n:]; del free[-n:]; free.extend(t)",
            "the batch path",
        ),
    ):
        times = interleaved(contenders, rounds, lambda: None)
        rows.append(
            (
                f"alloc+free per block, {label}",
                call,
                f"list as a free list: {statement}",
                times["ours"],
                times["list"],
                f"the price of the checks, the lock and the handle over the plainest free "
                f"list, on {path}",
            )
        )
        if against is not None:
            rows.append(
                (
                    f"alloc+free per block, {label}",
                    f"{provider.kind}: {call}",
                    f"{against.kind}: the same calls",
                    times["ours"],
                    times["other"],
                    f"the {provider.kind} backend's bookkeeping against the {against.kind} "
                    f"one's, on {path}",
                )
            )
    return rows


def _calls(
    provider: BackendProvider[Any], tokens: object, dtype: object, *, single: bool
) -> dict[str, Any]:
    """The names of an alloc + free statement: the bound calls and their arguments."""
    if single:
        return {"alloc": provider.kv_block_alloc, "free": provider.kv_block_free} | {
            "t": tokens,
            "d": dtype,
        }
    return {"alloc": provider.kv_blocks_alloc, "free": provider.kv_blocks_free} | {
        "t": tokens,
        "d": dtype,
    }


def _migrate(
    provider: BackendProvider[Any],
    baselines: Baselines,
    blocks: list[Any],
    rounds: int,
) -> Measured:
    """Swap ``blocks`` out to host and back in; ``blocks`` holds the live handles afterwards."""
    device = provider.device

    def ours() -> None:
        out, _ = provider.kv_blocks_migrate(blocks, HOST)
        blocks[:], _ = provider.kv_blocks_migrate(out, device)

    plain = baselines.paged_swap(_first_pages(provider, blocks))
    moved = 2 * len(blocks)  # each run migrates every block out and in
    times = interleaved(
        {"ours": (ours, {}, moved), "plain": (plain, {}, moved)}, rounds, provider.synchronize
    )
    return (
        f"kv_blocks_migrate out and in, {len(blocks)} blocks",
        "kv_blocks_migrate to host and back",
        "plain indexed copies between the pools",
        times["ours"],
        times["plain"],
        "the host cost per block and migration: new handles, validation, issuing",
    )


def _first_pages(provider: BackendProvider[Any], blocks: list[Any]) -> list[int]:
    """The first page of each block."""
    return [provider.kv_block_info(b).pages[0] for b in blocks]
