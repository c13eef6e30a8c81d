"""The ``cpu`` entry point loads without torch and says how to get torch when it is missing.

Runs with and without torch installed; each session checks the branch that applies to it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from sagellm_backend import BackendUnavailableError
from sagellm_backend.torch_backend.cpu import INSTALL_HINT, create_cpu_backend

HAS_TORCH = importlib.util.find_spec("torch") is not None


def test_loading_the_entry_point_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from importlib.metadata import EntryPoint\n"
        "ep = EntryPoint('cpu', 'sagellm_backend.torch_backend.cpu:create_cpu_backend', "
        "'sagellm.backends')\n"
        "factory = ep.load()\n"
        "factory.unavailable_reason()\n"
        "print(factory.kind, sorted(factory.options)[:3], 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == [
        "cpu",
        "['collective_timeout',",
        "'head_size',",
        "'host_kv_memory_mb']",
        "False",
    ]


def test_the_factory_declares_a_small_default_pool() -> None:
    options = create_cpu_backend.validate_options({})
    assert options["kv_memory_mb"] == 64 and options["host_kv_memory_mb"] == 64
    assert options["kv_dtype"] == "fp16" and options["validate_collectives"] is True
    assert "rank" not in options and "master_port" not in options


@pytest.mark.skipif(HAS_TORCH, reason="checks the message shown where torch is not installed")
def test_without_torch_the_backend_is_unavailable_with_the_fix() -> None:
    assert create_cpu_backend.unavailable_reason() == f"torch is not installed; {INSTALL_HINT}"
    with pytest.raises(BackendUnavailableError) as info:
        create_cpu_backend()
    assert str(info.value).count(INSTALL_HINT) == 1


@pytest.mark.skipif(not HAS_TORCH, reason="checks the probe where torch is installed")
def test_with_torch_the_backend_is_available() -> None:
    assert create_cpu_backend.unavailable_reason() is None
