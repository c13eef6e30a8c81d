"""The cuda backend's conformance target, found by ``sagellm-backend check cuda``.

NCCL runs one rank per GPU and refuses two ranks on one device, so the target does not start
worlds of its own: collectives run on the provider's own world, which is one rank in a plain
process and every rank of a job under torchrun (``torchrun --nproc-per-node N -m
sagellm_backend check cuda``).
"""

from __future__ import annotations

import torch

from sagellm_backend.factory import OptionValue
from sagellm_backend.protocols import BackendProvider
from sagellm_backend.registry import get_backend
from sagellm_backend.testing.target import ConformanceTarget
from sagellm_backend.torch_backend.conformance import TorchTensors

__all__ = ["CudaTarget"]


class CudaTarget(ConformanceTarget[torch.Tensor]):
    """Providers from ``get_backend(spec)``, with small pools unless the spec sets its own."""

    tensors = TorchTensors()
    exhaustion_limit_bytes = None
    """The pools are preallocated: exhausting one allocates nothing."""

    def __init__(self, spec: str | None = "cuda", **options: OptionValue) -> None:
        self.spec = spec or "cuda"
        self.name = self.spec
        self.options: dict[str, OptionValue] = dict(options)
        if "?" not in self.spec:
            self.options = {"num_blocks": 512, "host_num_blocks": 512, **self.options}

    def make_provider(self) -> BackendProvider[torch.Tensor]:
        provider: BackendProvider[torch.Tensor] = get_backend(self.spec, **self.options)
        return provider
