"""A simulated process group: N ranks in one process, one thread per rank, real results.

Ranks meet in rounds, matched by the order in which each rank issues its collectives (as NCCL
matches them); point-to-point transfers meet per (src, dst) pair. The last rank to arrive computes
every rank's result on the MockTensor values, with the dtype's rounding and integer wrap-around.

Failure semantics follow a real group:

- a rank that does not arrive within the timeout makes the waiting ranks raise CommTimeoutError,
  naming the missing ranks; the group is then broken, and every later call on any rank raises
  CommGroupBrokenError at once (closing a rank's provider breaks the group the same way);
- with cross-rank validation on, ranks that disagree on the collective, its dtype, its size, its
  reduce op or its root all raise CommRankMismatchError and the group stays usable; with
  validation off, a disagreement the mock cannot compute through breaks the group;
- a send and its recv always check that the receiving tensor matches what was sent;
- a call with bad arguments (a tensor that is not a MockTensor, an unknown reduce op, a bad
  timeout or peer) is refused with InvalidArgumentError before its rank joins the round: the
  world stays usable, and the rank may issue the collective again with good arguments. Ranks
  already waiting in that round wait for it (or time out naming it, which breaks the group).

Timeouts are checked and capped by :func:`sagellm_backend.timeouts.check_timeout`.
"""

from __future__ import annotations

import functools
import math
import operator
import threading
import time
from collections.abc import Callable, Sequence

from sagellm_backend.dtypes import ReduceOp
from sagellm_backend.errors import (
    BackendError,
    CommBackendNotSupportedError,
    CommError,
    CommGroupBrokenError,
    CommRankMismatchError,
    CommTimeoutError,
    InvalidArgumentError,
)
from sagellm_backend.frozen import Frozen
from sagellm_backend.mock.tensor import MockTensor
from sagellm_backend.timeouts import check_timeout

__all__ = ["MockCommunicator", "MockWorld"]


class _Call(Frozen):
    """What one rank brought to a round."""

    name: str
    tensor: MockTensor | None = None
    op: ReduceOp | None = None
    root: int | None = None
    validate: bool = True

    @property
    def signature(self) -> str:
        parts = [self.name]
        if self.tensor is not None:
            parts.append(f"{self.tensor.dtype.value}[{self.tensor.numel()}]")
        if self.op is not None:
            parts.append(f"op={self.op.value}")
        if self.root is not None:
            parts.append(f"root={self.root}")
        return " ".join(parts)


Results = dict[int, MockTensor | None]
Compute = Callable[[dict[int, _Call]], Results]


class _Round:
    """One collective round: the ranks it waits for, what each brought, and how it ended."""

    __slots__ = ("calls", "compute", "error", "ranks", "results", "taken")

    def __init__(self, ranks: frozenset[int], compute: Compute) -> None:
        self.ranks = ranks
        self.compute = compute
        self.calls: dict[int, _Call] = {}
        self.results: Results | None = None
        self.error: BackendError | None = None
        self.taken = 0


class MockWorld:
    """The shared state of one simulated group of ``world_size`` ranks."""

    def __init__(self, world_size: int) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise InvalidArgumentError(
                f"world_size must be a positive int, got {world_size!r}",
                hint="pass the number of ranks, such as 4",
            )
        self.world_size = world_size
        self._cond = threading.Condition()
        self._members: dict[int, str] = {}
        self._rounds: dict[tuple[tuple[object, ...], int], _Round] = {}
        self._issued: dict[tuple[tuple[object, ...], int], int] = {}
        self._broken: str | None = None

    def __repr__(self) -> str:
        return f"MockWorld(world_size={self.world_size}, ranks joined={sorted(self._members)})"

    @property
    def broken(self) -> str | None:
        """Why the group is unusable, or None while it is usable."""
        return self._broken

    def join(self, rank: int, name: str) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise InvalidArgumentError(
                f"rank {rank!r} is outside the world of {self.world_size} ranks",
                hint=f"use a rank from 0 to {self.world_size - 1}",
            )
        with self._cond:
            if rank in self._members:
                raise InvalidArgumentError(
                    f"rank {rank} of this world is already taken by {self._members[rank]}",
                    hint="give each provider of a world its own rank",
                )
            self._members[rank] = name

    def leave(self, rank: int) -> None:
        with self._cond:
            self._members.pop(rank, None)
            if self.world_size > 1:
                self._break(f"rank {rank} left the group (its provider was closed)")

    def meet(
        self,
        rank: int,
        channel: tuple[object, ...],
        ranks: frozenset[int],
        call: _Call,
        compute: Compute,
        timeout: float,
    ) -> MockTensor | None:
        """Take part in the next round on ``channel`` with ``ranks``; returns this rank's result."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._check_usable(call)
            index = self._issued.get((channel, rank), 0)
            self._issued[(channel, rank)] = index + 1
            key = (channel, index)
            current = self._rounds.setdefault(key, _Round(ranks, compute))
            current.calls[rank] = call
            if len(current.calls) == len(ranks):
                self._complete(current)
            while current.results is None and current.error is None:
                remaining = deadline - time.monotonic()
                if self._broken is not None:
                    current.error = CommGroupBrokenError(
                        f"{call.name} on rank {rank} was abandoned: {self._broken}",
                        hint="create a new world; this one is unusable",
                    )
                elif remaining <= 0:
                    missing = sorted(ranks - set(current.calls))
                    reason = (
                        f"{call.name} timed out after {timeout:g} s waiting for "
                        f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}"
                    )
                    current.error = CommTimeoutError(
                        reason,
                        hint="check that every rank issues the same collectives in the same "
                        "order; the group is unusable now, create a new one",
                    )
                    self._break(reason)
                else:
                    self._cond.wait(remaining)
            current.taken += 1
            if current.taken == len(ranks) or current.error is not None:
                self._rounds.pop(key, None)
            if current.error is not None:
                raise _fresh(current.error)
            assert current.results is not None
            return current.results[rank]

    def _check_usable(self, call: _Call) -> None:
        if self._broken is not None:
            raise CommGroupBrokenError(
                f"cannot run {call.name}: the group is unusable ({self._broken})",
                hint="create a new world; a group does not recover from a failed collective",
            )

    def _complete(self, current: _Round) -> None:
        try:
            current.results = current.compute(current.calls)
        except CommRankMismatchError as exc:
            current.error = exc
        except BackendError as exc:
            current.error = exc
            self._break(exc.message)
        except Exception as exc:  # a fault in computing the result must not strand the ranks
            name = next(iter(current.calls.values())).name
            reason = f"computing the result of {name} raised {exc!r}"
            current.error = CommError(
                reason, hint="create a new world; this is a fault of the mock"
            )
            self._break(reason)
        self._cond.notify_all()

    def _break(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
        self._cond.notify_all()


def _fresh(error: BackendError) -> BackendError:
    """A new instance of ``error`` for each rank's thread (exceptions carry their traceback)."""
    return type(error)(error.message, hint=error.hint, code=error.code)


class MockCommunicator:
    """One rank's view of a MockWorld: validates locally, then meets the other ranks."""

    def __init__(
        self, world: MockWorld, rank: int, *, validate: bool, default_timeout: float
    ) -> None:
        self.world = world
        self.rank = rank
        self.validate = validate
        self.default_timeout = check_timeout(default_timeout, "collective_timeout")

    @property
    def world_size(self) -> int:
        return self.world.world_size

    def all_reduce(self, tensor: MockTensor, op: ReduceOp, timeout: float | None) -> MockTensor:
        _check_reduce(tensor, op)
        call = _Call("all_reduce", tensor, op, validate=self.validate)
        self._collective(call, _all_reduce, timeout)
        return tensor

    def all_gather(self, tensor: MockTensor, timeout: float | None) -> MockTensor:
        result = self._collective(
            _Call("all_gather", tensor, validate=self.validate), _all_gather, timeout
        )
        assert result is not None
        return result

    def reduce_scatter(self, tensor: MockTensor, op: ReduceOp, timeout: float | None) -> MockTensor:
        _check_reduce(tensor, op)
        if tensor.numel() % self.world_size:
            raise InvalidArgumentError(
                f"reduce_scatter needs a length divisible by the world size {self.world_size}, "
                f"got {tensor.numel()}",
                hint="pad the tensor to a multiple of the world size",
            )
        call = _Call("reduce_scatter", tensor, op, validate=self.validate)
        result = self._collective(call, _reduce_scatter, timeout)
        assert result is not None
        return result

    def broadcast(self, tensor: MockTensor, src: int, timeout: float | None) -> MockTensor:
        self._check_peer(src, "src", allow_self=True)
        call = _Call("broadcast", tensor, root=src, validate=self.validate)
        self._collective(call, _broadcast, timeout)
        return tensor

    def barrier(self, timeout: float | None) -> None:
        self._collective(_Call("barrier", validate=self.validate), _barrier, timeout)

    def send(self, tensor: MockTensor, dst: int, timeout: float | None) -> None:
        self._check_peer(dst, "dst")
        self.world.meet(
            self.rank,
            ("p2p", self.rank, dst),
            frozenset((self.rank, dst)),
            _Call("send", tensor, root=self.rank),
            _transfer,
            self._timeout(timeout),
        )

    def recv(self, tensor: MockTensor, src: int, timeout: float | None) -> MockTensor:
        self._check_peer(src, "src")
        self.world.meet(
            self.rank,
            ("p2p", src, self.rank),
            frozenset((self.rank, src)),
            _Call("recv", tensor, root=src),
            _transfer,
            self._timeout(timeout),
        )
        return tensor

    def _collective(
        self, call: _Call, compute: Compute, timeout: float | None
    ) -> MockTensor | None:
        return self.world.meet(
            self.rank,
            ("collective",),
            frozenset(range(self.world_size)),
            call,
            compute,
            self._timeout(timeout),
        )

    def _timeout(self, timeout: float | None) -> float:
        return self.default_timeout if timeout is None else check_timeout(timeout, "timeout")

    def _check_peer(self, peer: int, what: str, *, allow_self: bool = False) -> None:
        if isinstance(peer, bool) or not isinstance(peer, int) or not 0 <= peer < self.world_size:
            raise InvalidArgumentError(
                f"{what}={peer!r} is not a rank of this world of {self.world_size}",
                hint=f"use a rank from 0 to {self.world_size - 1}",
            )
        if peer == self.rank and not allow_self:
            raise InvalidArgumentError(
                f"{what}={peer} is this rank itself", hint="send to and receive from another rank"
            )


def _check_reduce(tensor: MockTensor, op: ReduceOp) -> None:
    if op.is_bitwise and tensor.dtype.is_floating_point:
        raise CommBackendNotSupportedError(
            f"{op.value} is a bitwise reduction and {tensor.dtype.value} is a floating-point dtype",
            hint="use band, bor and bxor on int8 or int4 tensors only",
        )


# Computing a round's results. Each takes every rank's call and returns every rank's result.


def _agree(calls: dict[int, _Call]) -> None:
    """Refuse a round whose ranks disagree (always on size and name; on all else if validating)."""
    validate = any(c.validate for c in calls.values())
    if validate:
        if len({c.signature for c in calls.values()}) > 1:
            listed = "; ".join(f"rank {r}: {calls[r].signature}" for r in sorted(calls))
            raise CommRankMismatchError(
                f"ranks called different collectives: {listed}",
                hint="issue the same collective with the same dtype, size, op and root on "
                "every rank, in the same order",
            )
        return
    shapes = {(c.name, None if c.tensor is None else c.tensor.numel()) for c in calls.values()}
    if len(shapes) > 1:
        raise CommError(
            f"ranks issued incompatible collectives {sorted(map(str, shapes))}; without "
            "cross-rank validation the group cannot recover",
            hint="turn validate_collectives on to find the mismatch",
        )


def _reduced(calls: dict[int, _Call]) -> list[float]:
    """The element-wise reduction over ranks, in rank order, before it is stored."""
    _agree(calls)
    op = calls[min(calls)].op
    tensors = [calls[r].tensor for r in sorted(calls)]
    assert op is not None
    integer = any(t is not None and not t.dtype.is_floating_point for t in tensors)
    columns = zip(*(t.tolist() for t in tensors if t is not None), strict=True)
    return [_reduce(op, col, integer) for col in columns]


def _reduce(op: ReduceOp, values: Sequence[float], integer: bool) -> float:
    if op is ReduceOp.SUM:
        return sum(values)
    if op is ReduceOp.PROD:
        return math.prod(values)
    if op is ReduceOp.AVG:
        total = sum(values)
        if integer:
            quotient = abs(int(total)) // len(values)
            return quotient if total >= 0 else -quotient
        return total / len(values)
    if op in (ReduceOp.MAX, ReduceOp.MIN):
        if any(math.isnan(v) for v in values):
            return math.nan
        return max(values) if op is ReduceOp.MAX else min(values)
    bitwise = {ReduceOp.BAND: operator.and_, ReduceOp.BOR: operator.or_}.get(op, operator.xor)
    return functools.reduce(bitwise, (int(v) for v in values))


def _all_reduce(calls: dict[int, _Call]) -> Results:
    values = _reduced(calls)
    for call in calls.values():
        assert call.tensor is not None
        call.tensor.copy_(MockTensor.wrapping(values, call.tensor.dtype))
    return dict.fromkeys(calls)


def _reduce_scatter(calls: dict[int, _Call]) -> Results:
    values = _reduced(calls)
    results: Results = {}
    for rank, call in calls.items():
        assert call.tensor is not None
        pieces = MockTensor.wrapping(values, call.tensor.dtype).chunk(len(calls))
        results[rank] = pieces[rank]
    return results


def _all_gather(calls: dict[int, _Call]) -> Results:
    _agree(calls)
    gathered = [calls[r].tensor for r in sorted(calls)]
    whole = MockTensor.cat([t for t in gathered if t is not None])
    return {rank: whole.clone() for rank in calls}


def _broadcast(calls: dict[int, _Call]) -> Results:
    _agree(calls)
    root = calls[min(calls)].root
    assert root is not None
    source = calls[root].tensor
    assert source is not None
    for call in calls.values():
        assert call.tensor is not None
        call.tensor.copy_(MockTensor.wrapping(source.tolist(), call.tensor.dtype))
    return dict.fromkeys(calls)


def _barrier(calls: dict[int, _Call]) -> Results:
    _agree(calls)
    return dict.fromkeys(calls)


def _transfer(calls: dict[int, _Call]) -> Results:
    sender = next(c for c in calls.values() if c.name == "send")
    receiver = next(c for c in calls.values() if c.name == "recv")
    assert sender.tensor is not None and receiver.tensor is not None
    if sender.tensor.dtype != receiver.tensor.dtype or sender.tensor.shape != (
        receiver.tensor.shape
    ):
        raise CommRankMismatchError(
            f"rank {sender.root} sent {sender.signature} into a recv of {receiver.signature}",
            hint="receive into a tensor of the sent dtype and size",
        )
    receiver.tensor.copy_(sender.tensor)
    return dict.fromkeys(calls)
