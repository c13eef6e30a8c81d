"""What a backend author supplies to the kit: a ConformanceTarget.

A target makes providers, optionally adapts its tensor type (builds tensors for the collective
checks, and supplies the kit's own oracles for the standard ops), and runs a function on every
rank of a world. The kit is generic in the tensor type ``T`` and in how
ranks are launched: the mock runs ranks as threads in one process, a torch backend as processes.
Rank functions the kit passes to :meth:`ConformanceTarget.run_world` are module-level functions
(or ``functools.partial`` of them) with picklable arguments, so a process launcher can ship them.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from sagellm_backend.dtypes import DType
from sagellm_backend.errors import InvalidArgumentError
from sagellm_backend.kernels import Comparator, InputMaker, KernelSpec
from sagellm_backend.protocols import BackendProvider

__all__ = [
    "ConformanceTarget",
    "OpOracle",
    "RankFn",
    "RankOutcome",
    "TensorAdapter",
    "run_rank",
]

T = TypeVar("T")

RankFn = Callable[["ConformanceTarget[T]", BackendProvider[T]], object]
"""``fn(target, provider)`` run on one rank; its return value must be picklable."""


@dataclass(frozen=True)
class RankOutcome:
    """What one rank's function returned or raised, and how long it ran."""

    rank: int
    value: object = None
    error: BaseException | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class OpOracle:
    """The kit's own check of the standard op ``name``: a reference, an input generator and a
    comparator that come from the target, never from the backend under test."""

    name: str
    reference: Callable[..., Any]
    make_inputs: InputMaker
    compare: Comparator
    dtypes: frozenset[DType]
    """The dtypes the input generator makes inputs in."""

    def check(self, kernel: Callable[..., Any], seed: int, dtype: DType) -> None:
        """AssertionError unless ``kernel`` matches the reference on the inputs of ``seed``
        (arguments the op writes into compared too, as :meth:`KernelSpec.check` does)."""
        spec = KernelSpec(
            self.name,
            kernel,
            reference=self.reference,
            make_inputs=self.make_inputs,
            compare=self.compare,
        )
        spec.check(seed, dtype)


class TensorAdapter(Protocol[T]):
    """A backend's tensor type as the kit sees it: 1-D tensors for the collective checks, and
    the oracles the standard-op checks compare each claimed op with."""

    @property
    def dtypes(self) -> frozenset[DType]:
        """Dtypes this adapter can build tensors in."""
        ...

    def tensor(self, provider: BackendProvider[T], values: Sequence[float], dtype: DType) -> T:
        """A 1-D tensor of ``values`` in ``dtype`` on ``provider``'s device."""
        ...

    def values(self, tensor: T) -> list[float]:
        """The elements of a 1-D tensor, as host numbers."""
        ...

    def oracle(self, provider: BackendProvider[T], name: str) -> OpOracle | None:
        """The kit's oracle for the standard kernel op ``name`` on ``provider``'s device, or
        None where there is none (the op is then checked against the backend's own reference)."""
        ...


class ConformanceTarget(ABC, Generic[T]):
    """A backend under test, as the kit sees it. Subclass and implement :meth:`make_provider`.

    Without :attr:`tensors` the checks that move tensor data through collectives are skipped
    (with that reason), and the standard ops are checked against the backend's own references
    only. Without a :meth:`run_world` override, collectives run on the world the
    provider already belongs to: one rank here, or every rank of a job whose processes all run
    the kit at once (``torchrun ... sagellm-backend check SPEC``).
    """

    name: str = "backend"
    tensors: TensorAdapter[T] | None = None
    exhaustion_limit_bytes: int | None = 1 << 30
    """The exhaustion check allocates at most this much (None: no limit, for a preallocated
    pool); a larger pool skips the check with that reason."""

    @abstractmethod
    def make_provider(self) -> BackendProvider[T]:
        """A fresh provider; the kit closes it when the check that made it ends."""

    @property
    def launches_worlds(self) -> bool:
        """True if :meth:`run_world` starts worlds of its own (so a rank may be left out)."""
        return False

    def world_sizes(self) -> tuple[int, ...]:
        """World sizes the collective checks run at; by default the provider's own."""
        provider = self.make_provider()
        try:
            return (provider.world_size,)
        finally:
            provider.close()

    def run_world(self, world_size: int, fn: RankFn[T], *, timeout: float) -> list[RankOutcome]:
        """Run ``fn`` on every rank of a world of ``world_size``; one outcome per rank run here.

        A rank still running after ``timeout`` seconds is reported with a DeadlineExceededError.
        The default runs ``fn`` on this process's rank of the provider's own world, where each
        collective the kit issues carries its own timeout.
        """
        provider = self.make_provider()
        try:
            if world_size != provider.world_size:
                raise InvalidArgumentError(
                    f"target {self.name!r} cannot start a world of {world_size} ranks; "
                    f"its provider belongs to one of {provider.world_size}",
                    hint="override ConformanceTarget.run_world to launch worlds",
                )
            return [run_rank(provider.rank, fn, self, provider)]
        finally:
            provider.close()


def run_rank(
    rank: int, fn: RankFn[T], target: ConformanceTarget[T], provider: BackendProvider[T]
) -> RankOutcome:
    start = time.perf_counter()
    try:
        value = fn(target, provider)
    except Exception as exc:
        return RankOutcome(rank, error=exc, seconds=time.perf_counter() - start)
    return RankOutcome(rank, value=value, seconds=time.perf_counter() - start)
