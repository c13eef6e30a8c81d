"""The ascend backend passes the conformance kit on the strict torch_npu stand-in.

Collectives run on worlds of 2 processes, each rank on its own NPU over HCCL (gloo underneath).
Host memory is not pinned: torch's Python device backends have no pinned-memory allocator, so
the stand-in cannot pin (docs/ascend.md lists what that leaves to real hardware).
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="needs torch: pip install isagellm-backend-ascend")

from sagellm_backend.testing.suite import BackendConformanceSuite
from sagellm_backend_ascend.testing import AscendTarget


class TestAscendConformance(BackendConformanceSuite):
    def make_target(self) -> AscendTarget:
        return AscendTarget(world_sizes=(2,), pin_host_memory=False)
