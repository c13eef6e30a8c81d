"""NpuAdapter: Ascend NPUs as a device of the shared torch layer, and HCCL's abilities.

Streams and events are torch_npu's own (``torch.npu.Stream``, ``torch.npu.Event``). torch_npu
checks less than CUDA does when timing events (it does not refuse an event created without
timing); the torch layer's TorchEvent applies CUDA's rules to every device, so elapsed_ms here
refuses an unrecorded event or one without timing with EventStateError before torch_npu is
asked.

While an NPU graph is being captured (see :mod:`sagellm_backend_ascend.graphs`), every call that
would wait for the device is refused with GraphCaptureError before it reaches torch_npu, where
it would fail with ACL error 107027 ("stream is captured") and invalidate the capture.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import AbstractContextManager
from types import ModuleType

import torch

from sagellm_backend.capability import CapabilityDescriptor
from sagellm_backend.dtypes import ReduceOp
from sagellm_backend.errors import InvalidArgumentError
from sagellm_backend.torch_backend.capture import CaptureGuard
from sagellm_backend.torch_backend.collectives import FLOAT8, WIDE_UNSIGNED, CommSpec
from sagellm_backend_ascend.runtime import NpuEvent, NpuModule, NpuStream
from sagellm_backend_ascend.soc import SocFamily

__all__ = ["HCCL", "NpuAdapter"]

HCCL = CommSpec(
    backend="hccl",
    reduce_ops=frozenset({ReduceOp.SUM, ReduceOp.PROD, ReduceOp.MIN, ReduceOp.MAX}),
    float_only_ops=frozenset(),
    int_only_ops=frozenset(),
    unsupported_dtypes=FLOAT8 | WIDE_UNSIGNED | {torch.complex64, torch.complex128},
)
"""HCCL through torch_npu's ProcessGroupHCCL: its reduce-op table holds sum, prod, min and max
only (no avg, band, bor, bxor); its dtype table covers the integer types, fp16, bf16, fp32,
fp64 and bool, and fp8 only in recent releases, so fp8 is refused."""


class NpuAdapter:
    """The NPUs of this process, through ``torch.npu``.

    The device a provider drives is made current with ``torch.npu.set_device`` before its
    process group is created, as HCCL requires: :meth:`select` does it for an explicit index,
    :meth:`bind` for the launcher's LOCAL_RANK.
    """

    def __init__(self, torch_npu: ModuleType, *, pin_host_memory: bool) -> None:
        self._torch_npu = torch_npu
        self._npu: NpuModule = torch_npu.npu
        self._pin = pin_host_memory
        self._selected: int | None = None
        self.captures = CaptureGuard("an NPU graph")

    @property
    def kind(self) -> str:
        return "ascend"

    @property
    def comm(self) -> CommSpec:
        return HCCL

    @property
    def pins_host_memory(self) -> bool:
        return self._pin

    @property
    def torch_npu_version(self) -> str:
        version: str = getattr(self._torch_npu, "__version__", "unknown")
        return version

    def device_count(self) -> int:
        return self._npu.device_count()

    def torch_device(self, index: int) -> torch.device:
        return torch.device("npu", self._check(index))

    def select(self, index: int) -> int:
        """Make ``npu:index`` this process's current device; later binds keep it."""
        self._npu.set_device(self._check(index))
        self._selected = index
        return index

    def bind(self, environ: Mapping[str, str]) -> int | None:
        """The selected device, else LOCAL_RANK's device (made current), else None."""
        if self._selected is not None:
            return self._selected
        index = self.local_rank(environ)
        return None if index is None else self.select(index)

    def local_rank(self, environ: Mapping[str, str]) -> int | None:
        """LOCAL_RANK's device index, not made current; None without a launcher."""
        text = environ.get("LOCAL_RANK")
        if not text:
            return None
        if not (text.isascii() and text.isdigit()):
            raise InvalidArgumentError(
                f"LOCAL_RANK={text!r} is not a device index",
                hint="launch with torchrun, or unset LOCAL_RANK and name the device: ascend:N",
            )
        return int(text)

    def soc_family(self, index: int) -> SocFamily:
        return SocFamily.of(self._npu.get_device_properties(self._check(index)).name)

    def capability(self, index: int) -> CapabilityDescriptor:
        properties = self._npu.get_device_properties(self._check(index))
        family = SocFamily.of(properties.name)
        free, total = self.mem_get_info(index)
        return CapabilityDescriptor(
            supported_dtypes=family.dtypes,
            device_name=properties.name,
            device_type="npu",
            total_memory_bytes=total,
            available_memory_bytes=free,
            has_stream=True,
            has_event=True,
            extra={
                "soc_family": family.value,
                "soc_dtypes": ",".join(d.value for d in family.dtypes),
                "cube_cores": str(properties.cube_core_num),
                "vector_cores": str(properties.vector_core_num),
                "torch": torch.__version__,
                "torch_npu": self.torch_npu_version,
                "ascend_home_path": os.environ.get("ASCEND_HOME_PATH", "unset"),
            },
        )

    def mem_get_info(self, index: int) -> tuple[int, int]:
        free, total = self._npu.mem_get_info(self._check(index))
        return int(free), int(total)

    def synchronize(self, index: int) -> None:
        self._check(index)
        self.captures.check("synchronize")
        self._npu.synchronize(index)

    # Streams.

    def new_stream(self, index: int) -> NpuStream:
        return self._npu.Stream(device=self._check(index))

    def default_stream(self, index: int) -> NpuStream:
        return self._npu.default_stream(self._check(index))

    def current_stream(self, index: int) -> NpuStream:
        return self._npu.current_stream(self._check(index))

    def use_stream(self, stream: NpuStream) -> AbstractContextManager[object]:
        return self._npu.stream(stream)

    def stream_query(self, stream: NpuStream) -> bool:
        self.captures.check("stream query")
        return stream.query()

    def stream_synchronize(self, stream: NpuStream) -> None:
        self.captures.check("stream synchronize")
        stream.synchronize()

    def stream_wait_event(self, stream: NpuStream, event: NpuEvent) -> None:
        stream.wait_event(event)

    def stream_wait_stream(self, stream: NpuStream, other: NpuStream) -> None:
        stream.wait_stream(other)

    # Events.

    def new_event(self, enable_timing: bool) -> NpuEvent:
        return self._npu.Event(enable_timing=enable_timing)

    def event_record(self, event: NpuEvent, stream: NpuStream) -> None:
        event.record(stream)

    def event_query(self, event: NpuEvent) -> bool:
        self.captures.check("event query")
        return event.query()

    def event_synchronize(self, event: NpuEvent) -> None:
        self.captures.check("event synchronize")
        event.synchronize()

    def event_elapsed_ms(self, start: NpuEvent, end: NpuEvent) -> float:
        self.captures.check("elapsed_ms")
        return start.elapsed_time(end)

    def _check(self, index: int) -> int:
        count = self._npu.device_count()
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
            shown = (
                f"ASCEND_RT_VISIBLE_DEVICES={visible!r}"
                if visible is not None
                else ("all devices visible")
            )
            raise InvalidArgumentError(
                f"ascend:{index} does not exist; {count} NPU(s) are visible ({shown})",
                hint=f"use an index in 0..{count - 1}; indices count the visible devices only",
            )
        return index
