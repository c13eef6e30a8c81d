"""The cuda entry point without a GPU: metadata, import cost, option and device validation."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest

from sagellm_backend.errors import (
    InvalidArgumentError,
    UnknownOptionError,
)
from sagellm_backend.factory import BackendFactory
from sagellm_backend_cuda import create_cuda_backend

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _installed() -> bool:
    try:
        metadata.distribution("isagellm-backend-cuda")
    except metadata.PackageNotFoundError:
        return False
    return True


def test_pyproject_declares_the_entry_point() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert project["entry-points"]["sagellm.backends"] == {
        "cuda": "sagellm_backend_cuda:create_cuda_backend"
    }
    assert project["entry-points"]["sagellm.conformance"] == {
        "cuda": "sagellm_backend_cuda.testing:CudaTarget"
    }
    assert project["entry-points"]["sagellm.bench"] == {
        "cuda": "sagellm_backend_cuda.bench:device_suite"
    }


@pytest.mark.skipif(not _installed(), reason="isagellm-backend-cuda is not installed here")
def test_installed_entry_point_loads_the_factory() -> None:
    (entry,) = [e for e in metadata.entry_points(group="sagellm.backends") if e.name == "cuda"]
    assert entry.load() is create_cuda_backend
    requires = metadata.requires("isagellm-backend-cuda") or []
    core = metadata.version("isagellm-backend")
    assert f"isagellm-backend=={core}" in requires


def test_importing_the_plugin_imports_no_torch_or_triton() -> None:
    code = (
        "import sys, json, sagellm_backend_cuda\n"
        "from sagellm_backend_cuda import create_cuda_backend\n"
        "create_cuda_backend.options\n"
        "print(json.dumps(sorted(m for m in ('torch', 'triton', 'numpy') if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(out.stdout) == []


def test_factory_contract() -> None:
    assert isinstance(create_cuda_backend, BackendFactory)
    assert create_cuda_backend.kind == "cuda"
    for name in ("num_blocks", "kv_memory_mb", "host_kv_memory_mb", "kv_dtype", "rank"):
        assert name in create_cuda_backend.options
    assert create_cuda_backend.install_hint == "", "each unavailability reason names its fix"


def test_options_are_validated_before_any_device_is_touched() -> None:
    with pytest.raises(UnknownOptionError, match="num_pages"):
        create_cuda_backend(None, num_pages=4)
    with pytest.raises(InvalidArgumentError, match="num_blocks"):
        create_cuda_backend(None, num_blocks="many")


def test_config_objects_select_devices() -> None:
    config = SimpleNamespace(kind="cuda", device="cuda:3", device_ids=None)
    assert create_cuda_backend.select_device(config).index == 3
    assert create_cuda_backend.select_device(SimpleNamespace(device="2")).index == 2
    with pytest.raises(InvalidArgumentError, match="another kind"):
        create_cuda_backend.select_device(SimpleNamespace(device="npu:0"))
    with pytest.raises(InvalidArgumentError, match="one device per provider"):
        create_cuda_backend.select_device(SimpleNamespace(device=None, device_ids=[0, 1]))


def test_device_suite_of_a_kind_without_one_is_a_user_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sagellm_backend.cli import main

    assert main(["bench", "mock", "--device-suite"]) == 2
    assert "declares no device benchmark suite" in capsys.readouterr().err


@pytest.mark.skipif(not _installed(), reason="isagellm-backend-cuda is not installed here")
def test_device_suite_without_a_gpu_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch", reason="needs torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the suite runs (see test_cuda_device.py)")
    from sagellm_backend.cli import main

    assert main(["bench", "cuda", "--device-suite", "--quick"]) == 1
    assert "unavailable" in capsys.readouterr().err


def test_device_suite_table_prints_each_size_and_each_target_once() -> None:
    """On the KV-movement figures of the H200 run that docs/cuda.md shows (no attention or model
    kernel rows)."""
    pytest.importorskip("torch", reason="the suite's module needs torch (any build)")
    from sagellm_backend_cuda.bench import TARGETS, format_table

    docs = Path(__file__).resolve().parents[3] / "docs"
    figures = {
        **json.loads((docs / "cuda-kv-movement.json").read_text()),
        "attention": {"decode": [], "prefill": []},
        "model_kernels": {
            "tokens": 16384,
            "hidden": 4096,
            "dtype": "bf16",
            "kernels": [],
            "sampling": [],
        },
    }
    rows = format_table(figures).splitlines()
    for size in (r["blocks"] for r in figures["rows"]):
        assert sum(line.startswith(f"| {size} |") for line in rows) == 1, size
    for target in TARGETS:
        assert sum(line.startswith(f"| {target} |") for line in rows) == 1, target
