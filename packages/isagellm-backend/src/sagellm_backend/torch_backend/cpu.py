"""The ``cpu`` backend's entry point: a factory that imports torch only when a backend is made.

The core's ``[torch]`` extra (torch and numpy) makes it available; without torch,
``sagellm-backend list`` shows it as unavailable with the command that installs them. The
provider is the shared torch layer on
:class:`~sagellm_backend.torch_backend.cpu_device.CpuAdapter`: real tensors, a real KV pool,
collectives over gloo, synchronous streams and host-timestamped events.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from sagellm_backend.factory import BackendFactory
from sagellm_backend.torch_backend.options import torch_options

if TYPE_CHECKING:
    from sagellm_backend.torch_backend.cpu_device import HostEvent, HostStream
    from sagellm_backend.torch_backend.provider import TorchBackendProvider

__all__ = ["INSTALL_HINT", "create_cpu_backend"]

INSTALL_HINT = "pip install torch numpy (the core's [torch] extra; any build of torch will do)"

CPU_KV_MEMORY_MB = 64
"""Default device and host KV pools: 64 MiB each, so several ranks fit on a small machine."""


def torch_missing() -> str | None:
    """Why the cpu backend cannot run here (torch is missing), without importing torch."""
    if importlib.util.find_spec("torch") is None:
        return f"torch is not installed; {INSTALL_HINT}"
    return None


create_cpu_backend: BackendFactory[TorchBackendProvider[HostStream, HostEvent]] = BackendFactory(
    "cpu",
    "sagellm_backend.torch_backend.cpu_device:create_cpu_provider",
    options=torch_options(kv_memory_mb=CPU_KV_MEMORY_MB, host_kv_memory_mb=CPU_KV_MEMORY_MB),
    probe=torch_missing,
    priority=10,
    description="PyTorch on the CPU: real tensors, KV page pool, gloo collectives",
    install_hint=INSTALL_HINT,
)
