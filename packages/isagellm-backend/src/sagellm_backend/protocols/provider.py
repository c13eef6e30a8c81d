"""BackendProvider: the whole device surface, one protocol generic in the tensor type."""

from __future__ import annotations

from typing import Protocol, TypeVar, runtime_checkable

from sagellm_backend.capability import CapabilityDescriptor
from sagellm_backend.protocols.collectives import CollectiveOps
from sagellm_backend.protocols.kernels import KernelRegistry
from sagellm_backend.protocols.kv import KVBlockManager, KVCacheAccess
from sagellm_backend.protocols.ops import OpLookup
from sagellm_backend.protocols.streams import GraphCapture, StreamOps

__all__ = ["BackendProvider"]

T = TypeVar("T")


@runtime_checkable
class BackendProvider(
    StreamOps,
    CollectiveOps[T],
    KVBlockManager,
    KVCacheAccess[T],
    KernelRegistry,
    OpLookup[T],
    GraphCapture,
    Protocol[T],
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
        """Release the provider's device memory and process group; later calls on the provider
        are refused (BackendUnavailableError), but ``capability()`` stays readable. The torch
        backends' streams and events are the device's and stay usable; the mock's are refused
        too."""
