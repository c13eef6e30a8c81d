"""sagellm_backend_ascend: the ``ascend`` backend of sageLLM, on Huawei Ascend NPUs.

Importing this package imports neither torch nor torch_npu: the entry points (``ascend`` and
its aliases ``ascend_cann`` and ``npu``) are one
:class:`~sagellm_backend.factory.BackendFactory` whose probe reads installed metadata only.
Creating a backend imports torch_npu, turns each way that can fail into its own unavailable
reason (:mod:`sagellm_backend_ascend.availability`), and builds the shared torch layer's
provider on an :class:`~sagellm_backend_ascend.device.NpuAdapter`.

Device selection: ``ascend:N`` is NPU N among those ``ASCEND_RT_VISIBLE_DEVICES`` leaves
visible; ``ascend`` is the NPU of ``LOCAL_RANK`` under a launcher such as torchrun, else NPU 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sagellm_backend.factory import BackendFactory, Option
from sagellm_backend.torch_backend.options import torch_options

if TYPE_CHECKING:
    from sagellm_backend.torch_backend.provider import TorchBackendProvider
    from sagellm_backend_ascend.runtime import NpuEvent, NpuStream

__all__ = ["create_ascend_backend"]

ASCEND_KV_MEMORY_MB = 1024
"""Default device KV pool: 1 GiB; set ``num_blocks`` or ``kv_memory_mb`` for a real model."""
ASCEND_HOST_KV_MEMORY_MB = 1024
"""Default host KV pool (the swap target): 1 GiB."""

create_ascend_backend: BackendFactory[TorchBackendProvider[NpuStream, NpuEvent]] = BackendFactory(
    "ascend",
    "sagellm_backend_ascend.provider:create_ascend_provider",
    options=(
        *torch_options(
            kv_memory_mb=ASCEND_KV_MEMORY_MB, host_kv_memory_mb=ASCEND_HOST_KV_MEMORY_MB
        ),
        Option(
            "pin_host_memory",
            bool,
            True,
            "page-lock the host KV pool so swaps run asynchronously (off where pinned memory "
            "is scarce)",
        ),
    ),
    probe="sagellm_backend_ascend.availability:probe",
    priority=100,
    aliases=("ascend_cann", "npu"),
    description="Huawei Ascend NPUs through torch_npu: KV pool in device memory, HCCL "
    "collectives, fused torch_npu kernels where available",
)
