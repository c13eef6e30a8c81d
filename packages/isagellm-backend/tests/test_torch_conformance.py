"""The cpu backend passes the conformance kit, collectives included (gloo worlds of 2 and 4)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="needs torch: pip install 'isagellm-backend[torch]'")

from sagellm_backend.testing.suite import BackendConformanceSuite
from sagellm_backend.torch_backend.conformance import CpuTarget


class TestCpuConformance(BackendConformanceSuite):
    def make_target(self) -> CpuTarget:
        return CpuTarget(world_sizes=(2, 4))
