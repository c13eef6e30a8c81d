"""sagellm_backend: the hardware abstraction layer of the sageLLM inference engine.

Engine code talks to :class:`BackendProvider`; backends are chosen by config string with
:func:`get_backend`. Importing this package imports no torch and no device library; the mock
and the registry are imported on first use of one of their names.
"""

import importlib
from typing import TYPE_CHECKING, Any

from sagellm_backend._version import __version__
from sagellm_backend.capability import CapabilityDescriptor
from sagellm_backend.device import HOST, DeviceRef, MemoryStats
from sagellm_backend.dtypes import CollectiveOp, DType, KernelKind, ReduceOp
from sagellm_backend.errors import (
    BackendError,
    BackendLoadError,
    BackendNotFoundError,
    BackendNotInstalledError,
    BackendUnavailableError,
    BlockNotFoundError,
    CapabilityError,
    CommBackendNotSupportedError,
    CommError,
    CommGroupBrokenError,
    CommRankMismatchError,
    CommTimeoutError,
    DeadlineExceededError,
    ErrorCode,
    EventStateError,
    GraphCaptureError,
    IncompatiblePluginError,
    InvalidArgumentError,
    InvalidBlockError,
    InvalidSpecError,
    KernelExistsError,
    KernelNotFoundError,
    ResourceExhaustedError,
    UnknownOptionError,
)
from sagellm_backend.kernels import KernelSpec
from sagellm_backend.kv import KVBlock, KVBlockInfo, KVLayout
from sagellm_backend.ops import STANDARD_OPS, OpName, StandardOp
from sagellm_backend.protocols import (
    BackendProvider,
    BatchMetadata,
    CollectiveOps,
    Event,
    FusedAddRmsNorm,
    Graph,
    GraphCapture,
    KernelRegistry,
    KVBlockManager,
    KVCacheAccess,
    KVCacheWrite,
    OpLookup,
    PagedAttentionDecode,
    PagedAttentionPrefill,
    RmsNorm,
    RotaryCosSinCache,
    RotaryEmbedding,
    Sample,
    SiluAndMul,
    Stream,
    StreamOps,
)

if TYPE_CHECKING:
    from sagellm_backend.mock import (
        MockBackendProvider,
        MockTensor,
        create_mock_backend,
        create_mock_world,
    )
    from sagellm_backend.registry import (
        BackendRecord,
        get_backend,
        list_backends,
        parse_spec,
        register_backend,
    )
    from sagellm_backend.torch_backend.cpu import create_cpu_backend

_LAZY = {
    "MockBackendProvider": "sagellm_backend.mock",
    "MockTensor": "sagellm_backend.mock",
    "create_mock_backend": "sagellm_backend.mock",
    "create_mock_world": "sagellm_backend.mock",
    "BackendRecord": "sagellm_backend.registry",
    "get_backend": "sagellm_backend.registry",
    "list_backends": "sagellm_backend.registry",
    "parse_spec": "sagellm_backend.registry",
    "register_backend": "sagellm_backend.registry",
    "create_cpu_backend": "sagellm_backend.torch_backend.cpu",
}
"""Names whose modules load on first use, so that ``import sagellm_backend`` stays cheap."""


if not TYPE_CHECKING:  # type checkers see the imports above, and no catch-all attribute

    def __getattr__(name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'sagellm_backend' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BackendError",
    "BackendLoadError",
    "BackendNotFoundError",
    "BackendNotInstalledError",
    "BackendProvider",
    "BackendRecord",
    "BackendUnavailableError",
    "BatchMetadata",
    "BlockNotFoundError",
    "CapabilityDescriptor",
    "CapabilityError",
    "CollectiveOp",
    "CollectiveOps",
    "CommBackendNotSupportedError",
    "CommError",
    "CommGroupBrokenError",
    "CommRankMismatchError",
    "CommTimeoutError",
    "DType",
    "DeadlineExceededError",
    "DeviceRef",
    "ErrorCode",
    "Event",
    "EventStateError",
    "FusedAddRmsNorm",
    "Graph",
    "GraphCapture",
    "GraphCaptureError",
    "HOST",
    "IncompatiblePluginError",
    "InvalidArgumentError",
    "InvalidBlockError",
    "InvalidSpecError",
    "KVBlock",
    "KVBlockInfo",
    "KVBlockManager",
    "KVCacheAccess",
    "KVCacheWrite",
    "KVLayout",
    "KernelExistsError",
    "KernelKind",
    "KernelNotFoundError",
    "KernelRegistry",
    "KernelSpec",
    "MemoryStats",
    "MockBackendProvider",
    "MockTensor",
    "OpLookup",
    "OpName",
    "PagedAttentionDecode",
    "PagedAttentionPrefill",
    "ReduceOp",
    "ResourceExhaustedError",
    "RmsNorm",
    "RotaryCosSinCache",
    "RotaryEmbedding",
    "STANDARD_OPS",
    "Sample",
    "SiluAndMul",
    "StandardOp",
    "Stream",
    "StreamOps",
    "UnknownOptionError",
    "__version__",
    "create_cpu_backend",
    "create_mock_backend",
    "create_mock_world",
    "get_backend",
    "list_backends",
    "parse_spec",
    "register_backend",
]
