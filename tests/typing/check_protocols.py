"""Typing tests for the protocols: checked by mypy (``warn_unused_ignores``), never run.

A correct third-party provider, written without importing or subclassing anything of ours but
the value types, satisfies ``BackendProvider[Buffer]``; providers with a wrong signature are
rejected (a KV handle that is a plain ``int`` rather than a ``KVBlock``, a missing
``kv_block_info``), and so are calls of a standard op with a wrong signature and engine code
that treats a handle as anything but an opaque ``KVBlock``, which the deliberate
``# type: ignore[...]`` lines prove (an unneeded one is an error).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import torch
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
    KVBlockInfo,
    KVBlockManager,
    KVLayout,
    MemoryStats,
    ReduceOp,
    Stream,
)
from sagellm_backend.kernels import Comparator, InputMaker
from sagellm_backend.protocols.kv import BatchMetadata
from sagellm_backend.protocols.ops import (
    FusedAddRmsNorm,
    KVCacheWrite,
    PagedAttentionDecode,
    PagedAttentionPrefill,
    RmsNorm,
    RotaryCosSinCache,
    RotaryEmbedding,
    Sample,
    SiluAndMul,
)


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


def acme_rms_norm(x: Buffer, weight: Buffer, eps: float = 1e-6) -> Buffer:
    return x


class AcmeBatch:
    """Batch metadata in the third party's buffers."""

    max_seqs = max_tokens = max_pages_per_seq = 8
    num_seqs = num_tokens = max_query_len = 0
    block_tables = seq_lens = query_start_loc = Buffer()
    positions = slot_mapping = last_token_indices = Buffer()

    def plan(
        self,
        blocks: Sequence[KVBlock],
        seq_lens: Sequence[int],
        query_lens: Sequence[int] | None = None,
    ) -> None: ...


class AcmeProvider:
    kind = "acme"
    device = "acme:0"
    rank = 0
    world_size = 1
    kv_layout = KVLayout()

    def __init__(self) -> None:
        self._pages: dict[KVBlock, tuple[DType, tuple[int, ...]]] = {}

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
        block = KVBlock(len(self._pages) + 1)
        pages = tuple(range(self.kv_layout.pages_for(num_tokens)))
        self._pages[block] = (DType(dtype), pages)
        return block

    def kv_block_free(self, block: KVBlock, *, after: Event | None = None) -> None:
        del self._pages[block]

    def kv_block_info(self, block: KVBlock) -> KVBlockInfo:
        dtype, pages = self._pages[block]
        return KVBlockInfo(block, self.device, dtype, pages)

    def kv_block_copy(self, src: KVBlock, dst: KVBlock) -> None: ...

    def kv_block_migrate(self, block: KVBlock, target_device: str) -> KVBlock:
        return block

    def kv_blocks_alloc(self, num_tokens: Sequence[int], dtype: DType | str) -> list[KVBlock]:
        return [self.kv_block_alloc(n, dtype) for n in num_tokens]

    def kv_blocks_free(self, blocks: Iterable[KVBlock], *, after: Event | None = None) -> None: ...

    def kv_block_grow(self, block: KVBlock, num_tokens: int) -> KVBlock:
        return block

    def kv_blocks_grow(self, blocks: Sequence[KVBlock], num_tokens: Sequence[int]) -> list[KVBlock]:
        return list(blocks)

    def kv_blocks_copy(
        self, pairs: Iterable[tuple[KVBlock, KVBlock]], *, stream: Stream | None = None
    ) -> Event:
        return AcmeEvent()

    def kv_blocks_migrate(
        self, blocks: Iterable[KVBlock], target_device: str, *, stream: Stream | None = None
    ) -> tuple[list[KVBlock], Event]:
        return list(blocks), AcmeEvent()

    def kv_block_write(self, block: KVBlock, data: bytes) -> None: ...

    def kv_block_read(self, block: KVBlock) -> bytes:
        return b""

    def kv_cache(self, layer: int, device: str | None = None) -> Buffer:
        return Buffer()

    def create_batch_metadata(
        self, max_seqs: int, max_tokens: int, max_pages_per_seq: int
    ) -> AcmeBatch:
        return AcmeBatch()

    # Engines see the per-name signatures of the protocol's OpLookup.
    def get_op(self, name: str) -> Any:
        return acme_rms_norm

    def find_op(self, name: str) -> Any:
        return acme_rms_norm if name == "rms_norm" else None

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
    assert_type(block, KVBlock)
    info = backend.kv_block_info(block)
    assert_type(info, KVBlockInfo)
    assert_type(info.block, KVBlock)
    assert_type(info.pages, tuple[int, ...])
    assert_type(info.num_pages, int)
    assert_type(backend.kv_block_grow(block, 128), KVBlock)
    assert_type(backend.kv_blocks_grow([block], [128]), list[KVBlock])
    assert_type(backend.kv_block_migrate(block, "host"), KVBlock)
    assert_type(f"{block:#x}", str)
    _pages = block.pages  # type: ignore[attr-defined]
    _tokens = block.num_tokens  # type: ignore[attr-defined]
    backend.kv_block_free(3)  # type: ignore[arg-type]
    backend.kv_block_free(info)  # type: ignore[arg-type]
    backend.kv_blocks_free([block, 3])  # type: ignore[list-item]
    backend.kv_block_grow(info, 128)  # type: ignore[arg-type]
    backend.kv_block_free(block)
    return backend.all_reduce(x, ReduceOp.SUM, timeout=5.0)


def layer_step(backend: BackendProvider[Buffer], x: Buffer, weight: Buffer) -> Buffer:
    """Engine code calling standard ops through the typed lookup."""
    norm = backend.get_op("rms_norm")
    assert_type(norm, RmsNorm[Buffer])
    assert_type(backend.find_op("sample"), Sample[Buffer] | None)
    assert_type(backend.kv_cache(0), Buffer)
    assert_type(backend.create_batch_metadata(8, 64, 16), BatchMetadata[Buffer])
    norm(x)  # type: ignore[call-arg]
    norm(x, weight, eps="1e-6")  # type: ignore[arg-type]
    backend.get_op("rms_nrom")  # type: ignore[call-overload]
    return norm(x, weight, 1e-5)


def torch_layer(backend: BackendProvider[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The same against a torch backend: every standard op has its signature."""
    assert_type(backend.get_op("kv_cache_write"), KVCacheWrite[torch.Tensor])
    decode = backend.get_op("paged_attention_decode")
    assert_type(decode, PagedAttentionDecode[torch.Tensor])
    prefill = backend.get_op("paged_attention_prefill")
    assert_type(prefill, PagedAttentionPrefill[torch.Tensor])
    assert_type(backend.get_op("rotary_cos_sin_cache"), RotaryCosSinCache[torch.Tensor])
    assert_type(backend.get_op("rotary_embedding"), RotaryEmbedding[torch.Tensor])
    assert_type(backend.get_op("fused_add_rms_norm"), FusedAddRmsNorm[torch.Tensor])
    assert_type(backend.find_op("silu_and_mul"), SiluAndMul[torch.Tensor] | None)
    assert_type(backend.get_op("sample"), Sample[torch.Tensor])
    cache, lens = backend.kv_cache(0), torch.ones(1, dtype=torch.int32)
    out = decode(x, cache, lens[None], lens, 0.125, out=x)
    assert_type(out, torch.Tensor)
    decode(x, cache, lens[None], lens)  # type: ignore[call-arg]
    decode(x, cache, lens[None], lens, 0.125, x)  # type: ignore[call-arg]
    prefill(x, cache, lens[None], lens, lens, "8", 0.125)  # type: ignore[arg-type]
    return out


good: BackendProvider[Buffer] = AcmeProvider()
assert_type(engine_step(good, Buffer()), Buffer)
assert_type(layer_step(good, Buffer(), Buffer()), Buffer)
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
        return KVBlock(1)


class AllocatesPlainInts(AcmeProvider):
    """Hands out plain ints: a handle must be a KVBlock, made with ``KVBlock(n)``."""

    def kv_block_alloc(self, num_tokens: int, dtype: DType | str) -> int:  # type: ignore[override]
        return 1


class GrowsToPlainInts(AcmeProvider):
    def kv_blocks_grow(self, blocks: Sequence[KVBlock], num_tokens: Sequence[int]) -> list[int]:  # type: ignore[override]
        return [int(b) for b in blocks]


class InfoIsThePages(AcmeProvider):
    """The pages alone are not a KVBlockInfo."""

    def kv_block_info(self, block: KVBlock) -> tuple[int, ...]:  # type: ignore[override]
        return (0,)


class ForgetsTimeouts(AcmeProvider):
    def barrier(self) -> None: ...  # type: ignore[override]


class NoMigrate:
    """A provider missing kv_block_migrate and everything after it is not a KVBlockManager."""

    kv_layout = KVLayout()

    def kv_block_alloc(self, num_tokens: int, dtype: DType | str) -> KVBlock:
        return KVBlock(1)


class NoBlockInfo:
    """A KV manager of the API before ``kv_block_info``: every other method, but not that."""

    kv_layout = KVLayout()

    def kv_block_alloc(self, num_tokens: int, dtype: DType | str) -> KVBlock:
        return KVBlock(1)

    def kv_block_free(self, block: KVBlock, *, after: Event | None = None) -> None: ...

    def kv_block_copy(self, src: KVBlock, dst: KVBlock) -> None: ...

    def kv_block_migrate(self, block: KVBlock, target_device: str) -> KVBlock:
        return block

    def kv_block_grow(self, block: KVBlock, num_tokens: int) -> KVBlock:
        return block

    def kv_blocks_alloc(self, num_tokens: Sequence[int], dtype: DType | str) -> list[KVBlock]:
        return [KVBlock(1) for _ in num_tokens]

    def kv_blocks_free(self, blocks: Iterable[KVBlock], *, after: Event | None = None) -> None: ...

    def kv_blocks_copy(
        self, pairs: Iterable[tuple[KVBlock, KVBlock]], *, stream: Stream | None = None
    ) -> Event:
        return AcmeEvent()

    def kv_blocks_migrate(
        self, blocks: Iterable[KVBlock], target_device: str, *, stream: Stream | None = None
    ) -> tuple[list[KVBlock], Event]:
        return list(blocks), AcmeEvent()

    def kv_blocks_grow(self, blocks: Sequence[KVBlock], num_tokens: Sequence[int]) -> list[KVBlock]:
        return list(blocks)

    def kv_block_write(self, block: KVBlock, data: bytes) -> None: ...

    def kv_block_read(self, block: KVBlock) -> bytes:
        return b""


class WithBlockInfo(NoBlockInfo):
    """The same with ``kv_block_info`` added: a KVBlockManager (the control for NoBlockInfo)."""

    def kv_block_info(self, block: KVBlock) -> KVBlockInfo:
        return KVBlockInfo(block, "x", DType.FP16, (0,))


wrong_signature: BackendProvider[Buffer] = TakesTokensAsText()  # type: ignore[assignment]
no_timeout: BackendProvider[Buffer] = ForgetsTimeouts()  # type: ignore[assignment]
incomplete: KVBlockManager = NoMigrate()  # type: ignore[assignment]
plain_int_handles: BackendProvider[Buffer] = AllocatesPlainInts()  # type: ignore[assignment]
plain_int_growth: KVBlockManager = GrowsToPlainInts()  # type: ignore[assignment]
pages_for_info: KVBlockManager = InfoIsThePages()  # type: ignore[assignment]
old_api: KVBlockManager = NoBlockInfo()  # type: ignore[assignment]
new_api: KVBlockManager = WithBlockInfo()
