"""The cpu backend's conformance target: ranks are processes of a real gloo world.

``CpuTarget`` makes single providers in this process and, for the collective checks, starts a
world of spawned processes, one per rank, that meet over a TCP rendezvous on 127.0.0.1. Each
rank reports its outcome through a pipe, then stays connected until every rank has reported,
so a rank that skips a collective leaves the others to time out rather than to see it leave.

``TorchTensors``, the tensor adapter of every torch backend's target (cpu, cuda, ascend), also
gives the kit its oracles for the standard ops (:func:`standard_oracle`): the torch layer's
float64 references and input generators (:func:`.kernels.standard_kernels`), whatever the
provider has registered.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection

import torch

from sagellm_backend.dtypes import DType
from sagellm_backend.errors import DeadlineExceededError, InvalidArgumentError
from sagellm_backend.factory import OptionValue
from sagellm_backend.protocols import BackendProvider
from sagellm_backend.testing.target import (
    ConformanceTarget,
    OpOracle,
    RankFn,
    RankOutcome,
    run_rank,
)
from sagellm_backend.torch_backend.cpu import create_cpu_backend
from sagellm_backend.torch_backend.dtypes import KV_DTYPES, to_torch_dtype
from sagellm_backend.torch_backend.kernels import KERNEL_DTYPES, compare, standard_kernels
from sagellm_backend.torch_backend.provider import TorchBackendProvider

__all__ = ["CpuTarget", "TorchTensors", "standard_oracle"]

_RELEASE_TIMEOUT_S = 120.0


class TorchTensors:
    """Builds 1-D torch tensors on a provider's device and reads them back; the oracles of the
    standard ops, on that device."""

    dtypes = frozenset(KV_DTYPES)

    def tensor(
        self, provider: BackendProvider[torch.Tensor], values: Sequence[float], dtype: DType
    ) -> torch.Tensor:
        return torch.tensor(list(values), dtype=to_torch_dtype(dtype), device=_device(provider))

    def values(self, tensor: torch.Tensor) -> list[float]:
        return [float(v) for v in tensor.tolist()]

    def oracle(self, provider: BackendProvider[torch.Tensor], name: str) -> OpOracle | None:
        return standard_oracle(name, _device(provider))


def standard_oracle(name: str, device: torch.device) -> OpOracle | None:
    """The torch layer's float64 reference and input generator of the standard op ``name``
    (head sizes 64 and 128, GQA and MQA, variable lengths, NaN in every unused slot), with
    inputs on ``device``; None for a name that is not a standard kernel op."""
    row = standard_kernels(device).get(name)
    if row is None:
        return None
    _, reference, make_inputs = row
    return OpOracle(name, reference, make_inputs, compare, frozenset(KERNEL_DTYPES))


def _device(provider: BackendProvider[torch.Tensor]) -> torch.device:
    if not isinstance(provider, TorchBackendProvider):
        raise InvalidArgumentError(
            f"{provider!r} is not a torch backend",
            hint="give a target of another tensor type its own TensorAdapter",
        )
    return provider.torch_device


class CpuTarget(ConformanceTarget[torch.Tensor]):
    """cpu providers built with ``options``; collectives on worlds of ``world_sizes`` processes."""

    tensors = TorchTensors()

    def __init__(
        self, *, world_sizes: Sequence[int] = (2, 4), name: str = "cpu", **options: OptionValue
    ) -> None:
        sizes = tuple(world_sizes)
        if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
            raise InvalidArgumentError(
                f"world_sizes must be positive ints, got {world_sizes!r}",
                hint="pass a non-empty tuple of ints of at least 1, e.g. world_sizes=(2, 4)",
            )
        self.name = name
        self.options = {"num_blocks": 256, "host_num_blocks": 256, **options}
        self._world_sizes = sizes

    def make_provider(self) -> BackendProvider[torch.Tensor]:
        provider: BackendProvider[torch.Tensor] = create_cpu_backend(**self.options)
        return provider

    def make_rank_provider(
        self, rank: int, world_size: int, port: int
    ) -> BackendProvider[torch.Tensor]:
        """The provider of ``rank`` in a world meeting on 127.0.0.1:``port``, in its process.

        A device wheel's target subclasses this one and overrides it (and make_provider) to run
        its worlds the same way.
        """
        provider: BackendProvider[torch.Tensor] = create_cpu_backend(
            **self.options,
            rank=rank,
            world_size=world_size,
            master_addr="127.0.0.1",
            master_port=port,
        )
        return provider

    @property
    def launches_worlds(self) -> bool:
        return True

    def world_sizes(self) -> tuple[int, ...]:
        return self._world_sizes

    def run_world(
        self, world_size: int, fn: RankFn[torch.Tensor], *, timeout: float
    ) -> list[RankOutcome]:
        context = multiprocessing.get_context("spawn")
        port = _free_port()
        ranks = []
        for rank in range(world_size):
            parent, child = context.Pipe()
            process = context.Process(
                target=_rank_main,
                args=(self, fn, rank, world_size, port, child),
                daemon=True,
            )
            process.start()
            child.close()
            ranks.append((process, parent))
        deadline = time.monotonic() + timeout
        outcomes = []
        try:
            for rank, (_, conn) in enumerate(ranks):
                outcomes.append(_receive(conn, rank, deadline, timeout))
            for _, conn in ranks:
                conn.send("release")
        finally:
            for process, conn in ranks:
                process.join(timeout=10.0)
                if process.is_alive():
                    process.kill()
                    process.join()
                conn.close()
        return outcomes


def _receive(conn: Connection, rank: int, deadline: float, timeout: float) -> RankOutcome:
    try:
        if conn.poll(max(0.0, deadline - time.monotonic())):
            outcome: RankOutcome = conn.recv()
            return outcome
    except (EOFError, OSError):
        return RankOutcome(rank, error=RuntimeError(f"rank {rank} died before reporting"))
    return RankOutcome(
        rank,
        error=DeadlineExceededError(
            f"rank {rank} was still running after {timeout} s",
            hint="find the collective that rank waits in and make every rank reach it, "
            "or raise the check's timeout",
        ),
    )


def _rank_main(
    target: CpuTarget,
    fn: RankFn[torch.Tensor],
    rank: int,
    world_size: int,
    port: int,
    conn: Connection,
) -> None:
    """One rank: build the provider, run ``fn``, report, wait for the release, exit."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        provider = target.make_rank_provider(rank, world_size, port)
    except Exception as exc:
        outcome = RankOutcome(rank, error=exc, seconds=time.perf_counter() - start)
    else:
        outcome = run_rank(rank, fn, target, provider)
    try:
        conn.send(outcome)
    except (pickle.PicklingError, TypeError, AttributeError):
        error = RuntimeError(f"{type(outcome.error).__name__}: {outcome.error}")
        conn.send(RankOutcome(rank, value=None, error=error, seconds=outcome.seconds))
    conn.poll(_RELEASE_TIMEOUT_S)
    # A rank's group may hold a collective that timed out and cannot be cancelled; leave
    # without tearing it down.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
