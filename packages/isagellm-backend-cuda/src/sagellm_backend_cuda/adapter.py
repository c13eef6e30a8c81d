"""CudaAdapter: NVIDIA GPUs as a device of the shared torch layer, over ``torch.cuda``.

Streams are ``torch.cuda.Stream`` objects, which torch already draws from its per-device pool
of CUDA streams. Events are pooled here: a :class:`PooledEvent` lends a ``torch.cuda.Event``
and returns it to its device's free list when dropped, so a batched KV operation, which records
one completion event, creates and destroys no CUDA event in the steady state.

While a CUDA graph is being captured (see :mod:`sagellm_backend_cuda.graphs`), every call that
would synchronise with the device is refused with GraphCaptureError before it reaches CUDA: in
the global capture mode such a call would invalidate the capture.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import AbstractContextManager

import torch

from sagellm_backend.capability import CapabilityDescriptor
from sagellm_backend.dtypes import CollectiveOp, DType, KernelKind, ReduceOp
from sagellm_backend.errors import (
    EventStateError,
    InvalidArgumentError,
)
from sagellm_backend.torch_backend.capture import CaptureGuard
from sagellm_backend.torch_backend.collectives import FLOAT8, WIDE_UNSIGNED, CommSpec

__all__ = ["NCCL", "CudaAdapter", "PooledEvent", "new_cuda_event", "visible_devices_text"]

NCCL = CommSpec(
    backend="nccl",
    reduce_ops=frozenset({ReduceOp.SUM, ReduceOp.PROD, ReduceOp.MIN, ReduceOp.MAX, ReduceOp.AVG}),
    float_only_ops=frozenset({ReduceOp.AVG}),
    int_only_ops=frozenset(),
    unsupported_dtypes=FLOAT8 | WIDE_UNSIGNED | {torch.int16},
    binds_device=True,
)
"""NCCL through torch.distributed: no bitwise reductions; avg on floating point only; no int16
or unsigned dtype wider than uint8 (torch has no NCCL type for them)."""

_EVENT_POOL_LIMIT = 256
"""Idle events kept per (device, timing) pool; more are destroyed."""


class PooledEvent:
    """A ``torch.cuda.Event`` on loan from the adapter's pool; it goes back when dropped."""

    __slots__ = ("_pools", "device", "enable_timing", "event")

    def __init__(
        self,
        event: torch.cuda.Event,
        enable_timing: bool,
        device: int | None,
        pools: _EventPools,
    ) -> None:
        self.event = event
        self.enable_timing = enable_timing
        self.device = device
        self._pools = pools

    def __del__(self) -> None:
        self._pools.give_back(self.device, self.enable_timing, self.event)


class _EventPools:
    """Idle ``torch.cuda.Event``s by (device they are bound to, timing); None: never recorded."""

    def __init__(self) -> None:
        self._idle: dict[tuple[int | None, bool], list[torch.cuda.Event]] = {}

    def take(self, device: int | None, enable_timing: bool) -> torch.cuda.Event:
        idle = self._idle.get((device, enable_timing))
        if idle:
            try:
                return idle.pop()
            except IndexError:  # another thread took the last one
                pass
        return new_cuda_event(enable_timing)

    def give_back(self, device: int | None, enable_timing: bool, event: torch.cuda.Event) -> None:
        idle = self._idle.setdefault((device, enable_timing), [])
        if len(idle) < _EVENT_POOL_LIMIT:
            idle.append(event)


class CudaAdapter:
    """NVIDIA GPUs through torch.cuda: NCCL, pinned host memory, pooled events."""

    def __init__(self) -> None:
        self._events = _EventPools()
        self.captures = CaptureGuard("a CUDA graph")

    @property
    def kind(self) -> str:
        return "cuda"

    @property
    def comm(self) -> CommSpec:
        return NCCL

    @property
    def pins_host_memory(self) -> bool:
        return True

    def device_count(self) -> int:
        """Devices visible to this process (``CUDA_VISIBLE_DEVICES`` applied)."""
        return torch.cuda.device_count()

    def torch_device(self, index: int) -> torch.device:
        self._check(index)
        return torch.device("cuda", index)

    def bind(self, environ: Mapping[str, str]) -> int | None:
        """LOCAL_RANK's device, made this process's current device (None without a launcher)."""
        text = environ.get("LOCAL_RANK")
        if text is None or text == "":
            return None
        if not text.isdigit():
            raise InvalidArgumentError(
                f"LOCAL_RANK={text!r} is not a device index", hint="unset it, or set an integer"
            )
        index = int(text)
        count = self.device_count()
        if index >= count:
            raise InvalidArgumentError(
                f"LOCAL_RANK={index} has no GPU: {visible_devices_text(count)}",
                hint="start at most one process per visible GPU (torchrun --nproc-per-node), "
                "or widen CUDA_VISIBLE_DEVICES",
            )
        torch.cuda.set_device(index)
        return index

    def capability(self, index: int) -> CapabilityDescriptor:
        self._check(index)
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        major, minor = props.major, props.minor
        dtypes = [DType.FP32, DType.FP16, DType.INT8]
        if (major, minor) >= (8, 0):
            dtypes.append(DType.BF16)
        if (major, minor) >= (8, 9):
            dtypes.append(DType.FP8)
        return CapabilityDescriptor(
            supported_dtypes=dtypes,
            supported_kernels=(KernelKind.LAYERNORM,),
            device_name=props.name,
            device_type="cuda",
            compute_capability=f"{major}.{minor}",
            total_memory_bytes=total,
            available_memory_bytes=free,
            supported_collectives=tuple(CollectiveOp),
            extra={
                "compute_dtypes": ",".join(d.value for d in dtypes),
                "multiprocessors": str(props.multi_processor_count),
                "torch": torch.__version__,
                "cuda_runtime": str(torch.version.cuda),
                "nccl": _nccl_version(),
                "kv_movement": "triton: one launch per batch, host pool mapped (zero-copy)",
            },
        )

    def mem_get_info(self, index: int) -> tuple[int, int]:
        self._check(index)
        self.captures.check("reading device memory")
        free, total = torch.cuda.mem_get_info(index)
        return free, total

    def synchronize(self, index: int) -> None:
        self._check(index)
        self.captures.check("synchronize")
        torch.cuda.synchronize(index)

    # Streams.

    def new_stream(self, index: int) -> torch.cuda.Stream:
        self._check(index)
        stream: torch.cuda.Stream = torch.cuda.Stream(device=index)  # type: ignore[no-untyped-call]  # unannotated in torch
        return stream

    def default_stream(self, index: int) -> torch.cuda.Stream:
        return torch.cuda.default_stream(index)

    def current_stream(self, index: int) -> torch.cuda.Stream:
        return torch.cuda.current_stream(index)

    def use_stream(self, stream: torch.cuda.Stream) -> AbstractContextManager[object]:
        return torch.cuda.stream(stream)

    def stream_query(self, stream: torch.cuda.Stream) -> bool:
        self.captures.check("stream query")
        return bool(stream.query())

    def stream_synchronize(self, stream: torch.cuda.Stream) -> None:
        self.captures.check("stream synchronize")
        stream.synchronize()

    def stream_wait_event(self, stream: torch.cuda.Stream, event: PooledEvent) -> None:
        stream.wait_event(event.event)

    def stream_wait_stream(self, stream: torch.cuda.Stream, other: torch.cuda.Stream) -> None:
        stream.wait_stream(other)

    # Events.

    def new_event(self, enable_timing: bool) -> PooledEvent:
        device = torch.cuda.current_device()
        return PooledEvent(
            self._events.take(device, enable_timing), enable_timing, device, self._events
        )

    def event_record(self, event: PooledEvent, stream: torch.cuda.Stream) -> None:
        if event.device != stream.device_index:
            # A CUDA event belongs to the device it was first recorded on.
            self._events.give_back(event.device, event.enable_timing, event.event)
            event.event = self._events.take(stream.device_index, event.enable_timing)
            event.device = stream.device_index
        event.event.record(stream)

    def event_query(self, event: PooledEvent) -> bool:
        self.captures.check("event query")
        done: bool = event.event.query()  # type: ignore[no-untyped-call]  # unannotated in torch
        return done

    def event_synchronize(self, event: PooledEvent) -> None:
        self.captures.check("event synchronize")
        event.event.synchronize()

    def event_elapsed_ms(self, start: PooledEvent, end: PooledEvent) -> float:
        """CUDA's rules: both events recorded with timing and completed (synchronize first)."""
        self.captures.check("elapsed_ms")
        try:
            return float(start.event.elapsed_time(end.event))
        except RuntimeError as exc:
            raise EventStateError(
                f"CUDA cannot time these events: {exc}",
                hint="call synchronize() on the end event before elapsed_ms, and record both "
                "events on streams of the same device",
            ) from None

    def _check(self, index: int) -> None:
        count = self.device_count()
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise InvalidArgumentError(
                f"cuda:{index} does not exist: {visible_devices_text(count)}",
                hint=f"use cuda:0..cuda:{count - 1}" if count else "this process sees no GPU",
            )


def new_cuda_event(enable_timing: bool) -> torch.cuda.Event:
    """A new ``torch.cuda.Event`` (its constructor is unannotated in torch)."""
    event: torch.cuda.Event = torch.cuda.Event(enable_timing=enable_timing)  # type: ignore[no-untyped-call]  # unannotated in torch
    return event


def _nccl_version() -> str:
    version: tuple[int, ...] | int = torch.cuda.nccl.version()  # type: ignore[no-untyped-call]  # unannotated in torch
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def visible_devices_text(count: int) -> str:
    """``"2 CUDA devices are visible (CUDA_VISIBLE_DEVICES=0,3)"`` and the like."""
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f"CUDA_VISIBLE_DEVICES={shown}" if shown is not None else "CUDA_VISIBLE_DEVICES unset"
    noun = "device is" if count == 1 else "devices are"
    return f"{count} CUDA {noun} visible ({where})"
