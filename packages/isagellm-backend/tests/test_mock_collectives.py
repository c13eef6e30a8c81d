"""Mock collectives: real results across a world of threads, timeouts that never hang."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import pytest

from sagellm_backend import (
    CapabilityError,
    CommBackendNotSupportedError,
    CommError,
    CommGroupBrokenError,
    CommRankMismatchError,
    CommTimeoutError,
    DType,
    ErrorCode,
    InvalidArgumentError,
    MockBackendProvider,
    MockTensor,
    ReduceOp,
    create_mock_world,
)
from sagellm_backend.mock import MockWorld
from sagellm_backend.mock.collectives import _Call
from sagellm_backend.timeouts import MAX_TIMEOUT_S, check_timeout

R = TypeVar("R")
ALL_DTYPES = list(DType)


def run_ranks(
    providers: Sequence[MockBackendProvider],
    fn: Callable[[MockBackendProvider], R],
    *,
    ranks: Sequence[int] | None = None,
) -> list[R | BaseException]:
    """Run ``fn`` on each rank in its own thread; an exception is returned, not raised."""
    chosen = range(len(providers)) if ranks is None else ranks
    out: dict[int, R | BaseException] = {}

    def body(rank: int) -> None:
        try:
            out[rank] = fn(providers[rank])
        except BaseException as exc:  # returned to the test
            out[rank] = exc

    threads = [threading.Thread(target=body, args=(r,)) for r in chosen]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
        assert not t.is_alive(), "a rank hung"
    return [out[r] for r in chosen]


def world(size: int = 4, *, validate_collectives: bool = True) -> list[MockBackendProvider]:
    return create_mock_world(
        size, supported_dtypes=ALL_DTYPES, validate_collectives=validate_collectives
    )


FLOAT_CASES = [
    (ReduceOp.SUM, [10.0, -10.0, 1.875]),
    (ReduceOp.PROD, [24.0, 24.0, 0.015625]),
    (ReduceOp.MAX, [4.0, -1.0, 1.0]),
    (ReduceOp.MIN, [1.0, -4.0, 0.125]),
    (ReduceOp.AVG, [2.5, -2.5, 0.46875]),
]
INT_CASES = [
    (ReduceOp.SUM, [10, -10, 1]),
    (ReduceOp.PROD, [24, 24, 0]),
    (ReduceOp.MAX, [4, -1, 1]),
    (ReduceOp.MIN, [1, -4, 0]),
    (ReduceOp.AVG, [2, -2, 0]),
    (ReduceOp.BAND, [0, -4 & -3 & -2 & -1, 0]),
    (ReduceOp.BOR, [7, -1, 1]),
    (ReduceOp.BXOR, [4, -4 ^ -3 ^ -2 ^ -1, 1]),
]


def rank_values(rank: int, integer: bool) -> list[float]:
    """Rank r holds [r+1, -(r+1), x]: x is 1, 0.5, 0.25, 0.125 for floats, 1, 0, 0, 0 for ints."""
    last: float = (1 if rank == 0 else 0) if integer else [1.0, 0.5, 0.25, 0.125][rank]
    return [rank + 1, -(rank + 1), last]


@pytest.mark.parametrize(("op", "expected"), FLOAT_CASES)
@pytest.mark.parametrize("dtype", [DType.FP32, DType.FP16, DType.BF16])
def test_all_reduce_every_float_op(op: ReduceOp, expected: list[float], dtype: DType) -> None:
    providers = world()

    def body(p: MockBackendProvider) -> list[float]:
        tensor = MockTensor(rank_values(p.rank, False), dtype)
        assert p.all_reduce(tensor, op.value) is tensor, "in place"
        return tensor.tolist()

    assert run_ranks(providers, body) == [expected] * 4


@pytest.mark.parametrize(("op", "expected"), INT_CASES)
def test_all_reduce_every_int_op(op: ReduceOp, expected: list[float]) -> None:
    providers = world()

    def body(p: MockBackendProvider) -> list[float]:
        return p.all_reduce(MockTensor(rank_values(p.rank, True), DType.INT8), op).tolist()

    assert run_ranks(providers, body) == [expected] * 4


def test_int_results_wrap_and_float_results_round_as_stored() -> None:
    providers = world()

    def body(p: MockBackendProvider) -> tuple[list[float], list[float]]:
        wrapped = p.all_reduce(MockTensor([100], DType.INT8)).tolist()
        rounded = p.all_reduce(MockTensor([0.1], DType.FP16)).tolist()
        return wrapped, rounded

    assert run_ranks(providers, body) == [([400 - 512], [0.39990234375])] * 4


@pytest.mark.parametrize("op", [ReduceOp.BAND, ReduceOp.BOR, ReduceOp.BXOR])
def test_bitwise_ops_on_floats_are_refused_before_anything_is_sent(op: ReduceOp) -> None:
    (p,) = world(1)
    with pytest.raises(CommBackendNotSupportedError) as info:
        p.all_reduce(MockTensor([1.0], DType.FP32), op)
    assert info.value.code is ErrorCode.COMM_BACKEND_NOT_SUPPORTED
    assert isinstance(info.value, CapabilityError)
    p.barrier(timeout=1)  # the group is still usable


def test_all_gather_reduce_scatter_broadcast() -> None:
    providers = world()

    def body(p: MockBackendProvider) -> tuple[list[float], list[float], list[float]]:
        gathered = p.all_gather(MockTensor([p.rank, 10 * p.rank], DType.INT8)).tolist()
        scattered = p.reduce_scatter(MockTensor(list(range(8)), DType.FP32)).tolist()
        root = MockTensor([p.rank + 0.5] * 2, DType.FP16)
        p.broadcast(root, src=2)
        return gathered, scattered, root.tolist()

    results = run_ranks(providers, body)
    for rank, result in enumerate(results):
        assert result == (
            [0, 0, 1, 10, 2, 20, 3, 30],
            [8.0 * rank, 8.0 * rank + 4.0],
            [2.5, 2.5],
        )


def test_send_recv_and_barrier() -> None:
    providers = world(2)

    def body(p: MockBackendProvider) -> list[float]:
        if p.rank == 0:
            p.send(MockTensor([1.5, 2.5], DType.FP32), dst=1)
            p.barrier()
            return []
        got = p.recv(MockTensor.zeros(2, DType.FP32), src=0)
        p.barrier()
        return got.tolist()

    assert run_ranks(providers, body) == [[], [1.5, 2.5]]


def test_a_rank_that_never_joins_times_out_the_others_then_the_group_is_broken() -> None:
    providers = world(3)
    started = time.monotonic()
    results = run_ranks(
        providers, lambda p: p.all_reduce(MockTensor([1.0], DType.FP32), timeout=0.3), ranks=[0, 1]
    )
    elapsed = time.monotonic() - started
    assert elapsed < 3, "timed out within the timeout, not later"
    for error in results:
        assert isinstance(error, CommTimeoutError) and isinstance(error, TimeoutError)
        assert error.code is ErrorCode.COMM_TIMEOUT and "rank 2" in str(error)
    for p in providers:
        with pytest.raises(CommGroupBrokenError) as info:
            p.barrier(timeout=5)
        assert info.value.code is ErrorCode.COMM_GROUP_INVALID and "unusable" in str(info.value)


def test_ranks_that_disagree_raise_rank_mismatch_and_the_group_stays_usable() -> None:
    providers = world(2)

    def body(p: MockBackendProvider) -> list[float]:
        dtype = DType.FP32 if p.rank == 0 else DType.FP16
        with pytest.raises(CommRankMismatchError, match="rank 1: all_reduce fp16") as info:
            p.all_reduce(MockTensor([1.0], dtype), timeout=5)
        assert info.value.code is ErrorCode.COMM_RANK_MISMATCH
        with pytest.raises(CommRankMismatchError):
            p.all_reduce(MockTensor([1.0], DType.FP32), "sum" if p.rank else "max", timeout=5)
        return p.all_reduce(MockTensor([1.0], DType.FP32), timeout=5).tolist()

    assert run_ranks(providers, body) == [[2.0], [2.0]]


def test_without_validation_an_incomputable_mismatch_breaks_the_group() -> None:
    providers = world(2, validate_collectives=False)

    def body(p: MockBackendProvider) -> BaseException | None:
        try:
            p.all_reduce(MockTensor([1.0] * (p.rank + 1), DType.FP32), timeout=5)
        except CommError as exc:
            return exc
        return None

    errors = run_ranks(providers, body)
    assert all(type(e) is CommError for e in errors)
    with pytest.raises(CommGroupBrokenError):
        providers[0].barrier()


def test_bad_arguments_are_refused_locally() -> None:
    providers = world(2)
    p = providers[0]
    cases: list[tuple[Callable[[], object], type[Exception]]] = [
        (lambda: p.all_reduce([1.0]), InvalidArgumentError),  # type: ignore[arg-type]  # bad
        (lambda: p.all_reduce(MockTensor([1.0]), "mean"), InvalidArgumentError),
        (lambda: p.reduce_scatter(MockTensor([1.0, 2.0, 3.0])), InvalidArgumentError),
        (lambda: p.broadcast(MockTensor([1.0]), src=2), InvalidArgumentError),
        (lambda: p.send(MockTensor([1.0]), dst=0), InvalidArgumentError),
        (lambda: p.recv(MockTensor([1.0]), src=-1), InvalidArgumentError),
        (lambda: p.barrier(timeout=0), InvalidArgumentError),
        (lambda: p.barrier(timeout=float("inf")), InvalidArgumentError),
    ]
    for call, error in cases:
        with pytest.raises(error):
            call()
    assert run_ranks(providers, lambda q: q.barrier(timeout=5)) == [None, None]


def test_capability_gates_collectives_and_their_dtypes() -> None:
    off = MockBackendProvider(has_collective=False)
    with pytest.raises(CapabilityError, match="has_collective=False"):
        off.barrier()
    limited = MockBackendProvider(
        supported_collectives=["all_reduce"], supported_reduce_ops=["sum"]
    )
    with pytest.raises(CapabilityError, match="all_gather"):
        limited.all_gather(MockTensor([1.0], DType.FP16))
    with pytest.raises(CapabilityError, match="cannot reduce with max"):
        limited.all_reduce(MockTensor([1.0], DType.FP16), ReduceOp.MAX)
    with pytest.raises(CapabilityError, match="fp32"):
        limited.all_reduce(MockTensor([1.0], DType.FP32))
    assert limited.all_reduce(MockTensor([1.0], DType.FP16)).tolist() == [1.0]


def test_a_world_refuses_a_rank_twice_and_closing_a_rank_breaks_it() -> None:
    shared = MockWorld(2)
    MockBackendProvider(world=shared, rank=0)
    with pytest.raises(InvalidArgumentError, match="already taken"):
        MockBackendProvider(world=shared, rank=0)
    with pytest.raises(InvalidArgumentError, match="outside the world"):
        MockBackendProvider(world=shared, rank=2)
    providers = world(2)
    providers[1].close()
    with pytest.raises(CommGroupBrokenError, match="rank 1 left"):
        providers[0].barrier()


HUGE_TIMEOUTS = [9.3e9, 1.5e10, 10**400]
BAD_TIMEOUTS: list[object] = ["5", float("inf"), float("-inf"), float("nan"), -1.0, 0, True, b"5"]


def test_a_huge_finite_timeout_waits_up_to_the_cap() -> None:
    assert check_timeout(9.3e9) == MAX_TIMEOUT_S == 24 * 3600.0
    assert check_timeout(10**400) == MAX_TIMEOUT_S
    assert check_timeout(2) == 2.0
    providers = create_mock_world(2, supported_dtypes=["fp32"], collective_timeout=1e12)

    def body(p: MockBackendProvider) -> list[list[float]]:
        out = []
        for timeout in HUGE_TIMEOUTS:
            # rank 1 arrives late, so rank 0 really waits with the huge timeout
            if p.rank == 1:
                time.sleep(0.05)
            out.append(p.all_reduce(MockTensor([p.rank + 1.0]), timeout=timeout).tolist())
        out.append(p.all_reduce(MockTensor([p.rank + 1.0])).tolist())
        return out

    assert run_ranks(providers, body) == [[[3.0]] * 4] * 2


@pytest.mark.parametrize("timeout", BAD_TIMEOUTS, ids=repr)
def test_a_bad_timeout_is_refused_before_anything_changes(timeout: object) -> None:
    providers = world(2)

    def body(p: MockBackendProvider) -> list[float]:
        tensor = MockTensor([p.rank + 1.0, -2.5], DType.FP32)
        calls: list[Callable[[], object]] = [
            lambda: p.all_reduce(tensor, timeout=timeout),  # type: ignore[arg-type]  # bad
            lambda: p.broadcast(tensor, src=1, timeout=timeout),  # type: ignore[arg-type]
            lambda: p.all_gather(tensor, timeout=timeout),  # type: ignore[arg-type]
            lambda: p.barrier(timeout=timeout),  # type: ignore[arg-type]
        ]
        for call in calls:
            with pytest.raises(InvalidArgumentError) as info:
                call()
            assert info.value.code is ErrorCode.INVALID_ARGUMENT and info.value.hint
            assert tensor.tolist() == [p.rank + 1.0, -2.5], "a refused call wrote the tensor"
        return p.all_reduce(tensor, timeout=5).tolist()

    assert run_ranks(providers, body) == [[3.0, -5.0]] * 2
    with pytest.raises(InvalidArgumentError, match="collective_timeout"):
        MockBackendProvider(collective_timeout=timeout)  # type: ignore[arg-type]  # bad on purpose


NONE_CALLS: dict[str, Callable[[MockBackendProvider], object]] = {
    "all_reduce": lambda p: p.all_reduce(None),  # type: ignore[arg-type]  # bad on purpose
    "all_gather": lambda p: p.all_gather(None),  # type: ignore[arg-type]
    "reduce_scatter": lambda p: p.reduce_scatter(None),  # type: ignore[arg-type]
    "broadcast": lambda p: p.broadcast(None),  # type: ignore[arg-type]
    "send": lambda p: p.send(None, dst=1 - p.rank),  # type: ignore[arg-type]
    "recv": lambda p: p.recv(None, src=1 - p.rank),  # type: ignore[arg-type]
    "op=None": lambda p: p.all_reduce(MockTensor([1.0]), op=None),  # type: ignore[arg-type]
    "op=7": lambda p: p.all_reduce(MockTensor([1.0]), op=7),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("name", NONE_CALLS)
def test_bad_arguments_on_every_rank_are_refused_before_joining(name: str) -> None:
    providers = world(2)
    started = time.monotonic()

    def body(p: MockBackendProvider) -> list[float]:
        with pytest.raises(InvalidArgumentError) as info:
            NONE_CALLS[name](p)
        assert info.value.code is ErrorCode.INVALID_ARGUMENT and info.value.hint
        return p.all_reduce(MockTensor([p.rank + 1.0]), timeout=5).tolist()

    assert run_ranks(providers, body) == [[3.0], [3.0]]
    assert time.monotonic() - started < 3, "a refused rank must not make the others wait"
    assert providers[0]._comm.world.broken is None


def test_a_rank_refused_for_bad_arguments_may_join_again_and_the_round_completes() -> None:
    providers = world(3)

    def body(p: MockBackendProvider) -> list[float]:
        tensor = MockTensor([p.rank + 1.0], DType.FP32)
        if p.rank == 1:
            time.sleep(0.1)  # the others are waiting in the round by now
            with pytest.raises(InvalidArgumentError, match="unknown reduce op None"):
                p.all_reduce(tensor, op=None, timeout=5)  # type: ignore[arg-type]  # bad
            with pytest.raises(InvalidArgumentError, match="needs a MockTensor"):
                p.all_reduce(None, timeout=5)  # type: ignore[arg-type]  # bad on purpose
            assert tensor.tolist() == [2.0]
        return p.all_reduce(tensor, timeout=5).tolist()

    assert run_ranks(providers, body) == [[6.0]] * 3
    assert run_ranks(providers, lambda p: p.barrier(timeout=5)) == [None] * 3


def test_ranks_waiting_for_a_refused_rank_time_out_naming_it() -> None:
    providers = world(3)

    def body(p: MockBackendProvider) -> object:
        if p.rank == 2:
            with pytest.raises(InvalidArgumentError):
                p.broadcast(None, src=0, timeout=5)  # type: ignore[arg-type]  # bad on purpose
            return "refused"
        with pytest.raises(CommTimeoutError, match="waiting for rank 2;"):
            p.broadcast(MockTensor([1.0]), src=0, timeout=0.3)
        return "timed out"

    assert run_ranks(providers, body) == ["timed out", "timed out", "refused"]


def test_a_fault_in_computing_a_result_fails_every_rank_instead_of_stranding_them() -> None:
    shared = MockWorld(2)

    def faulty(calls: dict[int, _Call]) -> dict[int, MockTensor | None]:
        raise ZeroDivisionError("fault")

    def body(rank: int) -> BaseException | None:
        try:
            shared.meet(rank, ("c",), frozenset({0, 1}), _Call("all_reduce"), faulty, 5.0)
        except CommError as exc:
            return exc
        return None

    out: list[BaseException | None] = [None, None]
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, body(r))) for r in range(2)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert time.monotonic() - started < 3
    for error in out:
        assert type(error) is CommError and "ZeroDivisionError('fault')" in str(error)
    assert shared.broken is not None
