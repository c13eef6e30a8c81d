"""The ``ascend`` factory's target: the shared torch provider on an NPU, with the NPU parts.

What the ascend backend adds to the torch layer, and nothing else: the :class:`NpuAdapter`
(torch.npu streams, events, memory, HCCL), the SoC family's dtypes, and torch_npu's fused
kernels and NPU graph capture (:class:`NpuGraphs`) where the installed torch_npu has them.
"""

from __future__ import annotations

import os

from sagellm_backend.dtypes import DType, coerce
from sagellm_backend.errors import CapabilityError, ResourceExhaustedError
from sagellm_backend.factory import DeviceSelection, OptionValue
from sagellm_backend.torch_backend.provider import TorchBackendProvider, create_torch_provider
from sagellm_backend_ascend.availability import load_torch_npu
from sagellm_backend_ascend.device import NpuAdapter
from sagellm_backend_ascend.graphs import NpuGraphs, graph_module
from sagellm_backend_ascend.kernels import register_npu_kernels
from sagellm_backend_ascend.runtime import NpuEvent, NpuStream

__all__ = ["create_ascend_provider"]


def create_ascend_provider(
    device: DeviceSelection, **options: OptionValue
) -> TorchBackendProvider[NpuStream, NpuEvent]:
    """A provider on ``ascend:N`` (N asked for, else LOCAL_RANK's NPU, else 0).

    The NPU is made current (``torch.npu.set_device``) once every option is checked, before the
    KV pools and the HCCL group are created.
    """
    torch_npu = load_torch_npu()
    pin = options.pop("pin_host_memory", True)
    assert isinstance(pin, bool)
    adapter = NpuAdapter(torch_npu, pin_host_memory=pin)
    index = device.index
    if index is None:
        index = adapter.local_rank(os.environ)
    index = 0 if index is None else index
    family = adapter.soc_family(index)
    kv_dtype = coerce(DType, options["kv_dtype"], "kv_dtype")
    if kv_dtype not in family.dtypes:
        pools = [d.value for d in family.dtypes if d in (DType.FP32, DType.FP16, DType.BF16)]
        raise CapabilityError(
            f"{kv_dtype.value} is not supported by the {family.value} SoC family of ascend:{index}",
            hint=f"create the backend with kv_dtype one of {', '.join(pools)}",
        )
    graphs = graph_module(torch_npu)
    try:
        provider = create_torch_provider(
            adapter,
            DeviceSelection(index, device.device_ids),
            options,
            os.environ,
            graphs=None if graphs is None else NpuGraphs(adapter, graphs, index),
            prepare=adapter.select,
        )
    except RuntimeError as exc:  # torch.OutOfMemoryError on recent torch_npu, else RuntimeError
        if "NPU out of memory" not in str(exc):
            raise
        raise ResourceExhaustedError(
            f"ascend:{index} has too little free memory for the KV pool: {exc}",
            hint="lower num_blocks or kv_memory_mb, or free NPU memory first",
        ) from exc
    register_npu_kernels(provider, torch_npu, family)
    return provider
