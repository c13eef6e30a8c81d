"""Collectives over a provider's process group."""

from __future__ import annotations

from typing import Protocol, TypeVar, runtime_checkable

from sagellm_backend.dtypes import ReduceOp

__all__ = ["CollectiveOps"]

T = TypeVar("T")


@runtime_checkable
class CollectiveOps(Protocol[T]):
    """Collectives over the provider's process group. ``timeout`` is in seconds (None: default).

    Ops reduce in place where torch.distributed does (all_reduce, broadcast, recv) and return the
    tensor they wrote. A timed-out collective leaves the group unusable.
    """

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_reduce(
        self, tensor: T, op: ReduceOp | str = ReduceOp.SUM, *, timeout: float | None = None
    ) -> T: ...

    def all_gather(self, tensor: T, *, timeout: float | None = None) -> T:
        """Concatenation of every rank's ``tensor`` along dimension 0, in rank order."""
        ...

    def reduce_scatter(
        self, tensor: T, op: ReduceOp | str = ReduceOp.SUM, *, timeout: float | None = None
    ) -> T:
        """This rank's 1/world_size chunk (along dimension 0) of the reduction."""
        ...

    def broadcast(self, tensor: T, src: int = 0, *, timeout: float | None = None) -> T: ...

    def send(self, tensor: T, dst: int, *, timeout: float | None = None) -> None: ...

    def recv(self, tensor: T, src: int, *, timeout: float | None = None) -> T: ...

    def barrier(self, *, timeout: float | None = None) -> None: ...
