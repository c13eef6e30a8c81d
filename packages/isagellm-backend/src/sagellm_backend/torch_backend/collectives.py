"""Collectives over torch.distributed, with typed refusals, per-call timeouts and rank checks.

The provider uses the process's default process group, as torch engines do: one provider per
process under a launcher (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
or explicit options. If the group already exists (the engine made it) the provider joins it and
leaves it alone on close; otherwise it creates it and destroys it when its last user closes.

Every op is issued asynchronously and waited for with its timeout. An op that times out cannot
be cancelled, so the group is marked broken: later ops raise CommGroupBrokenError, and closing
does not destroy it (that would wait for the stuck op); restart the process to get a new one.
Timeouts are checked and capped by :func:`sagellm_backend.timeouts.check_timeout` before
anything is sent, so a refused timeout changes nothing. A group this module creates on gloo has
the cap as its own timeout, so each op's wait decides; on a backend whose group timeout bounds
every op (NCCL's watchdog), a per-call timeout above ``collective_timeout`` is refused.
With ``validate=True`` every op, barrier and send/recv included, first exchanges a small
signature (op, reduce op, dtype, shape, peer) between the ranks and refuses a mismatch on all of
them with CommRankMismatchError. Without it nothing is compared: a recv of another shape or
dtype than its send gets whatever bytes arrive.
"""

from __future__ import annotations

import datetime
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import HashStore, Store, TCPStore

from sagellm_backend.dtypes import CollectiveOp, ReduceOp, coerce
from sagellm_backend.errors import (
    CommBackendNotSupportedError,
    CommError,
    CommGroupBrokenError,
    CommRankMismatchError,
    CommTimeoutError,
    ErrorCode,
    InvalidArgumentError,
)
from sagellm_backend.timeouts import MAX_TIMEOUT_S, check_timeout

__all__ = ["FLOAT8", "GLOO", "WIDE_UNSIGNED", "CommSpec", "ProcessGroup", "WorldConfig"]

PROTOCOL_COLLECTIVES = (
    CollectiveOp.ALL_REDUCE,
    CollectiveOp.ALL_GATHER,
    CollectiveOp.REDUCE_SCATTER,
    CollectiveOp.BROADCAST,
    CollectiveOp.SEND,
    CollectiveOp.RECV,
    CollectiveOp.BARRIER,
)

_TORCH_OPS = {
    ReduceOp.SUM: dist.ReduceOp.SUM,
    ReduceOp.PROD: dist.ReduceOp.PRODUCT,
    ReduceOp.MIN: dist.ReduceOp.MIN,
    ReduceOp.MAX: dist.ReduceOp.MAX,
    ReduceOp.BAND: dist.ReduceOp.BAND,
    ReduceOp.BOR: dist.ReduceOp.BOR,
    ReduceOp.BXOR: dist.ReduceOp.BXOR,
    ReduceOp.AVG: dist.ReduceOp.AVG,
}


# torch 2.13 renamed all_gather_into_tensor and reduce_scatter_tensor to *_single (deprecating
# the old names); earlier releases have only the old ones.
_all_gather_single: Callable[..., dist.Work | None] = getattr(
    dist, "all_gather_single", dist.all_gather_into_tensor
)
_reduce_scatter_single: Callable[..., dist.Work | None] = getattr(
    dist, "reduce_scatter_single", dist.reduce_scatter_tensor
)


@dataclass(frozen=True)
class CommSpec:
    """A torch.distributed backend and what it can do; refusals are decided from it up front."""

    backend: str
    reduce_ops: frozenset[ReduceOp]
    float_only_ops: frozenset[ReduceOp]
    int_only_ops: frozenset[ReduceOp]
    unsupported_dtypes: frozenset[torch.dtype]
    collectives: tuple[CollectiveOp, ...] = PROTOCOL_COLLECTIVES
    binds_device: bool = False
    """Whether the group is bound to this process's device at init (NCCL: ``device_id``)."""
    waits_per_op: bool = False
    """Whether an op's own wait enforces its timeout, so that a group made here gets the cap as
    its timeout (gloo); otherwise ``collective_timeout`` bounds every op."""
    minmax_skips_nan: bool = False
    """Whether min and max skip a NaN (gloo), so that the result's NaNs are restored after."""

    def check(self, op: CollectiveOp, tensor: torch.Tensor, reduce: ReduceOp | None) -> None:
        """Raise CommBackendNotSupportedError if this backend cannot run ``op`` on ``tensor``."""
        if op not in self.collectives:
            raise CommBackendNotSupportedError(
                f"{self.backend} cannot run {op.value}",
                hint=f"it runs {', '.join(o.value for o in self.collectives)}",
            )
        if tensor.dtype in self.unsupported_dtypes:
            raise CommBackendNotSupportedError(
                f"{self.backend} cannot {op.value} tensors of {tensor.dtype}",
                hint="cast to a wider dtype first, e.g. tensor.to(torch.float16)",
            )
        if reduce is None:
            return
        if reduce not in self.reduce_ops:
            raise CommBackendNotSupportedError(
                f"{self.backend} cannot reduce with {reduce.value}",
                hint=f"use one of {', '.join(o.value for o in sorted(self.reduce_ops))}",
            )
        if tensor.dtype.is_complex and reduce in _UNORDERED:
            raise CommBackendNotSupportedError(
                f"{reduce.value} has no meaning for complex tensors ({tensor.dtype})",
                hint="reduce the real and imaginary parts (torch.view_as_real) yourself",
            )
        floating = tensor.dtype.is_floating_point or tensor.dtype.is_complex
        if reduce in self.int_only_ops and floating:
            raise CommBackendNotSupportedError(
                f"{reduce.value} needs an integer tensor, got {tensor.dtype}",
                hint="bitwise reductions apply to integer dtypes only",
            )
        if reduce in self.float_only_ops and not floating:
            raise CommBackendNotSupportedError(
                f"{self.backend} can {reduce.value} only floating-point tensors, "
                f"got {tensor.dtype}",
                hint="reduce with sum and divide, or cast to a floating-point dtype",
            )


FLOAT8 = frozenset(
    {torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz}
)
"""The float8 dtypes, which no communication backend here reduces."""
WIDE_UNSIGNED = frozenset({torch.uint16, torch.uint32, torch.uint64})
"""Unsigned dtypes wider than uint8, which torch maps to no gloo, NCCL or HCCL type."""
_UNORDERED = frozenset({ReduceOp.MIN, ReduceOp.MAX, ReduceOp.PROD})
"""Reductions torch.distributed refuses on complex tensors."""

GLOO = CommSpec(
    backend="gloo",
    reduce_ops=frozenset(ReduceOp),
    float_only_ops=frozenset({ReduceOp.AVG}),
    int_only_ops=frozenset({ReduceOp.BAND, ReduceOp.BOR, ReduceOp.BXOR}),
    unsupported_dtypes=FLOAT8 | WIDE_UNSIGNED | {torch.int16},
    waits_per_op=True,
    minmax_skips_nan=True,
)
"""gloo (CPU tensors): every ReduceOp, bitwise on integers only, avg on floating point only;
no int16 or unsigned dtype wider than uint8."""


@dataclass(frozen=True)
class WorldConfig:
    """Where this process sits in its world, and where the ranks meet."""

    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int | None = None

    @classmethod
    def resolve(
        cls,
        environ: Mapping[str, str],
        *,
        rank: int | None = None,
        world_size: int | None = None,
        master_addr: str | None = None,
        master_port: int | None = None,
    ) -> WorldConfig:
        """Explicit values first, then the launcher's environment, then a world of one."""
        size = world_size if world_size is not None else _env_int(environ, "WORLD_SIZE", 1)
        me = rank if rank is not None else _env_int(environ, "RANK", 0)
        if size < 1:
            raise InvalidArgumentError(
                f"world_size must be at least 1, got {size}",
                hint="pass world_size >= 1, or set WORLD_SIZE in the launcher's environment",
            )
        if not 0 <= me < size:
            raise InvalidArgumentError(
                f"rank {me} is outside a world of {size}", hint=f"use a rank in 0..{size - 1}"
            )
        addr = master_addr if master_addr is not None else environ.get("MASTER_ADDR", "127.0.0.1")
        port = master_port if master_port is not None else _env_int(environ, "MASTER_PORT", 0)
        if size > 1 and not 0 < port < 65536:
            raise InvalidArgumentError(
                f"a world of {size} ranks needs a rendezvous port, got {port}",
                hint="set MASTER_PORT (torchrun does) or pass master_port",
            )
        return cls(me, size, addr, port or None)


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    text = environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise InvalidArgumentError(
            f"environment variable {name}={text!r} is not an int",
            hint=f"set {name} to an integer or unset it",
        ) from None


class _Lease:
    """The default process group as providers of this process share it."""

    lock = threading.Lock()
    users = 0
    owned = False
    broken: str | None = None


class ProcessGroup:
    """This process's rank of the default torch.distributed group, for one provider."""

    def __init__(
        self,
        spec: CommSpec,
        world: WorldConfig,
        device: torch.device,
        *,
        timeout: float,
        validate: bool,
    ) -> None:
        self._timeout = check_timeout(timeout, "collective_timeout")
        self._spec = spec
        self._device = device
        self._validate = validate
        self._closed = False
        with _Lease.lock:
            if _Lease.broken is not None:
                raise CommGroupBrokenError(
                    f"this process's process group is broken: {_Lease.broken}",
                    hint="restart the process to create a new group",
                )
            if dist.is_initialized():
                _check_existing(spec, world)
            else:
                _init_group(spec, world, self._timeout, device)
                _Lease.owned = True
            _Lease.users += 1
        self._rank = dist.get_rank()
        self._world_size = dist.get_world_size()

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def spec(self) -> CommSpec:
        return self._spec

    def close(self) -> None:
        """Leave the group; the last provider to leave destroys it if it created it."""
        if self._closed:
            return
        self._closed = True
        with _Lease.lock:
            _Lease.users -= 1
            if _Lease.users == 0 and _Lease.owned and _Lease.broken is None:
                dist.destroy_process_group()
                _Lease.owned = False

    # Collectives.

    def all_reduce(
        self, tensor: torch.Tensor, op: ReduceOp | str, timeout: float | None
    ) -> torch.Tensor:
        reduce = coerce(ReduceOp, op, "reduce op")
        seconds = self._prepare(CollectiveOp.ALL_REDUCE, tensor, reduce, timeout)
        torch_op = _TORCH_OPS[reduce]
        nan = self._nan_mask(tensor, reduce)
        self._run(
            CollectiveOp.ALL_REDUCE,
            lambda: dist.all_reduce(tensor, op=torch_op, async_op=True),
            seconds,
        )
        if nan is not None:
            self._restore_nan(CollectiveOp.ALL_REDUCE, tensor, nan, seconds)
        return tensor

    def all_gather(self, tensor: torch.Tensor, timeout: float | None) -> torch.Tensor:
        seconds = self._prepare(CollectiveOp.ALL_GATHER, tensor, None, timeout)
        out = tensor.new_empty((self._world_size * tensor.shape[0], *tensor.shape[1:]))
        self._run(
            CollectiveOp.ALL_GATHER,
            lambda: _all_gather_single(out, tensor, async_op=True),
            seconds,
        )
        return out

    def reduce_scatter(
        self, tensor: torch.Tensor, op: ReduceOp | str, timeout: float | None
    ) -> torch.Tensor:
        reduce = coerce(ReduceOp, op, "reduce op")
        self._check_tensor(CollectiveOp.REDUCE_SCATTER, tensor)
        if tensor.shape[0] % self._world_size:
            raise InvalidArgumentError(
                f"reduce_scatter needs dimension 0 ({tensor.shape[0]}) divisible by the world "
                f"size ({self._world_size})",
                hint="pad the tensor to a multiple of the world size",
            )
        seconds = self._prepare(CollectiveOp.REDUCE_SCATTER, tensor, reduce, timeout)
        out = tensor.new_empty((tensor.shape[0] // self._world_size, *tensor.shape[1:]))
        torch_op = _TORCH_OPS[reduce]
        nan = self._nan_mask(tensor, reduce)
        self._run(
            CollectiveOp.REDUCE_SCATTER,
            lambda: _reduce_scatter_single(out, tensor, op=torch_op, async_op=True),
            seconds,
        )
        if nan is not None:
            self._restore_nan(CollectiveOp.REDUCE_SCATTER, out, nan, seconds)
        return out

    def broadcast(self, tensor: torch.Tensor, src: int, timeout: float | None) -> torch.Tensor:
        self._check_rank(src, "src", allow_self=True)
        seconds = self._prepare(CollectiveOp.BROADCAST, tensor, None, timeout, peer=src)
        self._run(
            CollectiveOp.BROADCAST,
            lambda: dist.broadcast(tensor, src=src, async_op=True),
            seconds,
        )
        return tensor

    def send(self, tensor: torch.Tensor, dst: int, timeout: float | None) -> None:
        self._check_rank(dst, "dst", allow_self=False)
        seconds = self._point_to_point(CollectiveOp.SEND, tensor, dst, timeout)
        self._run(CollectiveOp.SEND, lambda: dist.isend(tensor, dst=dst), seconds)

    def recv(self, tensor: torch.Tensor, src: int, timeout: float | None) -> torch.Tensor:
        self._check_rank(src, "src", allow_self=False)
        seconds = self._point_to_point(CollectiveOp.RECV, tensor, src, timeout)
        self._run(CollectiveOp.RECV, lambda: dist.irecv(tensor, src=src), seconds)
        return tensor

    def barrier(self, timeout: float | None) -> None:
        seconds = self._prepare(CollectiveOp.BARRIER, None, None, timeout)
        self._run(CollectiveOp.BARRIER, lambda: dist.barrier(async_op=True), seconds)

    def _nan_mask(self, tensor: torch.Tensor, reduce: ReduceOp) -> torch.Tensor | None:
        """Where ``tensor`` is NaN, as uint8, for a min or max that would skip it; else None."""
        if (
            self._spec.minmax_skips_nan
            and reduce in (ReduceOp.MIN, ReduceOp.MAX)
            and tensor.dtype.is_floating_point
        ):
            return tensor.isnan().to(torch.uint8)
        return None

    def _restore_nan(
        self, op: CollectiveOp, result: torch.Tensor, nan: torch.Tensor, seconds: float
    ) -> None:
        """Make ``result`` NaN wherever a rank's input was (torch's min and max propagate it):
        the inputs' NaN masks, reduced as ``op`` reduced the inputs, with max."""
        anywhere = nan if op is CollectiveOp.ALL_REDUCE else nan.new_empty(result.shape)

        def issue() -> dist.Work | None:
            if op is CollectiveOp.REDUCE_SCATTER:
                return _reduce_scatter_single(anywhere, nan, op=dist.ReduceOp.MAX, async_op=True)
            work: dist.Work | None = dist.all_reduce(anywhere, dist.ReduceOp.MAX, async_op=True)
            return work

        self._run(op, issue, seconds)
        result.masked_fill_(anywhere.bool(), float("nan"))

    # Checks.

    def _check_usable(self, op: CollectiveOp, timeout: float | None) -> float:
        """The op's timeout in seconds, once the group is known to be usable."""
        if self._closed:
            raise CommGroupBrokenError(
                f"{op.value} on a closed provider", hint="create a new backend"
            )
        if _Lease.broken is not None:
            raise CommGroupBrokenError(
                f"the process group is unusable: {_Lease.broken}",
                hint="restart the process to create a new group",
            )
        if timeout is None:
            return self._timeout
        seconds = check_timeout(timeout)
        if seconds > self._timeout and not self._spec.waits_per_op:
            raise InvalidArgumentError(
                f"{op.value} timeout {seconds:g} s is longer than collective_timeout "
                f"({self._timeout:g} s), which {self._spec.backend} enforces on every op",
                hint="create the provider with a longer collective_timeout",
            )
        return seconds

    def _check_tensor(self, op: CollectiveOp, tensor: object) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor):
            raise InvalidArgumentError(
                f"{op.value} needs a torch.Tensor, got {type(tensor).__name__}",
                hint="pass a torch.Tensor on this provider's device",
            )
        if tensor.device != self._device:
            raise InvalidArgumentError(
                f"{op.value} got a tensor on {tensor.device}; this provider's device is "
                f"{self._device}",
                hint=f"move it first: tensor.to({str(self._device)!r})",
            )
        if tensor.dim() == 0 or not tensor.is_contiguous():
            raise InvalidArgumentError(
                f"{op.value} needs a contiguous tensor of at least one dimension",
                hint="use tensor.reshape(1) or tensor.contiguous()",
            )
        if tensor.is_conj() or tensor.is_neg():
            raise InvalidArgumentError(
                f"{op.value} got a lazily conjugated or negated view",
                hint="materialise it first: tensor.resolve_conj().resolve_neg()",
            )
        return tensor

    def _check_rank(self, rank: object, what: str, *, allow_self: bool) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise InvalidArgumentError(
                f"{what} must be an int rank, got {rank!r}",
                hint=f"pass {what} as an int in 0..{self._world_size - 1}",
            )
        if not 0 <= rank < self._world_size or (rank == self._rank and not allow_self):
            others = "any rank" if allow_self else "another rank"
            raise InvalidArgumentError(
                f"{what}={rank} is not a valid peer of rank {self._rank} in a world of "
                f"{self._world_size}",
                hint=f"use {others} in 0..{self._world_size - 1}",
            )

    def _prepare(
        self,
        op: CollectiveOp,
        tensor: torch.Tensor | None,
        reduce: ReduceOp | None,
        timeout: float | None,
        peer: int = -1,
    ) -> float:
        """Check the op on this rank, then (when validating) across ranks; its seconds."""
        seconds = self._check_usable(op, timeout)
        if tensor is not None:
            self._spec.check(op, self._check_tensor(op, tensor), reduce)
        if not self._validate or self._world_size == 1:
            return seconds
        mine = _signature(op, tensor, reduce, peer, self._device)
        every = mine.new_empty(self._world_size * mine.numel())
        self._run(op, lambda: _all_gather_single(every, mine, async_op=True), seconds)
        for rank, theirs in enumerate(every.view(self._world_size, -1)):
            if not torch.equal(theirs, mine):
                raise CommRankMismatchError(
                    f"rank {self._rank} called {_describe(mine)} but rank {rank} called "
                    f"{_describe(theirs)}",
                    hint="every rank must call the same collective with the same shape, dtype "
                    "and op",
                )
        return seconds

    def _point_to_point(
        self, op: CollectiveOp, tensor: torch.Tensor, peer: int, timeout: float | None
    ) -> float:
        seconds = self._check_usable(op, timeout)
        self._spec.check(op, self._check_tensor(op, tensor), None)
        if not self._validate:
            return seconds
        mine = _signature(CollectiveOp.SEND, tensor, None, -1, self._device)
        theirs = torch.empty_like(mine)
        if op is CollectiveOp.SEND:
            self._run(op, lambda: dist.isend(mine, dst=peer), seconds)
            self._run(op, lambda: dist.irecv(theirs, src=peer), seconds)
        else:
            self._run(op, lambda: dist.irecv(theirs, src=peer), seconds)
            self._run(op, lambda: dist.isend(mine, dst=peer), seconds)
        if not torch.equal(theirs, mine):
            raise CommRankMismatchError(
                f"rank {self._rank} exchanges {_describe(mine)} with rank {peer}, which "
                f"exchanges {_describe(theirs)}",
                hint="send and recv tensors of the same shape and dtype",
            )
        return seconds

    def _run(
        self,
        op: CollectiveOp,
        issue: Callable[[], dist.Work | None],
        seconds: float,
    ) -> None:
        """Issue one asynchronous op and wait for it; a failure or timeout breaks the group."""
        start = time.monotonic()
        try:
            work = issue()
            if work is not None:
                work.wait(timeout=datetime.timedelta(seconds=seconds))
        except RuntimeError as exc:
            waited = time.monotonic() - start
            timed_out = "timed out" in str(exc).lower() or waited >= seconds
            reason = (
                f"{op.value} timed out after {waited:.3g} s (its timeout: {seconds:g} s)"
                if timed_out
                else f"{op.value} failed: {exc}"
            )
            _Lease.broken = reason
            p2p = op in (CollectiveOp.SEND, CollectiveOp.RECV) and not timed_out
            error = CommTimeoutError if timed_out else CommError
            raise error(
                f"{reason} on rank {self._rank} of {self._world_size}",
                hint="check that every rank reaches the same collective; the group is now "
                "unusable, restart the process",
                code=ErrorCode.COMM_P2P_FAILED if p2p else None,
            ) from exc


def _check_existing(spec: CommSpec, world: WorldConfig) -> None:
    backend = dist.get_backend()
    if backend != spec.backend:
        raise InvalidArgumentError(
            f"the process group already uses {backend}; this device needs {spec.backend}",
            hint=f"initialise torch.distributed with backend={spec.backend!r}",
        )
    rank, size = dist.get_rank(), dist.get_world_size()
    if (rank, size) != (world.rank, world.world_size):
        raise InvalidArgumentError(
            f"the process group is rank {rank} of {size}; asked for rank {world.rank} of "
            f"{world.world_size}",
            hint="one process belongs to one world; omit rank and world_size to join it",
        )


def _init_group(spec: CommSpec, world: WorldConfig, timeout: float, device: torch.device) -> None:
    delta = datetime.timedelta(seconds=timeout)  # the rendezvous's
    store: Store
    if world.world_size == 1:
        store = HashStore()
    else:
        assert world.master_port is not None  # WorldConfig.resolve guarantees it
        try:
            store = TCPStore(
                world.master_addr,
                world.master_port,
                world.world_size,
                is_master=world.rank == 0,
                timeout=delta,
            )
        except (RuntimeError, OSError) as exc:
            raise CommError(
                f"rank {world.rank} could not reach the rendezvous at "
                f"{world.master_addr}:{world.master_port}: {exc}",
                hint="check MASTER_ADDR and MASTER_PORT, and that rank 0 is running",
            ) from exc
    dist.init_process_group(
        spec.backend,
        store=store,
        rank=world.rank,
        world_size=world.world_size,
        timeout=datetime.timedelta(seconds=MAX_TIMEOUT_S) if spec.waits_per_op else delta,
        device_id=device if spec.binds_device else None,
    )


def _signature(
    op: CollectiveOp,
    tensor: torch.Tensor | None,
    reduce: ReduceOp | None,
    peer: int,
    device: torch.device,
) -> torch.Tensor:
    """The op's fields as int64s: up to :data:`_MAX_DIMS` dimensions of the shape as they are
    (the first and last halves of a longer one), and all of them by their checksum."""
    dims = () if tensor is None else tuple(tensor.shape)
    half = _MAX_DIMS // 2
    listed = dims if len(dims) <= _MAX_DIMS else dims[:half] + dims[-half:]
    shape = [*listed, *[-1] * (_MAX_DIMS - len(listed))]
    fields = [
        list(CollectiveOp).index(op),
        -1 if reduce is None else list(ReduceOp).index(reduce),
        -1 if tensor is None else zlib.crc32(str(tensor.dtype).encode()),
        -1 if tensor is None else tensor.dim(),
        zlib.crc32(str(dims).encode()),
        peer,
        *shape,
    ]
    return torch.tensor(fields, dtype=torch.int64, device=device)


_MAX_DIMS = 8


def _describe(signature: torch.Tensor) -> str:
    op, reduce, dtype, ndim, _, peer, *shape = (int(v) for v in signature.tolist())
    name = list(CollectiveOp)[op].value
    if ndim < 0:
        return f"{name}()"
    dtypes = {zlib.crc32(str(d).encode()): str(d) for d in _KNOWN_DTYPES}
    if ndim > _MAX_DIMS:
        half = _MAX_DIMS // 2
        dims = ", ".join(map(str, shape[:half])) + ", ..., " + ", ".join(map(str, shape[half:]))
        text = f"{name}(shape=({dims}) of {ndim} dimensions"
    else:
        text = f"{name}(shape={tuple(shape[:ndim])}"
    text += f", dtype={dtypes.get(dtype, '?')}"
    if reduce >= 0:
        text += f", op={list(ReduceOp)[reduce].value}"
    if peer >= 0:
        text += f", src={peer}"
    return text + ")"


_KNOWN_DTYPES = (
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
