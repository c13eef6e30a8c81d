"""Typing tests for the value types: checked by mypy (``warn_unused_ignores``), never run.

The value types derive from ``Frozen`` rather than being written as dataclasses; mypy reads
each one's constructor from its fields (``dataclass_transform``), so a call that leaves out a
field, passes a wrong type, repeats or misnames an argument is refused, as is assigning a
field, which the deliberate ``# type: ignore[...]`` lines prove (an unneeded one is an error).
A class that writes its own ``__init__`` (``CapabilityDescriptor``) keeps that signature.
"""

from __future__ import annotations

from typing_extensions import assert_type

from sagellm_backend import CapabilityDescriptor, DeviceRef, DType, KVLayout, MemoryStats
from sagellm_backend.registry import BackendRecord, RecordSource, RecordStatus
from sagellm_backend.registry.isolation import Outcome

device = DeviceRef("cuda", 0)
assert_type(device.kind, str)
assert_type(device.index, int | None)
host = DeviceRef(kind="host")
layout = KVLayout(num_layers=4, head_size=128, dtype=DType.FP16)
assert_type(layout.dtype, DType | None)
stats = MemoryStats(100, 50, 60, 3, 4, kv_pages_total=9)
record = BackendRecord("mock", RecordStatus.FOUND, RecordSource.BUILTIN, aliases=("m",))
assert_type(Outcome(value=3).value, int | None)
capability = CapabilityDescriptor(device_type="cpu", max_batch_size=8)

DeviceRef()  # type: ignore[call-arg]
DeviceRef(0)  # type: ignore[arg-type]
DeviceRef("cuda", "0")  # type: ignore[arg-type]
DeviceRef("cuda", 0, 1)  # type: ignore[call-arg]
DeviceRef("cuda", kind="cpu")  # type: ignore[misc]
DeviceRef(kind="cuda", ordinal=0)  # type: ignore[call-arg]
MemoryStats(100, 50, 60, 3)  # type: ignore[call-arg]
KVLayout(head_size="128")  # type: ignore[arg-type]
BackendRecord("mock", "found", RecordSource.BUILTIN)  # type: ignore[arg-type]
CapabilityDescriptor(device_type=3)  # type: ignore[arg-type]
device.index = 1  # type: ignore[misc]
layout.head_size = 64  # type: ignore[misc]
