"""Typing tests for the protocols: checked by mypy (``warn_unused_ignores``), never run.

A correct third-party provider, written without importing or subclassing anything of ours but
the value types, satisfies ``BackendProvider[Buffer]``; providers with a wrong signature are
rejected, which the deliberate ``# type: ignore[...]`` lines prove (an unneeded one is an error).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from typing_extensions import assert_type

from sagellm_backend import (
    BackendProvider,
    CapabilityDescriptor,
    CollectiveOps,
    DType,
    Event,
    Graph,
    KernelKind,
    KernelSpec,
    KVBlock,
    KVBlockManager,
    KVLayout,
    MemoryStats,
    ReduceOp,
    Stream,
)
from sagellm_backend.kernels import Comparator, InputMaker


class Buffer:
    """The third party's own tensor type."""


class AcmeEvent:
    @property
    def enable_timing(self) -> bool:
        return True

    def record(self, stream: Stream | None = None) -> None: ...

    def query(self) -> bool:
        return True

    def synchronize(self) -> None: ...

    def elapsed_ms(self, start: Event) -> float:
        return 0.0


class AcmeStream:
    def record_event(self, event: Event | None = None) -> Event:
        return event or AcmeEvent()

    def wait_event(self, event: Event) -> None: ...

    def wait_stream(self, other: Stream) -> None: ...

    def query(self) -> bool:
        return True

    def synchronize(self) -> None: ...

    def __enter__(self) -> AcmeStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class AcmeGraph:
    def replay(self) -> None: ...


class AcmeProvider:
    kind = "acme"
    device = "acme:0"
    rank = 0
    world_size = 1
    kv_layout = KVLayout()

    def capability(self) -> CapabilityDescriptor:
        return CapabilityDescriptor()

    def close(self) -> None: ...

    def create_stream(self) -> AcmeStream:
        return AcmeStream()

    def create_event(self, enable_timing: bool = True) -> AcmeEvent:
        return AcmeEvent()

    def current_stream(self) -> AcmeStream:
        return AcmeStream()

    def synchronize(self) -> None: ...

    def memory_stats(self) -> MemoryStats:
        return MemoryStats(0, 0, 0, 0, 0)

    def all_reduce(
        self, tensor: Buffer, op: ReduceOp | str = ReduceOp.SUM, *, timeout: float | None = None
    ) -> Buffer:
        return tensor

    def all_gather(self, tensor: Buffer, *, timeout: float | None = None) -> Buffer:
        return tensor

    def reduce_scatter(
        self, tensor: Buffer, op: ReduceOp | str = ReduceOp.SUM, *, timeout: float | None = None
    ) -> Buffer:
        return tensor

    def broadcast(self, tensor: Buffer, src: int = 0, *, timeout: float | None = None) -> Buffer:
        return tensor

    def send(self, tensor: Buffer, dst: int, *, timeout: float | None = None) -> None: ...

    def recv(self, tensor: Buffer, src: int, *, timeout: float | None = None) -> Buffer:
        return tensor

    def barrier(self, *, timeout: float | None = None) -> None: ...

    def kv_block_alloc(self, num_tokens: int, dtype: DType | str) -> KVBlock:
        return KVBlock(1, num_tokens, DType(dtype), self.device)

    def kv_block_free(self, block: KVBlock, *, after: Event | None = None) -> None: ...

    def kv_block_copy(self, src: KVBlock, dst: KVBlock) -> None: ...

    def kv_block_migrate(self, block: KVBlock, target_device: str) -> KVBlock:
        return block

    def kv_blocks_alloc(self, num_tokens: Sequence[int], dtype: DType | str) -> list[KVBlock]:
        return [self.kv_block_alloc(n, dtype) for n in num_tokens]

    def kv_blocks_free(self, blocks: Iterable[KVBlock], *, after: Event | None = None) -> None: ...

    def kv_blocks_copy(
        self, pairs: Iterable[tuple[KVBlock, KVBlock]], *, stream: Stream | None = None
    ) -> Event:
        return AcmeEvent()

    def kv_blocks_migrate(
        self, blocks: Iterable[KVBlock], target_device: str, *, stream: Stream | None = None
    ) -> tuple[list[KVBlock], Event]:
        return list(blocks), AcmeEvent()

    def kv_block_grow(self, block: KVBlock, num_tokens: int) -> KVBlock:
        return block

    def kv_blocks_grow(self, blocks: Sequence[KVBlock], num_tokens: Sequence[int]) -> list[KVBlock]:
        return list(blocks)

    def kv_block_write(self, block: KVBlock, data: bytes) -> None: ...

    def kv_block_read(self, block: KVBlock) -> bytes:
        return b""

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
    ) -> KernelSpec:
        return KernelSpec(name, impl)

    def get_kernel(self, name: str) -> Callable[..., Any]:
        return print

    def kernel_spec(self, name: str) -> KernelSpec:
        return KernelSpec(name, print)

    def list_kernels(self, kind: KernelKind | str | None = None) -> list[KernelSpec]:
        return []

    @contextmanager
    def capture_graph(self, stream: Stream | None = None) -> Iterator[Graph]:
        yield AcmeGraph()


def engine_step(backend: BackendProvider[Buffer], x: Buffer) -> Buffer:
    """Engine code written against the protocol only."""
    block = backend.kv_block_alloc(64, "fp16")
    backend.kv_block_free(block)
    return backend.all_reduce(x, ReduceOp.SUM, timeout=5.0)


good: BackendProvider[Buffer] = AcmeProvider()
assert_type(engine_step(good, Buffer()), Buffer)
assert_type(good.all_gather(Buffer()), Buffer)
assert_type(good.kv_blocks_migrate([], "host"), tuple[list[KVBlock], Event])
assert_type(good.capability().supported_dtypes, tuple[DType, ...])
kv_only: KVBlockManager = AcmeProvider()
collectives_only: CollectiveOps[Buffer] = AcmeProvider()

# The tensor type is checked: this provider works on Buffer, not on int.
wrong_tensor: BackendProvider[int] = AcmeProvider()  # type: ignore[assignment]
engine_step(AcmeProvider(), 3)  # type: ignore[arg-type]


class TakesTokensAsText(AcmeProvider):
    def kv_block_alloc(self, num_tokens: str, dtype: DType | str) -> KVBlock:  # type: ignore[override]
        return KVBlock(1, 1, DType.FP16, self.device)


class ForgetsTimeouts(AcmeProvider):
    def barrier(self) -> None: ...  # type: ignore[override]


class NoMigrate:
    """A provider missing kv_block_migrate and everything after it is not a KVBlockManager."""

    kv_layout = KVLayout()

    def kv_block_alloc(self, num_tokens: int, dtype: DType | str) -> KVBlock:
        return KVBlock(1, num_tokens, DType(dtype), "x")


wrong_signature: BackendProvider[Buffer] = TakesTokensAsText()  # type: ignore[assignment]
no_timeout: BackendProvider[Buffer] = ForgetsTimeouts()  # type: ignore[assignment]
incomplete: KVBlockManager = NoMigrate()  # type: ignore[assignment]
