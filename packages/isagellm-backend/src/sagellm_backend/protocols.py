"""Structural interfaces every backend satisfies. No logic lives here.

The protocols are generic in the tensor type ``T``: torch backends are
``BackendProvider[torch.Tensor]``, the mock is ``BackendProvider[MockTensor]``. A class
satisfies them by shape alone; no inheritance is needed.

Execution model, as on a real device: operations that touch device data (KV copy and migrate,
writes into blocks, collectives, kernels) are queued on the current stream and run in order;
host-side calls (allocation, freeing, queries, synchronisation) run at once. Reading data back
to the host (``kv_block_read``) waits for the current stream only, so data produced on another
stream needs an event or stream wait first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Protocol, TypeVar, runtime_checkable

from sagellm_backend.capability import CapabilityDescriptor
from sagellm_backend.device import MemoryStats
from sagellm_backend.dtypes import DType, KernelKind, ReduceOp
from sagellm_backend.kernels import Comparator, InputMaker, KernelSpec
from sagellm_backend.kv import KVBlock, KVLayout

__all__ = [
    "BackendProvider",
    "CollectiveOps",
    "Event",
    "Graph",
    "GraphCapture",
    "KVBlockManager",
    "KernelRegistry",
    "Stream",
    "StreamOps",
]

T = TypeVar("T")


@runtime_checkable
class Event(Protocol):
    """A marker in a stream's work; optionally timestamped."""

    @property
    def enable_timing(self) -> bool: ...

    def record(self, stream: Stream | None = None) -> None:
        """Mark the point reached by ``stream`` (default: the current stream)."""

    def query(self) -> bool:
        """True once all work before the recorded point has completed (or never recorded)."""
        ...

    def synchronize(self) -> None:
        """Block the host until the recorded point is reached."""

    def elapsed_ms(self, start: Event) -> float:
        """Milliseconds from ``start`` to this event; both recorded, both with timing enabled."""
        ...


@runtime_checkable
class Stream(Protocol):
    """An ordered queue of device work. Usable as the current stream in a ``with`` block."""

    def record_event(self, event: Event | None = None) -> Event:
        """Record ``event`` (a new timing event if None) at the current end of this stream."""
        ...

    def wait_event(self, event: Event) -> None:
        """Make later work on this stream wait for ``event``; the host does not wait."""

    def wait_stream(self, other: Stream) -> None:
        """Make later work on this stream wait for all work queued on ``other`` so far."""

    def query(self) -> bool:
        """True if all work queued so far has completed."""
        ...

    def synchronize(self) -> None:
        """Block the host until all work queued so far has completed."""

    def __enter__(self) -> Stream: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class StreamOps(Protocol):
    """Streams, events, synchronisation and memory of one device."""

    def create_stream(self) -> Stream: ...

    def create_event(self, enable_timing: bool = True) -> Event: ...

    def current_stream(self) -> Stream: ...

    def synchronize(self) -> None:
        """Block the host until all work on every stream of this device has completed."""

    def memory_stats(self) -> MemoryStats: ...


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


@runtime_checkable
class KVBlockManager(Protocol):
    """KV blocks: ceil(num_tokens / tokens_per_block) pages of the provider's KV layout.

    Batched forms do all or nothing: if one item is invalid, none is applied.
    """

    @property
    def kv_layout(self) -> KVLayout: ...

    def kv_block_alloc(self, num_tokens: int, dtype: DType | str) -> KVBlock: ...

    def kv_block_free(self, block: KVBlock) -> None: ...

    def kv_block_copy(self, src: KVBlock, dst: KVBlock) -> None:
        """Copy every page of ``src`` into ``dst`` (same page count and dtype), on the stream."""

    def kv_block_migrate(self, block: KVBlock, target_device: str) -> KVBlock:
        """Move ``block`` to ``target_device`` (a device of this provider, or "host").

        Returns the new handle; the source block is released.
        """
        ...

    def kv_blocks_alloc(self, num_tokens: Sequence[int], dtype: DType | str) -> list[KVBlock]: ...

    def kv_blocks_free(self, blocks: Iterable[KVBlock]) -> None: ...

    def kv_blocks_copy(
        self, pairs: Iterable[tuple[KVBlock, KVBlock]], *, stream: Stream | None = None
    ) -> Event:
        """Copy many (src, dst) pairs as one operation on ``stream``; returns its completion."""
        ...

    def kv_blocks_migrate(
        self, blocks: Iterable[KVBlock], target_device: str, *, stream: Stream | None = None
    ) -> tuple[list[KVBlock], Event]:
        """Move many blocks as one operation on ``stream``; returns new handles and completion."""
        ...

    def kv_block_write(self, block: KVBlock, data: bytes) -> None:
        """Fill ``block`` with ``data`` (exactly its size in bytes), queued on the stream."""

    def kv_block_read(self, block: KVBlock) -> bytes:
        """The block's bytes, once the current stream's work before this call has run."""
        ...


@runtime_checkable
class KernelRegistry(Protocol):
    """Named kernels; an existing name is replaced only with ``override=True``."""

    def register_kernel(
        self,
        name: str,
        impl: Callable[..., Any],
        *,
        kind: KernelKind | str | None = None,
        dtypes: Iterable[DType | str] = (),
        reference: Callable[..., Any] | None = None,
        make_inputs: InputMaker | None = None,
        compare: Comparator | None = None,
        override: bool = False,
    ) -> KernelSpec: ...

    def get_kernel(self, name: str) -> Callable[..., Any]: ...

    def kernel_spec(self, name: str) -> KernelSpec: ...

    def list_kernels(self, kind: KernelKind | str | None = None) -> list[KernelSpec]: ...


@runtime_checkable
class Graph(Protocol):
    """A captured sequence of device operations."""

    def replay(self) -> None:
        """Queue the captured operations again, on the stream they were captured on."""


@runtime_checkable
class GraphCapture(Protocol):
    """Graph capture (capability ``has_graph_exec``). Host-side calls during capture are refused."""

    def capture_graph(self, stream: Stream | None = None) -> AbstractContextManager[Graph]:
        """Capture the device operations issued inside the ``with`` block into a Graph."""
        ...


@runtime_checkable
class BackendProvider(
    StreamOps, CollectiveOps[T], KVBlockManager, KernelRegistry, GraphCapture, Protocol[T]
):
    """The whole device surface an engine talks to. Safe to call from several threads."""

    @property
    def kind(self) -> str:
        """Backend kind, such as "mock" or "cuda"."""
        ...

    @property
    def device(self) -> str:
        """Device this provider drives, such as "cuda:0"."""
        ...

    def capability(self) -> CapabilityDescriptor: ...

    def close(self) -> None:
        """Release the provider's device memory and process group; later calls are refused."""
