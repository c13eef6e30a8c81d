"""The ascend backend's conformance target, found by ``sagellm-backend check ascend``.

Ranks are processes, as for the cpu backend: a world of N runs rank r on ``npu:r`` (its
LOCAL_RANK), over HCCL. World sizes larger than the number of visible NPUs are left out.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from sagellm_backend.factory import OptionValue
from sagellm_backend.protocols import BackendProvider
from sagellm_backend.registry.spec import parse_spec
from sagellm_backend.torch_backend.conformance import CpuTarget
from sagellm_backend_ascend import create_ascend_backend
from sagellm_backend_ascend.availability import load_torch_npu

__all__ = ["AscendTarget", "target_for_spec"]


class AscendTarget(CpuTarget):
    """ascend providers built with ``options``; collectives on worlds of ``world_sizes``."""

    exhaustion_limit_bytes = None
    """The pools are preallocated: exhausting one allocates nothing."""

    def __init__(
        self, *, world_sizes: Sequence[int] = (2,), name: str = "ascend", **options: OptionValue
    ) -> None:
        super().__init__(world_sizes=world_sizes, name=name, **options)

    def make_provider(self) -> BackendProvider[torch.Tensor]:
        provider: BackendProvider[torch.Tensor] = create_ascend_backend(**self.options)
        return provider

    def make_rank_provider(
        self, rank: int, world_size: int, port: int
    ) -> BackendProvider[torch.Tensor]:
        os.environ["LOCAL_RANK"] = str(rank)
        provider: BackendProvider[torch.Tensor] = create_ascend_backend(
            **self.options,
            rank=rank,
            world_size=world_size,
            master_addr="127.0.0.1",
            master_port=port,
        )
        return provider

    def world_sizes(self) -> tuple[int, ...]:
        count = int(load_torch_npu().npu.device_count())
        return tuple(n for n in super().world_sizes() if n <= count) or (1,)


def target_for_spec(spec: str | None) -> AscendTarget:
    """The ``sagellm.conformance`` entry point: a target with the spec's options."""
    target = AscendTarget(name=spec or "ascend")
    if spec:
        target.options.update(parse_spec(spec).candidates[0].option_dict)
    return target
