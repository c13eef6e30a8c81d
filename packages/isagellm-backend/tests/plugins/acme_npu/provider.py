"""The Acme NPU provider and its factory, written the way the seed's example writes a backend.

The device is simulated by the mock (a real plugin would drive its hardware here); what matters
is the shape: a provider class of its own kind, a capability matrix, and a plain
``factory(config=None, **options)`` entry point.
"""

from __future__ import annotations

from sagellm_backend import BackendProvider, CapabilityDescriptor, DType, KernelKind
from sagellm_backend.errors import InvalidArgumentError
from sagellm_backend.mock import MockBackendProvider, MockTensor

__all__ = ["AcmeNpuProvider", "create_acme_npu_backend"]


class AcmeNpuProvider(MockBackendProvider):
    """Acme's NPU: fp16, bf16 and int8, matmul and attention kernels, no collectives."""

    def __init__(self, *, device_index: int = 0, max_memory_mb: int = 1024) -> None:
        super().__init__(
            supported_dtypes=[DType.FP16, DType.BF16, DType.INT8],
            supported_kernels=[KernelKind.MATMUL, KernelKind.ATTENTION],
            has_collective=False,
            max_memory_mb=max_memory_mb,
            device_type="acme_npu",
            device_index=device_index,
        )

    @property
    def kind(self) -> str:
        return "acme_npu"

    def capability(self) -> CapabilityDescriptor:
        return super().capability().replace(device_name="Acme NPU 1")


def create_acme_npu_backend(config: object = None, max_memory_mb: int = 1024) -> AcmeNpuProvider:
    """Entry point: ``config`` is None or has ``kind``, ``device`` and ``device_ids``."""
    index = 0
    device = getattr(config, "device", None)
    if device is not None:
        index = int(str(device).rpartition(":")[2])
    device_ids = getattr(config, "device_ids", None)
    if device_ids is not None and len(device_ids) > 1:
        raise InvalidArgumentError(
            f"acme_npu drives one device per provider; got device_ids={list(device_ids)}",
            hint="create one provider per device",
        )
    return AcmeNpuProvider(device_index=index, max_memory_mb=max_memory_mb)


def conforms(provider: AcmeNpuProvider) -> BackendProvider[MockTensor]:
    """The typing check of the plugin: mypy rejects this if the provider misses the protocol."""
    return provider
