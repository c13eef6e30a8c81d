"""Every reason the cuda backend can be unavailable, found without a GPU and without torch.

The torch builds are real stand-in packages (``torch/__init__.py`` and ``torch/version.py`` on
their own ``sys.path`` entry) read by the probe in a fresh interpreter; NVML is the real ctypes
path for a missing driver and a small stand-in object for the answers a driver gives.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sagellm_backend.errors import BackendUnavailableError
from sagellm_backend_cuda import create_cuda_backend
from sagellm_backend_cuda.probe import (
    NvmlError,
    SystemNvml,
    TorchBuild,
    unavailable_reason,
    visible_device_count,
)

CUDA_BUILD = TorchBuild("2.11.0+cu130", "13.0", None)


class FakeNvml:
    """What NVML answers on a machine: a device count, or a failure."""

    def __init__(self, count: int = 1, failure: str | None = None) -> None:
        self.count = count
        self.failure = failure

    def device_count(self) -> int:
        if self.failure is not None:
            raise NvmlError(self.failure)
        return self.count


def _stand_in_torch(root: Path, version_py: str) -> Path:
    package = root / "torch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the probe must not import torch')\n")
    (package / "version.py").write_text(version_py)
    return root


def _without_torch(root: Path) -> Path:
    """A ``sys.path`` entry holding only what the probe imports (links), and no torch."""
    root.mkdir()
    for name in ("sagellm_backend", "sagellm_backend_cuda", "typing_extensions"):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None
        origin = Path(spec.origin)
        source = origin.parent if origin.name == "__init__.py" else origin
        (root / source.name).symlink_to(source)
    return root


def _build_in_subprocess(path: Path) -> dict[str, object] | None:
    code = (
        "import json, dataclasses\n"
        "from sagellm_backend_cuda.probe import find_torch_build\n"
        "build = find_torch_build()\n"
        "print(json.dumps(None if build is None else dataclasses.asdict(build)))\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(path), *(p for p in sys.path if p)])
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, object] | None = json.loads(out.stdout)
    return result


CUDA_VERSION_PY = (
    "from typing import Optional\n"
    "__version__ = '2.11.0+cu130'\n"
    "cuda: Optional[str] = '13.0'\n"
    "hip: Optional[str] = None\n"
)
ROCM_VERSION_PY = "__version__ = '2.11.0+rocm7.0'\ncuda = None\nhip = '7.0.51831'\n"


def test_build_of_a_cuda_torch_is_read_without_importing_it(tmp_path: Path) -> None:
    build = _build_in_subprocess(_stand_in_torch(tmp_path, CUDA_VERSION_PY))
    assert build == {"version": "2.11.0+cu130", "cuda": "13.0", "hip": None}


def test_build_of_a_rocm_torch_is_read_without_importing_it(tmp_path: Path) -> None:
    build = _build_in_subprocess(_stand_in_torch(tmp_path, ROCM_VERSION_PY))
    assert build == {"version": "2.11.0+rocm7.0", "cuda": None, "hip": "7.0.51831"}


def test_no_torch_at_all(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from sagellm_backend_cuda.probe import find_torch_build, probe\n"
        "assert find_torch_build() is None\n"
        "print(probe())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(_without_torch(tmp_path / "site")))
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("torch is not installed; install a CUDA build of torch:")
    assert unavailable_reason(None, FakeNvml(), {}) == out.stdout.strip()


def test_the_cpu_build_of_torch_here_is_no_cuda_build() -> None:
    torch = pytest.importorskip("torch", reason="needs the CPU build of torch")
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    with pytest.raises(BackendUnavailableError, match="not a CUDA build of torch") as info:
        create_cuda_backend()
    release = torch.__version__.split("+")[0]
    assert f"pip install --force-reinstall 'torch=={release}' --index-url " in str(info.value)
    assert "isagellm-backend-cuda" not in str(info.value), "the wheel is installed already"
    assert "docs/" not in str(info.value)


def test_rocm_build_is_not_a_cuda_device() -> None:
    reason = unavailable_reason(TorchBuild("2.11.0+rocm7.0", None, "7.0"), FakeNvml(), {})
    assert reason is not None
    assert "ROCm build" in reason and "AMD GPUs" in reason
    assert "pip install --force-reinstall 'torch==2.11.0' --index-url" in reason


def test_no_driver_through_the_real_nvml_loader() -> None:
    nvml = SystemNvml("libnvidia-ml-missing.so.1")
    reason = unavailable_reason(CUDA_BUILD, nvml, {})
    assert reason is not None and reason.startswith("no NVIDIA driver")
    assert "libnvidia-ml-missing.so.1" in reason and "install the NVIDIA driver" in reason


def test_driver_failing_and_no_device() -> None:
    failing = FakeNvml(failure="the NVIDIA driver is not usable: nvmlInit failed")
    assert unavailable_reason(CUDA_BUILD, failing, {}) == failing.failure
    no_device = unavailable_reason(CUDA_BUILD, FakeNvml(count=0), {})
    assert no_device is not None and no_device.startswith("the NVIDIA driver sees no device; ")
    assert "nvidia-smi" in no_device


def test_visible_devices_hiding_every_gpu() -> None:
    for hidden in ("", "-1", "7", "0,0", "none"):
        reason = unavailable_reason(CUDA_BUILD, FakeNvml(2), {"CUDA_VISIBLE_DEVICES": hidden})
        assert reason is not None and "CUDA_VISIBLE_DEVICES" in reason, hidden
        assert reason.endswith("; unset it, or list device indices such as 0,1")
    assert unavailable_reason(CUDA_BUILD, FakeNvml(2), {"CUDA_VISIBLE_DEVICES": "1"}) is None
    assert unavailable_reason(CUDA_BUILD, FakeNvml(1), {}) is None


@pytest.mark.parametrize(
    ("text", "physical", "visible"),
    [
        (None, 4, 4),
        ("", 4, 0),
        ("0,1", 4, 2),
        ("2,0,9,1", 4, 2),
        ("1,-1,0", 4, 1),
        ("1,1", 4, 0),
        ("3", 2, 0),
        ("GPU-aaa,GPU-bbb", 4, 2),
        ("GPU-aaa,0", 4, 1),
        ("GPU-aaa,GPU-aaa", 4, 0),
        ("MIG-a,MIG-b,MIG-c", 2, 2),
    ],
)
def test_visible_device_count_follows_cuda(text: str | None, physical: int, visible: int) -> None:
    environ = {} if text is None else {"CUDA_VISIBLE_DEVICES": text}
    assert visible_device_count(physical, environ) == visible


def test_a_probe_that_saw_devices_cuda_does_not_gives_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CUDA_VISIBLE_DEVICES naming a UUID of no device: CUDA counts none, so creation says the
    backend is unavailable (a fallback list moves on) rather than that cuda:0 is out of range."""
    pytest.importorskip("torch", reason="the cuda backend needs torch")
    from sagellm_backend.factory import DeviceSelection
    from sagellm_backend_cuda.provider import CUDA, create_cuda_provider

    monkeypatch.setattr(CUDA, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-deadbeef")
    with pytest.raises(BackendUnavailableError, match="GPU-deadbeef") as info:
        create_cuda_provider(DeviceSelection())
    assert info.value.hint is not None and "nvidia-smi -L" in info.value.hint
