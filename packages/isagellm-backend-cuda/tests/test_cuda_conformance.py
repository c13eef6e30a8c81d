"""The cuda backend passes the conformance kit on a real GPU (collectives at world size 1)."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch", reason="the cuda backend needs torch")
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU here: the conformance run needs one", allow_module_level=True)

from sagellm_backend.testing.suite import BackendConformanceSuite
from sagellm_backend.testing.target import ConformanceTarget
from sagellm_backend_cuda.testing import CudaTarget


class TestCudaConformance(BackendConformanceSuite):
    def make_target(self) -> ConformanceTarget[Any]:
        return CudaTarget("cuda:0")


class TestCudaBf16Conformance(BackendConformanceSuite):
    def make_target(self) -> ConformanceTarget[Any]:
        return CudaTarget("cuda:0", kv_dtype="bf16", num_layers=4, num_kv_heads=8, head_size=128)
