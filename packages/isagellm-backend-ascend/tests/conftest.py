"""Make the strict stand-in importable as ``torch_npu`` for these tests and their subprocesses.

The stand-in lives in ``fake_torch_npu/``; it is put on ``sys.path`` and ``PYTHONPATH`` here and
nowhere else, so it is never installed. Its configuration (two Atlas A2 NPUs of 1 GiB, fused
operators present) is fixed before anything imports it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

FAKE = str(Path(__file__).parent / "fake_torch_npu")
SOURCES = [
    str(Path(__file__).parents[2] / name / "src")
    for name in ("isagellm-backend", "isagellm-backend-ascend")
]

os.environ.setdefault("FAKE_TORCH_NPU_DEVICES", "2")
os.environ.setdefault("FAKE_TORCH_NPU_SOC", "Ascend910B3")
os.environ.setdefault("FAKE_TORCH_NPU_MEMORY_MB", "1024")
if FAKE not in sys.path:
    sys.path.insert(0, FAKE)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (FAKE, os.environ.get("PYTHONPATH", "")) if p)

RunPython = Callable[..., "subprocess.CompletedProcess[str]"]


def _run_python(code: str, *, fake: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter; the stand-in is importable only when ``fake``.

    For what a process can do once: import torch_npu in one of the stand-in's modes, create
    its first HCCL group, measure what an import pulls in.
    """
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FAKE_TORCH_NPU_") and k not in ("PYTHONPATH", "LOCAL_RANK")
    }
    environ["PYTHONPATH"] = os.pathsep.join(([FAKE] if fake else []) + SOURCES)
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def run_python() -> RunPython:
    return _run_python
