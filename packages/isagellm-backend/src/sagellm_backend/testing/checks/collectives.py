"""Collectives across a world of ranks: right results for every claimed op and dtype,
up-front refusal of what is not claimed, and comm_timeout for a missing rank.

Rank bodies are module-level functions bound with ``functools.partial`` to picklable arguments,
so a target may run them in other processes. Every rank's data is drawn from the check's seeded
random generator: signed integers, negative ones included, bounded so that every partial result
of the reduction is exact in the dtype (fp8 and int4 included), whatever order a backend reduces
in; results compare exactly.
"""

from __future__ import annotations

import functools
import math
import operator
import time
from collections.abc import Callable, Sequence
from typing import TypeVar, cast

from sagellm_backend.capability import CapabilityDescriptor
from sagellm_backend.dtypes import CollectiveOp, DType, ReduceOp
from sagellm_backend.errors import CapabilityError, CommGroupBrokenError, CommTimeoutError
from sagellm_backend.protocols import BackendProvider
from sagellm_backend.testing.check import (
    Area,
    Check,
    CheckContext,
    CheckSkipped,
    ConformanceFailure,
    Requirement,
    expect_refusal,
)
from sagellm_backend.testing.target import ConformanceTarget, RankOutcome, TensorAdapter

__all__ = ["CHECKS"]

T = TypeVar("T")

LENGTH = 4
OP_TIMEOUT_S = 10.0
MISSING_RANK_TIMEOUT_S = 0.5
_EXACT = {
    DType.FP32: 1 << 24,
    DType.FP16: 2048,
    DType.BF16: 256,
    DType.FP8: 16,
    DType.INT8: 127,
    DType.INT4: 7,
}
"""Up to this magnitude every integer is exact in the dtype (and in range, for integer dtypes)."""
_SMALL = 100
_BITWISE = {ReduceOp.BAND: operator.and_, ReduceOp.BOR: operator.or_, ReduceOp.BXOR: operator.xor}

Table = list[list[float]]
"""One row of values per rank."""
Result = tuple[str, ...] | tuple[str, list[float], list[float]]
"""("ok", returned values, values in place) or ("refused" | "error", type name, message)."""


def _claims_collectives(*ops: CollectiveOp) -> Requirement:
    def requirement(capability: CapabilityDescriptor) -> str | None:
        if not capability.has_collective:
            return "not claimed: has_collective=False"
        missing = [op.value for op in ops if not capability.supports_collective(op)]
        if missing:
            return f"not claimed: {', '.join(missing)} not in supported_collectives"
        return None

    return requirement


def _adapter(target: ConformanceTarget[T]) -> TensorAdapter[T]:
    if target.tensors is None:
        raise CheckSkipped(f"target {target.name!r} supplies no tensor adapter")
    return target.tensors


def _data_dtypes(ctx: CheckContext[T]) -> list[DType]:
    adapter = _adapter(ctx.target)
    dtypes = [d for d in ctx.capability.supported_dtypes if d in adapter.dtypes]
    if not dtypes:
        raise CheckSkipped("the tensor adapter builds none of the claimed dtypes")
    return dtypes


def _table(
    ctx: CheckContext[T], op: ReduceOp | None, dtype: DType, world_size: int, length: int
) -> Table:
    """Signed random integers, one row per rank, whose reduction with ``op`` is exact in
    ``dtype`` (partial results included); with at least one negative value."""
    while True:
        columns = [_column(ctx, op, dtype, world_size) for _ in range(length)]
        if any(v < 0 for column in columns for v in column):
            return [[column[rank] for column in columns] for rank in range(world_size)]


def _column(ctx: CheckContext[T], op: ReduceOp | None, dtype: DType, n: int) -> list[float]:
    """One element of every rank."""
    rng, exact = ctx.rng, _EXACT[dtype]
    if op is ReduceOp.PROD:  # +-1 and at most log2(exact) factors of +-2
        twos = set(rng.sample(range(n), rng.randint(0, min(n, exact.bit_length() - 1))))
        return [rng.choice((-1, 1)) * (2 if r in twos else 1) for r in range(n)]
    if op is not None and op.is_bitwise and not dtype.is_floating_point:
        return [rng.randint(-exact - 1, exact) for _ in range(n)]
    summed = op in (ReduceOp.SUM, ReduceOp.AVG)
    bound = max(1, min(exact // n if summed else exact, _SMALL))
    while True:
        column: list[float] = [rng.randint(-bound, bound) for _ in range(n)]
        if op is not ReduceOp.AVG or sum(column) % n == 0:  # the average is then exact
            return column


def _reduce(op: ReduceOp, column: list[float]) -> float:
    if op is ReduceOp.SUM:
        return sum(column)
    if op is ReduceOp.PROD:
        return math.prod(column)
    if op is ReduceOp.MAX:
        return max(column)
    if op is ReduceOp.MIN:
        return min(column)
    if op is ReduceOp.AVG:
        return sum(column) / len(column)
    return functools.reduce(_BITWISE[op], (int(v) for v in column))


def _expected(op: ReduceOp, table: Table) -> list[float]:
    return [_reduce(op, list(column)) for column in zip(*table, strict=True)]


def _attempt(call: Callable[[], T], adapter: TensorAdapter[T], inplace: T | None) -> Result:
    try:
        out = call()
    except CapabilityError as exc:
        return ("refused", type(exc).__name__, str(exc))
    except Exception as exc:
        return ("error", type(exc).__name__, str(exc))
    return ("ok", adapter.values(out), adapter.values(inplace if inplace is not None else out))


# Rank bodies: (bound arguments..., target, provider) -> picklable result.


def _all_reduce_rank(
    cases: Sequence[tuple[ReduceOp, DType, Table]],
    target: ConformanceTarget[T],
    provider: BackendProvider[T],
) -> list[Result]:
    adapter = _adapter(target)
    results: list[Result] = []
    for op, dtype, table in cases:
        tensor = adapter.tensor(provider, table[provider.rank], dtype)
        results.append(
            _attempt(
                functools.partial(provider.all_reduce, tensor, op.value, timeout=OP_TIMEOUT_S),
                adapter,
                tensor,
            )
        )
    return results


def _gather_rank(
    cases: Sequence[tuple[DType, Table]], target: ConformanceTarget[T], provider: BackendProvider[T]
) -> list[Result]:
    adapter = _adapter(target)
    results: list[Result] = []
    for dtype, table in cases:
        tensor = adapter.tensor(provider, table[provider.rank], dtype)
        results.append(
            _attempt(
                functools.partial(provider.all_gather, tensor, timeout=OP_TIMEOUT_S), adapter, None
            )
        )
    return results


def _reduce_scatter_rank(
    cases: Sequence[tuple[DType, Table]], target: ConformanceTarget[T], provider: BackendProvider[T]
) -> list[Result]:
    adapter = _adapter(target)
    results: list[Result] = []
    for dtype, table in cases:
        tensor = adapter.tensor(provider, table[provider.rank], dtype)
        results.append(
            _attempt(
                functools.partial(
                    provider.reduce_scatter, tensor, ReduceOp.SUM, timeout=OP_TIMEOUT_S
                ),
                adapter,
                None,
            )
        )
    return results


def _broadcast_rank(
    cases: Sequence[tuple[DType, Table]], target: ConformanceTarget[T], provider: BackendProvider[T]
) -> list[Result]:
    adapter = _adapter(target)
    src = provider.world_size - 1
    results: list[Result] = []
    for dtype, table in cases:
        tensor = adapter.tensor(provider, table[provider.rank], dtype)
        results.append(
            _attempt(
                functools.partial(provider.broadcast, tensor, src, timeout=OP_TIMEOUT_S),
                adapter,
                tensor,
            )
        )
    return results


def _send_recv_rank(
    cases: Sequence[tuple[DType, Table]], target: ConformanceTarget[T], provider: BackendProvider[T]
) -> list[Result]:
    adapter = _adapter(target)
    rank, world_size = provider.rank, provider.world_size
    peer = rank + 1 if rank % 2 == 0 else rank - 1
    results: list[Result] = []
    if peer >= world_size:
        return results
    for dtype, table in cases:
        mine = adapter.tensor(provider, table[rank], dtype)
        buffer = adapter.tensor(provider, [0.0] * LENGTH, dtype)

        def exchange(mine: T = mine, buffer: T = buffer) -> T:
            if rank % 2 == 0:
                provider.send(mine, peer, timeout=OP_TIMEOUT_S)
                return provider.recv(buffer, peer, timeout=OP_TIMEOUT_S)
            received = provider.recv(buffer, peer, timeout=OP_TIMEOUT_S)
            provider.send(mine, peer, timeout=OP_TIMEOUT_S)
            return received

        results.append(_attempt(exchange, adapter, buffer))
    return results


def _barrier_rank(
    delay: float, target: ConformanceTarget[T], provider: BackendProvider[T]
) -> float:
    """Seconds this rank spent in a barrier that rank 0 enters ``delay`` seconds late."""
    provider.barrier(timeout=OP_TIMEOUT_S)
    if provider.rank == 0:
        time.sleep(delay)
    start = time.perf_counter()
    provider.barrier(timeout=OP_TIMEOUT_S)
    return time.perf_counter() - start


def _missing_rank_rank(
    target: ConformanceTarget[T], provider: BackendProvider[T]
) -> tuple[str, float, str] | None:
    """The last rank never joins; the others time out, then find the group broken."""
    if provider.rank == provider.world_size - 1:
        return None
    start = time.perf_counter()
    try:
        provider.barrier(timeout=MISSING_RANK_TIMEOUT_S)
    except CommTimeoutError:
        took = time.perf_counter() - start
    else:
        return ("returned", time.perf_counter() - start, "")
    try:
        provider.barrier(timeout=MISSING_RANK_TIMEOUT_S)
    except CommGroupBrokenError:
        return ("timeout", took, "broken")
    except Exception as exc:
        return ("timeout", took, f"{type(exc).__name__}: {exc}")
    return ("timeout", took, "usable")


def _unclaimed_rank(
    ops: Sequence[ReduceOp],
    dtype: DType,
    target: ConformanceTarget[T],
    provider: BackendProvider[T],
) -> list[Result]:
    adapter = _adapter(target)
    results: list[Result] = []
    for op in ops:
        tensor = adapter.tensor(provider, [1.0] * LENGTH, dtype)
        results.append(
            _attempt(
                functools.partial(provider.all_reduce, tensor, op, timeout=OP_TIMEOUT_S),
                adapter,
                None,
            )
        )
    return results


def _results(outcome: RankOutcome) -> list[Result]:
    """The per-case results a rank body returned (the bodies above return exactly this)."""
    return cast("list[Result]", outcome.value)


# Checks.


def _world(
    ctx: CheckContext[T], world_size: int, fn: Callable[..., object], what: str
) -> list[RankOutcome]:
    outcomes = ctx.run_world(world_size, fn)
    for outcome in outcomes:
        if outcome.error is not None:
            raise ConformanceFailure(
                f"{what} at world size {world_size}: rank {outcome.rank} raised "
                f"{type(outcome.error).__name__}: {outcome.error}"
            ) from outcome.error
    return outcomes


def _compare(
    what: str, world_size: int, rank: int, result: Result, expected: list[float], inplace: bool
) -> None:
    where = f"{what} at world size {world_size}, rank {rank}"
    if result[0] != "ok":
        raise ConformanceFailure(f"{where} raised {result[1]}: {result[2]}")
    if result[1] != expected:
        raise ConformanceFailure(f"{where} returned {result[1]}, expected {expected}")
    if inplace and result[2] != expected:
        raise ConformanceFailure(
            f"{where} did not write its result in place: the input holds {result[2]}"
        )


def _all_reduce(ctx: CheckContext[T]) -> None:
    dtypes = _data_dtypes(ctx)
    ops = ctx.capability.supported_reduce_ops
    for world_size in ctx.target.world_sizes():
        cases = [(op, d, _table(ctx, op, d, world_size, LENGTH)) for op in ops for d in dtypes]
        outcomes = _world(ctx, world_size, functools.partial(_all_reduce_rank, cases), "all_reduce")
        for outcome in outcomes:
            for (op, dtype, table), result in zip(cases, _results(outcome), strict=True):
                what = f"all_reduce({op.value}) in {dtype.value} of {table}"
                if op.is_bitwise and dtype.is_floating_point:
                    if result[0] != "refused":
                        raise ConformanceFailure(
                            f"{what} is a bitwise reduction of floats and must be refused "
                            f"with CapabilityError; got {result[0]} {result[1:]}"
                        )
                    continue
                if op is ReduceOp.AVG and not dtype.is_floating_point and result[0] == "refused":
                    continue
                expected = _expected(op, table)
                _compare(what, world_size, outcome.rank, result, expected, inplace=True)
    ctx.note(f"{len(ops) * len(dtypes)} (op, dtype) cases on signed random data")


def _all_gather(ctx: CheckContext[T]) -> None:
    dtypes = _data_dtypes(ctx)
    for world_size in ctx.target.world_sizes():
        cases = [(d, _table(ctx, None, d, world_size, LENGTH)) for d in dtypes]
        fn = functools.partial(_gather_rank, cases)
        for outcome in _world(ctx, world_size, fn, "all_gather"):
            for (dtype, table), result in zip(cases, _results(outcome), strict=True):
                expected = [v for row in table for v in row]
                what = f"all_gather in {dtype.value} of {table}"
                _compare(what, world_size, outcome.rank, result, expected, inplace=False)


def _reduce_scatter(ctx: CheckContext[T]) -> None:
    if not ctx.capability.supports_reduce_op(ReduceOp.SUM):
        raise CheckSkipped("not claimed: sum is not in supported_reduce_ops")
    dtypes = _data_dtypes(ctx)
    for world_size in ctx.target.world_sizes():
        cases = [(d, _table(ctx, ReduceOp.SUM, d, world_size, 2 * world_size)) for d in dtypes]
        fn = functools.partial(_reduce_scatter_rank, cases)
        for outcome in _world(ctx, world_size, fn, "reduce_scatter"):
            for (dtype, table), result in zip(cases, _results(outcome), strict=True):
                chunk = _expected(ReduceOp.SUM, table)[2 * outcome.rank : 2 * outcome.rank + 2]
                what = f"reduce_scatter(sum) in {dtype.value} of {table}"
                _compare(what, world_size, outcome.rank, result, chunk, inplace=False)


def _broadcast(ctx: CheckContext[T]) -> None:
    dtypes = _data_dtypes(ctx)
    for world_size in ctx.target.world_sizes():
        cases = [(d, _table(ctx, None, d, world_size, LENGTH)) for d in dtypes]
        fn = functools.partial(_broadcast_rank, cases)
        for outcome in _world(ctx, world_size, fn, "broadcast"):
            for (dtype, table), result in zip(cases, _results(outcome), strict=True):
                what = f"broadcast from rank {world_size - 1} in {dtype.value}"
                _compare(what, world_size, outcome.rank, result, table[-1], inplace=True)


def _send_recv(ctx: CheckContext[T]) -> None:
    dtypes = _data_dtypes(ctx)
    if max(ctx.target.world_sizes()) < 2:
        raise CheckSkipped("needs a world of at least 2 ranks")
    for world_size in ctx.target.world_sizes():
        cases = [(d, _table(ctx, None, d, world_size, LENGTH)) for d in dtypes]
        fn = functools.partial(_send_recv_rank, cases)
        for outcome in _world(ctx, world_size, fn, "send/recv"):
            peer = outcome.rank + 1 if outcome.rank % 2 == 0 else outcome.rank - 1
            if peer >= world_size:
                continue
            for (dtype, table), result in zip(cases, _results(outcome), strict=True):
                what = f"recv from rank {peer} in {dtype.value}"
                _compare(what, world_size, outcome.rank, result, table[peer], inplace=True)


def _barrier(ctx: CheckContext[T]) -> None:
    delay = 0.3
    for world_size in ctx.target.world_sizes():
        outcomes = _world(ctx, world_size, functools.partial(_barrier_rank, delay), "barrier")
        for outcome in outcomes:
            waited = cast(float, outcome.value)
            if outcome.rank != 0 and waited < delay / 2:
                raise ConformanceFailure(
                    f"barrier at world size {world_size}: rank {outcome.rank} left after "
                    f"{waited:.3f} s although rank 0 entered {delay} s late"
                )


def _missing_rank(ctx: CheckContext[T]) -> None:
    if not ctx.target.launches_worlds:
        raise CheckSkipped(
            "the target runs collectives only on the provider's own world; a missing rank "
            "needs a target that launches worlds (ConformanceTarget.run_world)"
        )
    if not ctx.capability.supports_collective(CollectiveOp.BARRIER):
        raise CheckSkipped("not claimed: barrier is not in supported_collectives")
    world_size = max(2, min(ctx.target.world_sizes()))
    bound = 2 * MISSING_RANK_TIMEOUT_S + 1.0
    for outcome in ctx.run_world(world_size, _missing_rank_rank):
        if outcome.error is not None:
            raise ConformanceFailure(
                f"with a missing rank, rank {outcome.rank} raised "
                f"{type(outcome.error).__name__}: {outcome.error} instead of comm_timeout"
            ) from outcome.error
        if outcome.value is None:
            continue
        state, took, after = cast("tuple[str, float, str]", outcome.value)
        if state != "timeout":
            raise ConformanceFailure(
                f"a barrier with a missing rank returned on rank {outcome.rank} instead of "
                "raising comm_timeout"
            )
        if took > bound:
            raise ConformanceFailure(
                f"comm_timeout came after {took:.2f} s for a timeout of "
                f"{MISSING_RANK_TIMEOUT_S} s (bound {bound} s)"
            )
        if after != "broken":
            raise ConformanceFailure(
                "after comm_timeout the group must refuse further collectives with "
                f"comm_group_invalid; the next barrier gave: {after}"
            )


def _unclaimed_reduce_ops(ctx: CheckContext[T]) -> None:
    unclaimed = [op for op in ReduceOp if not ctx.capability.supports_reduce_op(op)]
    if not unclaimed:
        raise CheckSkipped("every reduce op is claimed")
    dtype = _data_dtypes(ctx)[0]
    fn = functools.partial(_unclaimed_rank, unclaimed, dtype)
    for world_size in ctx.target.world_sizes():
        outcomes = _world(ctx, world_size, fn, "an unclaimed reduce op")
        for outcome in outcomes:
            results = _results(outcome)
            for op, result in zip(unclaimed, results, strict=True):
                if result[0] != "refused":
                    raise ConformanceFailure(
                        f"all_reduce({op.value}) is not claimed and must be refused up front "
                        f"with CapabilityError; at world size {world_size} rank {outcome.rank} "
                        f"got {result[0]} {result[1:]}"
                    )


def _unclaimed_collectives(ctx: CheckContext[T]) -> None:
    p = ctx.provider
    adapter = ctx.target.tensors
    dtypes = [d for d in ctx.capability.supported_dtypes if adapter and d in adapter.dtypes]
    calls: dict[CollectiveOp, Callable[[], object]] = {
        CollectiveOp.BARRIER: lambda: p.barrier(timeout=1.0),
    }
    if adapter is not None and dtypes:

        def tensor() -> T:
            return adapter.tensor(p, [1.0, 1.0], dtypes[0])

        calls.update(
            {
                CollectiveOp.ALL_REDUCE: lambda: p.all_reduce(tensor(), timeout=1.0),
                CollectiveOp.ALL_GATHER: lambda: p.all_gather(tensor(), timeout=1.0),
                CollectiveOp.REDUCE_SCATTER: lambda: p.reduce_scatter(tensor(), timeout=1.0),
                CollectiveOp.BROADCAST: lambda: p.broadcast(tensor(), 0, timeout=1.0),
                CollectiveOp.SEND: lambda: p.send(tensor(), 0, timeout=1.0),
                CollectiveOp.RECV: lambda: p.recv(tensor(), 0, timeout=1.0),
            }
        )
    else:
        ctx.note("no tensor adapter: only barrier was tried")
    unclaimed = [op for op in calls if not ctx.capability.supports_collective(op)]
    if not unclaimed:
        raise CheckSkipped("every collective the protocol offers is claimed")
    for op in unclaimed:
        expect_refusal(
            f"the unclaimed collective {op.value} is refused", CapabilityError, calls[op]
        )


CHECKS = (
    Check(
        "collectives.all_reduce",
        Area.COLLECTIVES,
        "all_reduce gives the exact result in place for every claimed reduce op and dtype",
        _all_reduce,
        _claims_collectives(CollectiveOp.ALL_REDUCE),
    ),
    Check(
        "collectives.all_gather",
        Area.COLLECTIVES,
        "all_gather concatenates every rank's tensor in rank order",
        _all_gather,
        _claims_collectives(CollectiveOp.ALL_GATHER),
    ),
    Check(
        "collectives.reduce_scatter",
        Area.COLLECTIVES,
        "reduce_scatter gives each rank its chunk of the reduction",
        _reduce_scatter,
        _claims_collectives(CollectiveOp.REDUCE_SCATTER),
    ),
    Check(
        "collectives.broadcast",
        Area.COLLECTIVES,
        "broadcast writes the source rank's tensor in place on every rank",
        _broadcast,
        _claims_collectives(CollectiveOp.BROADCAST),
    ),
    Check(
        "collectives.send_recv",
        Area.COLLECTIVES,
        "recv receives exactly what the peer sent",
        _send_recv,
        _claims_collectives(CollectiveOp.SEND, CollectiveOp.RECV),
    ),
    Check(
        "collectives.barrier",
        Area.COLLECTIVES,
        "barrier holds every rank until the last one arrives",
        _barrier,
        _claims_collectives(CollectiveOp.BARRIER),
    ),
    Check(
        "collectives.unclaimed_reduce_ops",
        Area.COLLECTIVES,
        "a reduce op that is not claimed is refused up front with CapabilityError on every rank",
        _unclaimed_reduce_ops,
        _claims_collectives(CollectiveOp.ALL_REDUCE),
    ),
    Check(
        "collectives.unclaimed",
        Area.COLLECTIVES,
        "a collective that is not claimed is refused at once with CapabilityError",
        _unclaimed_collectives,
    ),
    Check(
        "collectives.missing_rank",
        Area.COLLECTIVES,
        "a missing rank gives comm_timeout within the timeout, then the group says it is broken",
        _missing_rank,
        _claims_collectives(CollectiveOp.BARRIER),
    ),
)
