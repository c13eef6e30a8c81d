"""MockBackendProvider: a faithful, pure-Python fake device satisfying BackendProvider[MockTensor].

- KV blocks are pages counted exactly against ``max_memory_mb`` whose bytes exist once written
  (:mod:`.pool`); fresh blocks read as poison, as a device's would hold garbage. The shared
  bookkeeping, checks and stream-ordered page reuse are :mod:`sagellm_backend.blocks`'s.
- Device data operations (``kv_block_write``, copies, the data movement of a migrate) are queued
  on the current stream, or on ``stream=``, and run when something waits for them
  (:mod:`.streams`). ``kv_block_read`` waits for the current stream only.
- Collectives run at once on the calling thread, meeting the other ranks' threads
  (:mod:`.collectives`). MockTensors live in host memory and no stream work touches them, so there
  is no stream work to order them against.
- Every capability flag is enforced: an operation whose capability is off, or a dtype outside
  ``supported_dtypes``, raises CapabilityError before anything happens.
- Of the data path it implements the bookkeeping ops (:data:`MOCK_OPS`): growth, batch metadata
  in MockTensor buffers (:mod:`.batch`) and ``sample`` (:mod:`.sampling`). It keeps no KV cache
  tensors and runs no tensor kernels, so ``kv_cache`` and the other kernel ops are refused with
  CapabilityError, and its capability does not claim them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, cast

from sagellm_backend.blocks import BlockTable, Transfer
from sagellm_backend.capability import CapabilityDescriptor
from sagellm_backend.device import HOST, MemoryStats
from sagellm_backend.dtypes import CollectiveOp, DType, KernelKind, ReduceOp, coerce
from sagellm_backend.errors import CapabilityError, InvalidArgumentError
from sagellm_backend.kernels import (
    Comparator,
    InputMaker,
    KernelSpec,
    KernelTable,
)
from sagellm_backend.kv import KVBlock, KVBlockInfo, KVLayout
from sagellm_backend.mock.collectives import MockCommunicator, MockWorld
from sagellm_backend.mock.graph import GraphCaptureContext, MockGraph
from sagellm_backend.mock.options import MockOptions
from sagellm_backend.mock.pool import MockMemory
from sagellm_backend.mock.sampling import (
    SAMPLE_DTYPES,
    SampleComparison,
    SampleInputs,
    reference_sample,
    sample,
)
from sagellm_backend.mock.streams import MockEvent, MockStream, StreamScheduler
from sagellm_backend.mock.tensor import MockTensor
from sagellm_backend.protocols import Event, Stream
from sagellm_backend.unique import Unique

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from sagellm_backend.mock.batch import MockBatchMetadata

__all__ = [
    "DEFAULT_DTYPES",
    "DEFAULT_KERNELS",
    "MOCK_OPS",
    "MockBackendProvider",
    "MockOptions",
    "create_mock_world",
]

DEFAULT_DTYPES = (DType.FP16, DType.BF16)
DEFAULT_KERNELS = (KernelKind.MATMUL,)
MOCK_OPS = ("kv_grow", "batch_metadata", "sample")
"""The standard ops the mock implements, and claims unless ``supported_ops`` says otherwise."""
_LAYOUT = KVLayout()
_MIB = 1 << 20
MAX_DEVICES = 1024
"""The most mock devices one provider simulates."""


class MockBackendProvider(Unique):
    """A mock device with a configurable, enforced capability matrix.

    The first five parameters are the original package's (``None`` means fp16 and bf16, and
    matmul kernels). The keyword-only ones set every other capability field, the standard ops
    claimed (``None``: all of :data:`MOCK_OPS`), the KV layout, the devices (``mock:0`` to
    ``mock:{num_devices - 1}`` and ``host``), and the simulated world this provider is one rank
    of (a world of its own if None).
    """

    def __init__(
        self,
        supported_dtypes: Sequence[DType | str] | None = None,
        supported_kernels: Sequence[KernelKind | str] | None = None,
        has_collective: bool = True,
        has_graph_exec: bool = False,
        max_memory_mb: int = 16384,
        *,
        has_stream: bool = True,
        has_event: bool = True,
        has_kv_block_copy: bool = True,
        has_kv_block_migrate: bool = True,
        supported_collectives: Sequence[CollectiveOp | str] = (),
        supported_reduce_ops: Sequence[ReduceOp | str] = (),
        supported_ops: Sequence[str] | None = None,
        device_name: str | None = None,
        device_type: str = "mock",
        compute_capability: str | None = None,
        total_memory_bytes: int | None = None,
        available_memory_bytes: int | None = None,
        max_batch_size: int | None = None,
        max_sequence_length: int | None = None,
        extra: Mapping[str, str] | None = None,
        num_layers: int = _LAYOUT.num_layers,
        num_kv_heads: int = _LAYOUT.num_kv_heads,
        head_size: int = _LAYOUT.head_size,
        tokens_per_block: int = _LAYOUT.tokens_per_block,
        num_devices: int = 2,
        device_index: int = 0,
        validate_collectives: bool = True,
        collective_timeout: float = 60.0,
        world: MockWorld | None = None,
        rank: int = 0,
    ) -> None:
        shared = {k: v for k, v in locals().items() if k not in ("self", "world", "rank")}
        self.options = cast("MockOptions", shared)
        """The options given, but the world and the rank: what every rank of a world shares."""
        flags = {
            "has_collective": has_collective,
            "has_graph_exec": has_graph_exec,
            "has_stream": has_stream,
            "has_event": has_event,
            "has_kv_block_copy": has_kv_block_copy,
            "has_kv_block_migrate": has_kv_block_migrate,
            "validate_collectives": validate_collectives,
        }
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise InvalidArgumentError(
                    f"{name} must be a bool, got {value!r}",
                    hint=f"pass {name}=True or {name}=False",
                )
        _positive_int(max_memory_mb, "max_memory_mb")
        _positive_int(num_devices, "num_devices")
        if num_devices > MAX_DEVICES:
            raise InvalidArgumentError(
                f"num_devices={num_devices} is more than the mock simulates ({MAX_DEVICES})",
                hint=f"use at most {MAX_DEVICES} mock devices",
            )
        if (
            isinstance(device_index, bool)
            or not isinstance(device_index, int)
            or not 0 <= device_index < num_devices
        ):
            raise InvalidArgumentError(
                f"device_index {device_index!r} is not a mock device (num_devices={num_devices})",
                hint=f"use an index from 0 to {num_devices - 1}, or raise num_devices",
            )
        if world is not None and not isinstance(world, MockWorld):
            raise InvalidArgumentError(
                f"world must be a MockWorld, got {type(world).__name__}",
                hint="use create_mock_world() to make providers that share one",
            )
        ops = MOCK_OPS if supported_ops is None else _mock_ops(supported_ops)
        self._layout = KVLayout(num_layers, num_kv_heads, head_size, tokens_per_block)
        self._device = f"mock:{device_index}"
        self._capability = CapabilityDescriptor(
            supported_dtypes=DEFAULT_DTYPES if supported_dtypes is None else supported_dtypes,
            supported_kernels=DEFAULT_KERNELS if supported_kernels is None else supported_kernels,
            has_stream=has_stream,
            has_event=has_event,
            has_collective=has_collective,
            has_graph_exec=has_graph_exec,
            max_memory_mb=max_memory_mb,
            device_name=self._device if device_name is None else device_name,
            device_type=device_type,
            compute_capability=compute_capability,
            total_memory_bytes=(
                max_memory_mb * _MIB if total_memory_bytes is None else total_memory_bytes
            ),
            available_memory_bytes=(
                max_memory_mb * _MIB if available_memory_bytes is None else available_memory_bytes
            ),
            supported_collectives=supported_collectives,
            supported_reduce_ops=supported_reduce_ops,
            has_kv_block_copy=has_kv_block_copy,
            has_kv_block_migrate=has_kv_block_migrate,
            max_batch_size=max_batch_size,
            max_sequence_length=max_sequence_length,
            supported_ops=ops,
            extra={} if extra is None else extra,
        )
        world = MockWorld(1) if world is None else world
        communicator = MockCommunicator(
            world, rank, validate=validate_collectives, default_timeout=collective_timeout
        )
        self._memory = MockMemory(self._layout, max_memory_mb * _MIB)
        name = self._device if world.world_size == 1 else f"{self._device} (rank {rank})"
        world.join(rank, name)
        self._comm = communicator
        self._kernels = KernelTable()
        self._streams = StreamScheduler(name, self._capability.require)
        self._table = BlockTable(
            self._memory,
            layout=self._layout,
            dtypes=self._capability.supported_dtypes,
            devices={f"mock:{i}" for i in range(num_devices)} | {HOST},
            default_device=self._device,
            devices_hint=(
                f"use one of {', '.join(f'mock:{i}' for i in range(num_devices))}, {HOST}"
                if num_devices <= 8
                else f"use mock:0 to mock:{num_devices - 1}, or {HOST}"
            ),
            guard=self._streams.check_host,
            own_event=self._streams.own_event,
        )
        self._table.bind_calls(self, MockBackendProvider)
        if self._capability.supports_op("sample"):
            self._kernels.register(
                "sample",
                functools.partial(sample, self._streams),
                dtypes=SAMPLE_DTYPES,
                reference=reference_sample,
                make_inputs=SampleInputs(),
                compare=SampleComparison(self._streams.synchronize),
            )

    def __repr__(self) -> str:
        return f"MockBackendProvider({self._streams.name})"

    # Identity and capability.

    @property
    def kind(self) -> str:
        return "mock"

    @property
    def device(self) -> str:
        return self._device

    @property
    def kv_layout(self) -> KVLayout:
        return self._layout

    def capability(self) -> CapabilityDescriptor:
        """The capability matrix; stays readable after close()."""
        return self._capability

    def close(self) -> None:
        """Free every block and leave the world; every later operation is refused. Idempotent.

        Stream work that still uses freed pages runs first."""
        if self._streams.closed:
            return
        self._streams.check_host("close")
        self._table.close(f"provider {self._streams.name} is closed")
        self._streams.closed = True
        self._comm.world.leave(self._comm.rank)

    # Streams, events, memory.

    def create_stream(self) -> MockStream:
        self._capability.require("has_stream", "create_stream")
        self._streams.check_open()
        return self._streams.new_stream()

    def create_event(self, enable_timing: bool = True) -> MockEvent:
        self._capability.require("has_event", "create_event")
        self._streams.check_open()
        return MockEvent(self._streams, enable_timing)

    def current_stream(self) -> MockStream:
        self._streams.check_open()
        return self._streams.current()

    def synchronize(self) -> None:
        self._streams.synchronize()

    def live_blocks(self, device: str | None = None) -> list[KVBlockInfo]:
        """Where the live KV blocks are (on ``device`` if given), oldest first."""
        self._streams.check_open()
        return self._table.live_blocks(None if device is None else self._table.check_device(device))

    def memory_stats(self) -> MemoryStats:
        """Memory of this provider's own device (blocks migrated elsewhere are not counted)."""
        self._streams.check_open()
        self._table.reclaim()
        return self._memory.stats(self._device, self._table.blocks_on(self._device))

    # KV blocks.

    def kv_block_alloc(self, num_tokens: int, dtype: DType | str) -> KVBlock:
        return self._table.alloc_one(num_tokens, dtype)

    def kv_blocks_alloc(self, num_tokens: Sequence[int], dtype: DType | str) -> list[KVBlock]:
        return self._table.alloc(num_tokens, dtype)

    def kv_block_free(self, block: KVBlock, *, after: Event | None = None) -> None:
        self._table.free_one(block, after=after)

    def kv_blocks_free(self, blocks: Iterable[KVBlock], *, after: Event | None = None) -> None:
        self._table.free(blocks, after=after)

    def kv_block_copy(self, src: KVBlock, dst: KVBlock) -> None:
        self.kv_blocks_copy([(src, dst)])

    def kv_blocks_copy(
        self, pairs: Iterable[tuple[KVBlock, KVBlock]], *, stream: Stream | None = None
    ) -> MockEvent:
        self._capability.require("has_kv_block_copy", "kv_blocks_copy")
        listed = isinstance(pairs, Iterable) and not isinstance(pairs, (str, bytes))
        items = list(pairs) if listed else pairs
        work = _Work(self._streams, self._memory, self._stream_arg(stream), items)
        self._table.copy(items, work)
        return work.event

    def kv_block_migrate(self, block: KVBlock, target_device: str) -> KVBlock:
        return self.kv_blocks_migrate([block], target_device)[0][0]

    def kv_blocks_migrate(
        self, blocks: Iterable[KVBlock], target_device: str, *, stream: Stream | None = None
    ) -> tuple[list[KVBlock], MockEvent]:
        self._capability.require("has_kv_block_migrate", "kv_blocks_migrate")
        self._streams.check_host("kv_blocks_migrate")
        work = _Work(self._streams, self._memory, self._stream_arg(stream), [])
        moved = self._table.migrate(blocks, target_device, work)
        return moved, work.event

    def kv_block_info(self, block: KVBlock) -> KVBlockInfo:
        self._streams.check_open()
        return self._table.info(block)

    def kv_block_grow(self, block: KVBlock, num_tokens: int) -> KVBlock:
        return self.kv_blocks_grow([block], [num_tokens])[0]

    def kv_blocks_grow(self, blocks: Sequence[KVBlock], num_tokens: Sequence[int]) -> list[KVBlock]:
        """Grow blocks by appending pages (capability op ``kv_grow``), all or none."""
        self._capability.require_op("kv_grow")
        self._streams.check_host("kv_blocks_grow")
        return self._table.grow(blocks, num_tokens)

    def kv_block_write(self, block: KVBlock, data: bytes) -> None:
        """Fill ``block`` with ``data`` (exactly its size in bytes), queued on the current
        stream."""
        stream = self.current_stream()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgumentError(
                f"data must be bytes, got {type(data).__name__}", hint="pass a bytes object"
            )
        payload = bytes(data)  # a memoryview of any item size counts its bytes
        memory = self._memory

        def write(live: KVBlockInfo) -> MockEvent | None:
            size = live.num_pages * self._layout.page_bytes(live.dtype)
            if len(payload) != size:
                raise InvalidArgumentError(
                    f"data is {len(payload)} bytes but KV block {live.block:#x} holds {size}",
                    hint="write exactly num_pages * kv_layout.page_bytes(dtype) bytes",
                )
            ids = memory.page_ids(live)
            stamps = memory.stamps(live.device, ids)
            work = _Work(self._streams, memory, stream, [])
            return work.run(lambda: memory.write(live.device, ids, stamps, payload), [live.block])

        self._table.write(block, write)

    def kv_block_read(self, block: KVBlock) -> bytes:
        """The block's bytes once the current stream's queued work has run; pages never
        written read as poison (:data:`~sagellm_backend.mock.pool.POISON`)."""
        self._streams.check_host("kv_block_read")
        stream = self._streams.current()

        def read(live: KVBlockInfo) -> bytes:
            stream.run_to(stream.queued)
            return self._memory.read(live)

        return self._table.use(block, read)

    # The data path's bookkeeping.

    def kv_cache(self, layer: int, device: str | None = None) -> MockTensor:
        """Refused: the mock keeps KV blocks as bytes, not as cache tensors."""
        raise CapabilityError(
            "the mock has no KV cache tensors (the kv_cache op is not claimed)",
            hint="run the tensor data path on a torch backend (cpu, cuda); the mock offers "
            f"{', '.join(MOCK_OPS)}",
        )

    def create_batch_metadata(
        self, max_seqs: int, max_tokens: int, max_pages_per_seq: int
    ) -> MockBatchMetadata:
        """Persistent batch metadata buffers (MockTensors), planned on the host."""
        self._capability.require_op("batch_metadata")
        self._streams.check_host("create_batch_metadata")
        from sagellm_backend.mock.batch import MockBatchMetadata  # deferred: not every start plans

        return MockBatchMetadata(
            self._streams,
            table=self._table,
            layout=self._layout,
            device=self._device,
            max_seqs=max_seqs,
            max_tokens=max_tokens,
            max_pages_per_seq=max_pages_per_seq,
        )

    def get_op(self, name: str) -> Callable[..., Any]:
        """The standard kernel op ``name``; CapabilityError if the mock does not claim it."""
        self._streams.check_open()
        return self._kernels.get_op(name, self._capability)

    def find_op(self, name: str) -> Callable[..., Any] | None:
        """The standard kernel op ``name``, or None if the mock does not claim it."""
        self._streams.check_open()
        return self._kernels.find_op(name, self._capability)

    # Collectives.

    @property
    def rank(self) -> int:
        return self._comm.rank

    @property
    def world_size(self) -> int:
        return self._comm.world_size

    def all_reduce(
        self, tensor: MockTensor, op: ReduceOp | str = ReduceOp.SUM, *, timeout: float | None = None
    ) -> MockTensor:
        checked = self._before_collective(CollectiveOp.ALL_REDUCE, tensor)
        return self._comm.all_reduce(checked, self._reduce_op(op), timeout)

    def all_gather(self, tensor: MockTensor, *, timeout: float | None = None) -> MockTensor:
        checked = self._before_collective(CollectiveOp.ALL_GATHER, tensor)
        return self._comm.all_gather(checked, timeout)

    def reduce_scatter(
        self, tensor: MockTensor, op: ReduceOp | str = ReduceOp.SUM, *, timeout: float | None = None
    ) -> MockTensor:
        checked = self._before_collective(CollectiveOp.REDUCE_SCATTER, tensor)
        return self._comm.reduce_scatter(checked, self._reduce_op(op), timeout)

    def broadcast(
        self, tensor: MockTensor, src: int = 0, *, timeout: float | None = None
    ) -> MockTensor:
        checked = self._before_collective(CollectiveOp.BROADCAST, tensor)
        return self._comm.broadcast(checked, src, timeout)

    def send(self, tensor: MockTensor, dst: int, *, timeout: float | None = None) -> None:
        self._comm.send(self._before_collective(CollectiveOp.SEND, tensor), dst, timeout)

    def recv(self, tensor: MockTensor, src: int, *, timeout: float | None = None) -> MockTensor:
        return self._comm.recv(self._before_collective(CollectiveOp.RECV, tensor), src, timeout)

    def barrier(self, *, timeout: float | None = None) -> None:
        self._capability.require_collective(CollectiveOp.BARRIER)
        self._streams.check_host(CollectiveOp.BARRIER.value)
        self._comm.barrier(timeout)

    # Kernels.

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
        """Register a kernel; its kind and dtypes must be within the capability."""
        self._streams.check_open()
        if kind is not None:
            self._capability.require_kernel(kind)
        listed = self._capability.require_dtypes(dtypes, f"kernel {name!r}")
        return self._kernels.register(
            name,
            impl,
            kind=kind,
            dtypes=listed,
            reference=reference,
            make_inputs=make_inputs,
            compare=compare,
            override=override,
        )

    def get_kernel(self, name: str) -> Callable[..., Any]:
        self._streams.check_open()
        return self._kernels.get(name)

    def kernel_spec(self, name: str) -> KernelSpec:
        self._streams.check_open()
        return self._kernels.spec(name)

    def list_kernels(self, kind: KernelKind | str | None = None) -> list[KernelSpec]:
        self._streams.check_open()
        return self._kernels.list(kind)

    # Graphs.

    def capture_graph(self, stream: Stream | None = None) -> AbstractContextManager[MockGraph]:
        """Capture the device operations issued on ``stream`` (default: current) into a graph."""
        self._capability.require_graph_exec()
        on = self.current_stream() if stream is None else self._streams.own_stream(stream)
        return self._table.holding(GraphCaptureContext(MockGraph(on, self._check_live), on))

    # Internals.

    def _stream_arg(self, stream: Stream | None) -> MockStream:
        if stream is None:
            return self.current_stream()
        self._capability.require("has_stream", "passing stream=")
        self._streams.check_open()
        return self._streams.own_stream(stream)

    def _check_live(self, blocks: Sequence[KVBlock]) -> None:
        self._table.check_live(blocks)

    def _before_collective(self, op: CollectiveOp, tensor: object) -> MockTensor:
        """Capability and tensor checks shared by the collectives that move a tensor."""
        self._capability.require_collective(op)
        self._streams.check_host(op.value)
        if not isinstance(tensor, MockTensor):
            raise InvalidArgumentError(
                f"{op.value} needs a MockTensor, got {type(tensor).__name__}",
                hint="build tensors with MockTensor(values, dtype)",
            )
        self._capability.require_dtype(tensor.dtype, op.value)
        return tensor

    def _reduce_op(self, op: object) -> ReduceOp:
        return self._capability.require_reduce_op(coerce(ReduceOp, op, "reduce op"))


def create_mock_world(world_size: int, **options: Unpack[MockOptions]) -> list[MockBackendProvider]:
    """One provider per rank of a new simulated world; drive each from its own thread."""
    for reserved in ("world", "rank"):
        if reserved in options:
            raise InvalidArgumentError(
                f"create_mock_world sets {reserved} itself", hint=f"leave {reserved} out"
            )
    world = MockWorld(world_size)
    return [MockBackendProvider(world=world, rank=r, **options) for r in range(world_size)]


def _mock_ops(names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise InvalidArgumentError(
            f"supported_ops must be a sequence of op names, got {type(names).__name__}",
            hint=f"pass a list drawn from {', '.join(MOCK_OPS)}",
        )
    missing = [name for name in names if name not in MOCK_OPS]
    if missing:
        raise InvalidArgumentError(
            f"the mock does not implement the ops {missing!r}",
            hint=f"claim only ops the mock implements: {', '.join(MOCK_OPS)}",
        )
    return tuple(names)


def _positive_int(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidArgumentError(
            f"{what} must be a positive int, got {value!r}",
            hint=f"set {what} to an int of at least 1",
        )


class _Work:
    """The stream work of one copy, migration or write, queued by the block table under its
    lock.

    On a stream other than the default one, the work first waits for the default stream (pages
    its work used may be reused here) and for the calling thread's current stream (whose queued
    work may use the pages it writes), and its event is returned to the table, which reuses the
    pages it touches only once the event is reached. Work on the default stream needs neither.
    """

    def __init__(
        self,
        streams: StreamScheduler,
        memory: MockMemory,
        stream: MockStream,
        pairs: Iterable[tuple[KVBlock, KVBlock]],
    ) -> None:
        self._memory = memory
        self._pairs = pairs
        self._stream = stream
        capture = streams.capture
        self._captured = capture is not None and capture.stream is stream
        waits = (streams.current(), streams.default_stream)
        self._after = [] if self._captured else [s for s in dict.fromkeys(waits) if s is not stream]
        self._tracked = not self._captured and stream is not streams.default_stream
        self.event = MockEvent(streams)

    def __call__(self, transfers: list[Transfer]) -> MockEvent | None:
        memory = self._memory
        if transfers:
            copies = memory.copies(transfers)
            # A graph records the blocks it touches, to check them before each replay.
            blocks = [block for pair in self._pairs for block in pair] if self._captured else []
            return self.run(lambda: memory.move(copies), blocks)
        return self.run(None, [])

    def run(self, work: Callable[[], None] | None, blocks: list[KVBlock]) -> MockEvent | None:
        """Queue ``work`` (None: nothing) after the streams it waits for; its event, where the
        table must keep it."""
        stream = self._stream
        for other in self._after:
            stream.wait_stream(other)
        if work is not None:
            stream.launch(work, blocks)
        stream.record_event(self.event)
        return self.event if self._tracked else None
