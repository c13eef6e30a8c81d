"""Every way the ascend backend can be unavailable gives its own reason, and says what fixes it.

Import failures run in a fresh interpreter with the stand-in in the matching mode; the CUDA
conflict and torch's auto-load wrapper, which need a CUDA build of torch or an installed
torch_npu, are checked on the error chains they produce.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

pytest.importorskip("torch", reason="needs torch: pip install isagellm-backend-ascend")

RunPython = Callable[..., "subprocess.CompletedProcess[str]"]
"""The ``run_python`` fixture (conftest.py): a snippet in a fresh interpreter."""

CREATE = (
    "from sagellm_backend.errors import BackendUnavailableError\n"
    "from sagellm_backend_ascend import create_ascend_backend\n"
    "try:\n"
    "    create_ascend_backend(pin_host_memory=False)\n"
    "except BackendUnavailableError as exc:\n"
    "    print(exc.code.value, exc.message)\n"
)


def _reason(run_python: RunPython, fake: bool = True, **env: str) -> str:
    result = run_python(CREATE, fake=fake, **env)
    assert result.returncode == 0, result.stderr
    code, _, message = result.stdout.strip().partition(" ")
    assert code == "unavailable", result.stdout
    return message


def test_torch_npu_not_installed(run_python: RunPython) -> None:
    reason = _reason(run_python, fake=False)
    assert "torch-npu is not installed" in reason
    assert "pip install 'torch-npu==" in reason


def test_cann_missing_or_not_sourced(run_python: RunPython) -> None:
    reason = _reason(run_python, FAKE_TORCH_NPU_IMPORT="no_cann", ASCEND_HOME_PATH="/opt/missing")
    assert "the CANN toolkit is missing or not sourced" in reason
    assert "ASCEND_HOME_PATH=/opt/missing" in reason
    assert "libhccl.so" in reason
    assert "set_env.sh" in reason
    assert "TORCH_DEVICE_BACKEND_AUTOLOAD=0" in reason


def test_torch_and_torch_npu_do_not_pair(run_python: RunPython) -> None:
    reason = _reason(run_python, FAKE_TORCH_NPU_IMPORT="version_mismatch")
    assert "do not pair" in reason
    assert "undefined symbol" in reason


def test_no_npu_visible(run_python: RunPython) -> None:
    reason = _reason(run_python, FAKE_TORCH_NPU_DEVICES="0", ASCEND_RT_VISIBLE_DEVICES="")
    assert "no NPU is visible" in reason
    assert "ASCEND_RT_VISIBLE_DEVICES=''" in reason


def test_cuda_build_of_torch() -> None:
    from sagellm_backend_ascend.availability import cuda_build, diagnose

    conflict = RuntimeError("Cannot have both CUDA and npu.")
    reason = diagnose(conflict, "2.5.1+cu124")
    assert reason is not None
    assert "torch is a CUDA build" in reason
    assert "download.pytorch.org/whl/cpu" in reason
    assert "Cannot have both CUDA and npu." in reason
    assert cuda_build("CUDA 12.4").startswith("torch is a CUDA build (CUDA 12.4)")


def test_autoload_wrapper_is_read_through() -> None:
    from sagellm_backend_ascend.availability import diagnose

    cause = ImportError(
        "libascendcl.so: cannot open shared object file: No such file or directory. Please "
        "check that the runtime package is installed. Please run 'source set_env.sh' in the "
        "CANN installation path."
    )
    try:
        try:
            raise cause
        except ImportError as exc:
            raise RuntimeError(
                "Failed to load the backend extension: torch_npu. You can disable extension "
                "auto-loading with TORCH_DEVICE_BACKEND_AUTOLOAD=0."
            ) from exc
    except RuntimeError as wrapped:
        reason = diagnose(wrapped, "2.5.1")
    assert reason is not None and "libascendcl.so" in reason


def test_an_autoloaded_pairing_failure_names_the_installed_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from importlib import metadata
    from types import SimpleNamespace

    from sagellm_backend.errors import BackendUnavailableError
    from sagellm_backend_ascend import availability

    def import_module(name: str) -> object:
        try:
            raise ImportError("libtorch_npu.so: undefined symbol: _ZN5torch10ValueErrorC1EPKcz")
        except ImportError as exc:
            raise RuntimeError("Failed to load the backend extension: torch_npu.") from exc

    monkeypatch.setattr(availability, "importlib", SimpleNamespace(import_module=import_module))
    monkeypatch.setattr(availability, "probe", lambda: None)
    with pytest.raises(BackendUnavailableError, match="do not pair") as caught:
        availability.load_torch_npu()
    version = metadata.version("torch")
    assert f"torch {version} and torch-npu" in caught.value.message
    assert f"torch-npu=={availability.release(version)}[.postN]" in caught.value.message


def test_unknown_import_failure_is_a_load_error_not_unavailable() -> None:
    from sagellm_backend.errors import BackendLoadError
    from sagellm_backend_ascend.availability import _raise_for, diagnose

    failure = ImportError("numpy.core.multiarray failed to import")
    assert diagnose(failure, "2.5.1") is None
    with pytest.raises(BackendLoadError, match=r"numpy\.core\.multiarray") as caught:
        _raise_for(failure, "2.5.1")
    assert caught.value.__cause__ is failure


@pytest.mark.parametrize(
    ("torch_version", "npu_version"), [("2.5.1", "2.1.0.post17"), ("2.13.0+cpu", "2.7.1")]
)
def test_version_pairing_text(torch_version: str, npu_version: str) -> None:
    from sagellm_backend_ascend.availability import versions_unpaired

    reason = versions_unpaired(torch_version, npu_version)
    assert f"torch {torch_version} and torch-npu {npu_version} do not pair" in reason
