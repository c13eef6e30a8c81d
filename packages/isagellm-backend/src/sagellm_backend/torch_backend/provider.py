"""TorchBackendProvider: the protocols' BackendProvider[torch.Tensor] over a device adapter.

Block validation, bookkeeping and stream-ordered page reuse are the shared
:class:`~sagellm_backend.blocks.BlockTable`'s; where the data lives is the
:class:`~sagellm_backend.torch_backend.pool.KVPagePool`'s. Data ops (writes, copies, migrations)
are issued on the current stream, or on the ``stream=`` given, under the table's lock, and
batched ones return an event recorded after them; host-side calls run at once.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

import torch

from sagellm_backend.blocks import BlockTable, Transfer
from sagellm_backend.capability import CapabilityDescriptor
from sagellm_backend.device import HOST, MemoryStats
from sagellm_backend.dtypes import DType, KernelKind, ReduceOp, coerce
from sagellm_backend.errors import (
    BackendUnavailableError,
    CapabilityError,
    GraphCaptureError,
    InvalidArgumentError,
)
from sagellm_backend.factory import DeviceSelection, OptionValue
from sagellm_backend.kernels import Comparator, InputMaker, KernelSpec, KernelTable
from sagellm_backend.kv import KVBlock, KVBlockInfo, KVLayout
from sagellm_backend.ops import PROVIDER_OPS, STANDARD_OPS
from sagellm_backend.protocols import Event, Graph, Stream
from sagellm_backend.torch_backend.adapter import DeviceAdapter, GraphHook
from sagellm_backend.torch_backend.batch import TorchBatchMetadata
from sagellm_backend.torch_backend.collectives import ProcessGroup, WorldConfig
from sagellm_backend.torch_backend.dtypes import to_torch_dtype
from sagellm_backend.torch_backend.kernels import KERNEL_DTYPES, register_reference_kernels
from sagellm_backend.torch_backend.pool import DevicePages, KVPagePool, PageMover
from sagellm_backend.torch_backend.streams import TorchEvent, TorchStream, own_event, own_stream
from sagellm_backend.unique import Unique

__all__ = ["TorchBackendProvider", "create_torch_provider"]

S = TypeVar("S")
E = TypeVar("E")
R = TypeVar("R")

MIB = 1 << 20


class TorchBackendProvider(Unique, Generic[S, E]):
    """One torch device: its KV pools, streams, process group and kernels.

    Construct it with :func:`create_torch_provider` (which reads options and the launcher's
    environment) or directly with an adapter and sizes.
    """

    def __init__(
        self,
        adapter: DeviceAdapter[S, E],
        *,
        index: int,
        layout: KVLayout,
        num_pages: int,
        host_num_pages: int,
        world: WorldConfig,
        collective_timeout: float,
        validate_collectives: bool = True,
        mover: PageMover | None = None,
        graphs: GraphHook[S] | None = None,
    ) -> None:
        if layout.dtype is None:
            raise InvalidArgumentError(
                "a torch backend needs a KV layout with a dtype", hint="set KVLayout(dtype=...)"
            )
        for name, count in (("num_pages", num_pages), ("host_num_pages", host_num_pages)):
            if count < 1:
                raise InvalidArgumentError(
                    f"the KV pool needs at least one page, got {name}={count}",
                    hint="raise num_blocks or kv_memory_mb (host_num_blocks, host_kv_memory_mb)",
                )
        self._adapter = adapter
        self._graphs = graphs
        self._index = index
        self._home = adapter.default_stream(index)
        """The device's default stream: provider work on any other is tracked (see _Work)."""
        self._device = f"{adapter.kind}:{index}"
        self._torch_device = adapter.torch_device(index)
        element = to_torch_dtype(layout.dtype)
        self._pool = KVPagePool(
            layout,
            {
                self._device: DevicePages(
                    layout, num_pages, element, self._torch_device, pin=False
                ),
                HOST: DevicePages(
                    layout,
                    host_num_pages,
                    element,
                    torch.device("cpu"),
                    pin=adapter.pins_host_memory,
                ),
            },
            mover,
        )
        self._kernels = KernelTable()
        device = adapter.capability(index)
        register_reference_kernels(
            self._kernels,
            self._torch_device,
            dtypes=[d for d in KERNEL_DTYPES if device.supports_dtype(d)],
        )
        self._group = ProcessGroup(
            adapter.comm,
            world,
            self._torch_device,
            timeout=collective_timeout,
            validate=validate_collectives,
        )
        self._capability = self._describe(device, num_pages * layout.page_bytes(layout.dtype))
        self._blocks = BlockTable(
            self._pool,
            layout=layout,
            dtypes=self._capability.kv_dtypes,
            devices=(self._device, HOST),
            default_device=self._device,
            devices_hint=f"use {self._device} or {HOST}",
            dtype_hint=f"allocate {layout.dtype.value} blocks, or create the backend with "
            "kv_dtype={dtype}",
            guard=self._live,
            own_event=functools.partial(own_event, adapter),
        )
        self._blocks.bind_calls(self, TorchBackendProvider)
        self._peak_used = 0
        self._closed = False
        self._close_lock = threading.Lock()

    def _describe(self, device: CapabilityDescriptor, pool_bytes: int) -> CapabilityDescriptor:
        spec = self._adapter.comm
        kernels = self._kernels.list()
        kinds = {s.kind for s in kernels if s.kind is not None}
        computed = {d for s in kernels for d in s.dtypes}
        ops = [s.name for s in kernels if s.name in STANDARD_OPS]
        layout = self._pool.layout
        return device.replace(
            supported_dtypes=tuple(d for d in DType if d in computed),
            kv_dtypes=(self._pool.dtype,),
            supported_kernels=tuple(
                k for k in KernelKind if k in kinds or device.supports_kernel(k)
            ),
            has_collective=True,
            has_graph_exec=self._graphs is not None,
            supported_collectives=spec.collectives,
            supported_reduce_ops=tuple(op for op in ReduceOp if op in spec.reduce_ops),
            has_kv_block_copy=True,
            has_kv_block_migrate=True,
            max_memory_mb=pool_bytes // MIB,
            supported_ops=(*ops, *(op.name for op in PROVIDER_OPS)),
            extra={
                **device.extra,
                "dist_backend": spec.backend,
                "kv_layout": (
                    f"[{layout.num_layers}, pages, 2, {layout.tokens_per_block}, "
                    f"{layout.num_kv_heads}, {layout.head_size}] {self._pool.dtype.value}"
                ),
                "kv_pages": str(self._pool.pools[self._device].num_pages),
                "host_kv_pages": str(self._pool.pools[HOST].num_pages),
                "pinned_host_memory": str(self._adapter.pins_host_memory).lower(),
            },
        )

    # Identity and lifetime.

    @property
    def kind(self) -> str:
        return self._adapter.kind

    @property
    def device(self) -> str:
        return self._device

    @property
    def index(self) -> int:
        """Index of this provider's device among the adapter's devices."""
        return self._index

    @property
    def torch_device(self) -> torch.device:
        return self._torch_device

    @property
    def adapter(self) -> DeviceAdapter[S, E]:
        return self._adapter

    def capability(self) -> CapabilityDescriptor:
        return self._capability

    def close(self) -> None:
        """Wait for the device work that still uses freed pages, release every block and the
        process group; later calls are refused. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._live("close")
            self._closed = True
        self._blocks.close(f"the {self._device} backend is closed")
        self._group.close()

    def __repr__(self) -> str:
        return f"TorchBackendProvider({self._device}, rank {self.rank} of {self.world_size})"

    def _live(self, host_side: str | None = None) -> None:
        """Refuse calls on a closed provider, and ``host_side`` calls during a graph capture."""
        if self._closed:
            raise BackendUnavailableError(
                f"the {self._device} backend is closed", hint="create a new backend"
            )
        if host_side is not None and self._blocks.held:
            raise GraphCaptureError(
                f"{host_side} is a host-side call, refused while a graph is being captured",
                hint="call it before or after the capture_graph block",
            )

    # Streams, events, memory.

    def create_stream(self) -> TorchStream[S, E]:
        self._live()
        return TorchStream(self._adapter, self._index, self._adapter.new_stream(self._index))

    def create_event(self, enable_timing: bool = True) -> TorchEvent[S, E]:
        self._live()
        return TorchEvent(self._adapter, self._index, enable_timing=enable_timing)

    def current_stream(self) -> TorchStream[S, E]:
        self._live()
        return TorchStream(self._adapter, self._index, self._adapter.current_stream(self._index))

    def synchronize(self) -> None:
        self._live("synchronize")
        self._adapter.synchronize(self._index)

    def memory_stats(self) -> MemoryStats:
        """Device-wide memory (from the adapter) and this provider's KV page accounting."""
        self._live()
        self._blocks.reclaim()
        free, total = self._adapter.mem_get_info(self._index)
        used = total - free
        self._peak_used = max(self._peak_used, used)
        return MemoryStats(
            total_bytes=total,
            used_bytes=used,
            peak_used_bytes=self._peak_used,
            kv_blocks_in_use=self._blocks.blocks_on(self._device),
            kv_pages_in_use=self._pool.pages_in_use(self._device),
            kv_pages_total=self._pool.pools[self._device].num_pages,
        )

    # Collectives.

    @property
    def rank(self) -> int:
        return self._group.rank

    @property
    def world_size(self) -> int:
        return self._group.world_size

    def all_reduce(
        self,
        tensor: torch.Tensor,
        op: ReduceOp | str = ReduceOp.SUM,
        *,
        timeout: float | None = None,
    ) -> torch.Tensor:
        self._live("all_reduce")
        return self._group.all_reduce(tensor, op, timeout)

    def all_gather(self, tensor: torch.Tensor, *, timeout: float | None = None) -> torch.Tensor:
        self._live("all_gather")
        return self._group.all_gather(tensor, timeout)

    def reduce_scatter(
        self,
        tensor: torch.Tensor,
        op: ReduceOp | str = ReduceOp.SUM,
        *,
        timeout: float | None = None,
    ) -> torch.Tensor:
        self._live("reduce_scatter")
        return self._group.reduce_scatter(tensor, op, timeout)

    def broadcast(
        self, tensor: torch.Tensor, src: int = 0, *, timeout: float | None = None
    ) -> torch.Tensor:
        self._live("broadcast")
        return self._group.broadcast(tensor, src, timeout)

    def send(self, tensor: torch.Tensor, dst: int, *, timeout: float | None = None) -> None:
        self._live("send")
        self._group.send(tensor, dst, timeout)

    def recv(self, tensor: torch.Tensor, src: int, *, timeout: float | None = None) -> torch.Tensor:
        self._live("recv")
        return self._group.recv(tensor, src, timeout)

    def barrier(self, *, timeout: float | None = None) -> None:
        self._live("barrier")
        self._group.barrier(timeout)

    # KV blocks.

    @property
    def kv_layout(self) -> KVLayout:
        return self._pool.layout

    def kv_block_alloc(self, num_tokens: int, dtype: DType | str) -> KVBlock:
        return self._blocks.alloc_one(num_tokens, dtype)

    def kv_blocks_alloc(self, num_tokens: Sequence[int], dtype: DType | str) -> list[KVBlock]:
        return self._blocks.alloc(num_tokens, dtype)

    def kv_block_free(self, block: KVBlock, *, after: Event | None = None) -> None:
        """Free ``block``; with ``after``, its pages are reused only once that event is reached
        (for work queued on the cache tensors on another stream)."""
        self._blocks.free_one(block, after=after)

    def kv_blocks_free(self, blocks: Iterable[KVBlock], *, after: Event | None = None) -> None:
        """Free ``blocks``; with ``after``, their pages are reused only once that event is
        reached (for work queued on the cache tensors on another stream)."""
        self._blocks.free(blocks, after=after)

    def kv_block_copy(self, src: KVBlock, dst: KVBlock) -> None:
        self.kv_blocks_copy([(src, dst)])

    def kv_blocks_copy(
        self, pairs: Iterable[tuple[KVBlock, KVBlock]], *, stream: Stream | None = None
    ) -> TorchEvent[S, E]:
        """Copy every (src, dst) pair with one gather and one scatter per device pair."""
        self._live()
        work = _Work(self, stream)
        self._blocks.copy(pairs, work)
        assert work.event is not None
        return work.event

    def kv_block_migrate(self, block: KVBlock, target_device: str) -> KVBlock:
        return self.kv_blocks_migrate([block], target_device)[0][0]

    def kv_blocks_migrate(
        self, blocks: Iterable[KVBlock], target_device: str, *, stream: Stream | None = None
    ) -> tuple[list[KVBlock], TorchEvent[S, E]]:
        """Move blocks to another device of this provider or to "host" (swap out and in).

        One gather, one transfer and one scatter per batch; ``stream`` lets a swap overlap
        compute, and the returned event marks its completion.
        """
        self._live("kv_blocks_migrate")
        work = _Work(self, stream)
        moved = self._blocks.migrate(blocks, target_device, work)
        assert work.event is not None
        return moved, work.event

    def kv_block_info(self, block: KVBlock) -> KVBlockInfo:
        self._live("kv_block_info")
        return self._blocks.info(block)

    def kv_block_grow(self, block: KVBlock, num_tokens: int) -> KVBlock:
        return self.kv_blocks_grow([block], [num_tokens])[0]

    def kv_blocks_grow(self, blocks: Sequence[KVBlock], num_tokens: Sequence[int]) -> list[KVBlock]:
        """Grow blocks by appending pages, never copying (capability op ``kv_grow``)."""
        self._live("kv_blocks_grow")
        return self._blocks.grow(blocks, num_tokens)

    def kv_block_write(self, block: KVBlock, data: bytes) -> None:
        """Fill ``block`` with ``data`` in the layout :meth:`kv_block_read` returns."""
        self._live("kv_block_write")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgumentError(
                f"data must be bytes, got {type(data).__name__}", hint="pass bytes or bytearray"
            )
        payload = bytes(data)  # a memoryview of any item size counts its bytes

        def write(live: KVBlockInfo) -> TorchEvent[S, E] | None:
            size = self.kv_layout.page_bytes(live.dtype) * live.num_pages
            if len(payload) != size:
                raise InvalidArgumentError(
                    f"KV block {live.block:#x} holds {size} bytes, got {len(payload)}",
                    hint="write exactly the block's size: page_bytes(dtype) * num_pages",
                )
            return _Work(self, None).run(lambda: self._pool.write(live, payload))

        self._blocks.write(block, write)

    def kv_block_read(self, block: KVBlock) -> bytes:
        """The block's bytes, layer-major: ``[num_layers, pages, 2, tokens, kv_heads, head_size]``.

        Waits for the current stream first, as the protocol says.
        """
        self._live("kv_block_read")

        def read(live: KVBlockInfo) -> bytes:
            self._adapter.stream_synchronize(self._adapter.current_stream(self._index))
            return self._pool.read(live)

        return self._blocks.use(block, read)

    # What engines and kernels read: the pools and block tables.

    def kv_cache(self, layer: int, device: str | None = None) -> torch.Tensor:
        """Layer ``layer``'s pages on ``device`` (default: this provider's device), a view
        ``[num_pages, 2, tokens_per_block, num_kv_heads, head_size]`` (``KVLayout.cache_shape``).
        """
        layers = self.kv_layout.num_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < layers:
            raise InvalidArgumentError(
                f"layer must be an int in 0..{layers - 1}, got {layer!r}",
                hint="pass the index of one of the model's layers",
            )
        return self.kv_pool(device)[layer]

    def kv_pool(self, device: str | None = None) -> torch.Tensor:
        """Every layer's pages on ``device`` (default: this provider's device), one tensor
        ``[num_layers, num_pages, 2, tokens_per_block, num_kv_heads, head_size]``."""
        self._live()
        where = self._device if device is None else self._blocks.check_device(device)
        return self._pool.pools[where].tensor

    def create_batch_metadata(
        self, max_seqs: int, max_tokens: int, max_pages_per_seq: int
    ) -> TorchBatchMetadata[S, E]:
        """Persistent batch metadata buffers on this provider's device (``batch_metadata``)."""
        self._live("create_batch_metadata")
        return TorchBatchMetadata(
            self._adapter,
            self._index,
            table=self._blocks,
            layout=self.kv_layout,
            device=self._device,
            max_seqs=max_seqs,
            max_tokens=max_tokens,
            max_pages_per_seq=max_pages_per_seq,
            check=self._live,
        )

    def _stream(self, stream: Stream | None) -> TorchStream[S, E]:
        if stream is None:
            return self.current_stream()
        return own_stream(self._adapter, stream)

    def _move(self, transfers: list[Transfer], stream: S) -> None:
        """Queue ``transfers`` on ``stream``, this thread's current stream."""
        self._pool.move(
            transfers,
            non_blocking=self._adapter.pins_host_memory,
            wait_for_host=lambda: self._adapter.stream_synchronize(stream),
        )

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
        self._live()
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
        self._live()
        return self._kernels.get(name)

    def get_op(self, name: str) -> Any:
        """The standard kernel op ``name`` (typed by the protocols' ``OpLookup``)."""
        self._live()
        return self._kernels.get_op(name, self._capability)

    def find_op(self, name: str) -> Any:
        """As :meth:`get_op`, but None where the capability does not claim the op."""
        self._live()
        return self._kernels.find_op(name, self._capability)

    def kernel_spec(self, name: str) -> KernelSpec:
        self._live()
        return self._kernels.spec(name)

    def list_kernels(self, kind: KernelKind | str | None = None) -> list[KernelSpec]:
        self._live()
        return self._kernels.list(kind)

    # Graphs.

    def capture_graph(self, stream: Stream | None = None) -> AbstractContextManager[Graph]:
        """The device's graph capture on ``stream`` (None: a side stream), where it has one.

        Without a graph hook (has_graph_exec=False) it is refused at once.
        """
        self._live()
        if self._graphs is not None:
            raw = None if stream is None else self._stream(stream).raw
            return self._blocks.holding(self._graphs.capture(raw))
        raise CapabilityError(
            f"{self._device} cannot capture graphs (has_graph_exec=False)",
            hint="run the operations eagerly",
        )


class _Work(Generic[S, E]):
    """The device work of one copy, migration or write, queued by the block table under its
    lock.

    On a stream other than the device's default one, the work first waits for the default
    stream (pages its work used may be reused here) and for the calling thread's current stream
    (whose queued work may still use the pages it writes), and its event is returned to the
    table, which reuses the pages it touches only once the event is reached. Work on the default
    stream needs neither.
    """

    def __init__(self, provider: TorchBackendProvider[S, E], stream: Stream | None) -> None:
        self._provider = provider
        adapter = provider.adapter
        current = adapter.current_stream(provider.index)
        self._stream = None if stream is None else own_stream(adapter, stream)
        raw = current if self._stream is None else self._stream.raw
        self._raw = raw
        # In a graph capture the captured (current) stream stands for the default one: a capture
        # cannot wait for work outside it.
        home = current if provider._blocks.held else provider._home
        self._tracked = not _same(raw, home)
        waits = (current,) if home is current else (current, home)
        self._after = [s for s in waits if self._tracked and not _same(s, raw)]
        self.event: TorchEvent[S, E] | None = None

    def __call__(self, transfers: list[Transfer]) -> TorchEvent[S, E] | None:
        return self.run(lambda: self._provider._move(transfers, self._raw))

    def run(self, work: Callable[[], object]) -> TorchEvent[S, E] | None:
        """Queue ``work`` on the stream after those it waits for; its event, where the table
        must keep it."""
        provider = self._provider
        adapter = provider.adapter
        for other in self._after:
            adapter.stream_wait_stream(self._raw, other)
        if self._stream is None:
            work()
        else:
            with self._stream:
                work()
        self.event = TorchEvent(adapter, provider.index, enable_timing=True)
        self.event.record_raw(self._raw)
        return self.event if self._tracked else None


def _same(stream: object, other: object) -> bool:
    """Whether two stream objects of a device are the same stream (wrappers compare equal)."""
    return stream is other or stream == other


def create_torch_provider(
    adapter: DeviceAdapter[S, E],
    device: DeviceSelection,
    options: Mapping[str, OptionValue],
    environ: Mapping[str, str] | None = None,
    *,
    mover: PageMover | None = None,
    graphs: GraphHook[S] | None = None,
    prepare: Callable[[int], object] | None = None,
) -> TorchBackendProvider[S, E]:
    """A provider from a factory's device selection and validated options (see options.py).

    The device index is the one asked for, else the one a launcher assigned (LOCAL_RANK),
    else 0; rank and world come from the options, else the launcher's environment. A device
    wheel passes its batched page ``mover`` and its ``graphs`` capture, where it has them, and
    ``prepare(index)``, run once every option is checked and before the device is used (where
    it makes the device current, so that a refused creation leaves it as it was).
    """
    env = os.environ if environ is None else environ
    index = device.index
    if index is None:
        bound = adapter.bind(env)
        index = bound if bound is not None else 0
    count = adapter.device_count()
    if not 0 <= index < count:
        raise InvalidArgumentError(
            f"{adapter.kind}:{index} does not exist; this machine has {count} {adapter.kind} "
            f"device(s)",
            hint=f"use an index in 0..{count - 1}",
        )
    layout = KVLayout(
        num_layers=_int(options, "num_layers"),
        num_kv_heads=_int(options, "num_kv_heads"),
        head_size=_int(options, "head_size"),
        tokens_per_block=_int(options, "tokens_per_block"),
        dtype=coerce(DType, options["kv_dtype"], "kv_dtype"),
    )
    assert layout.dtype is not None
    page_bytes = layout.page_bytes(layout.dtype)
    num_pages = _pages(options, "num_blocks", "kv_memory_mb", page_bytes)
    host_pages = _pages(options, "host_num_blocks", "host_kv_memory_mb", page_bytes)
    world = WorldConfig.resolve(
        env,
        rank=_optional_int(options, "rank"),
        world_size=_optional_int(options, "world_size"),
        master_addr=_optional_str(options, "master_addr"),
        master_port=_optional_int(options, "master_port"),
    )
    timeout = options["collective_timeout"]
    validate = options["validate_collectives"]
    assert isinstance(timeout, float) and isinstance(validate, bool)
    if prepare is not None:
        prepare(index)
    return TorchBackendProvider(
        adapter,
        index=index,
        layout=layout,
        num_pages=num_pages,
        host_num_pages=host_pages,
        world=world,
        collective_timeout=timeout,
        validate_collectives=validate,
        mover=mover,
        graphs=graphs,
    )


def _int(options: Mapping[str, OptionValue], name: str) -> int:
    value = options[name]
    assert isinstance(value, int)
    return value


def _optional_int(options: Mapping[str, OptionValue], name: str) -> int | None:
    return _int(options, name) if name in options else None


def _optional_str(options: Mapping[str, OptionValue], name: str) -> str | None:
    value = options.get(name)
    assert value is None or isinstance(value, str)
    return value


def _pages(options: Mapping[str, OptionValue], count: str, budget: str, page_bytes: int) -> int:
    explicit, megabytes = _int(options, count), _int(options, budget)
    if explicit < 0 or megabytes < 0:
        raise InvalidArgumentError(
            f"{count} and {budget} must not be negative, got {explicit} and {megabytes}",
            hint=f"set {count} (pages) or {budget} (MiB) to a positive int",
        )
    pages = explicit or megabytes * MIB // page_bytes
    if pages < 1:
        raise InvalidArgumentError(
            f"{budget}={megabytes} MiB holds no page of {page_bytes} bytes",
            hint=f"raise {budget}, or set {count}",
        )
    return pages
