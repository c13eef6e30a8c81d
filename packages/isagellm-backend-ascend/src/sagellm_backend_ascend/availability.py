"""Whether the ascend backend can run here, and why not: one distinct reason per failure.

:func:`probe` is the factory's cheap check: it reads installed metadata only and imports
nothing. :func:`load_torch_npu` runs when a backend is created: it imports torch and torch_npu
and turns each way that fails into its own reason, as BackendUnavailableError:

- torch-npu is not installed;
- the CANN toolkit is missing or not sourced (torch_npu's ImportError or OSError naming
  ``libhccl.so``, ``libascendcl.so``, ``libascend_hal.so`` or ``set_env.sh``);
- torch and torch-npu do not pair (their versions differ, or torch_npu's library has an
  undefined symbol of torch);
- torch is a CUDA build (torch_npu refuses a second accelerator);
- no NPU is visible (``ASCEND_RT_VISIBLE_DEVICES``, container device mounts).

With ``TORCH_DEVICE_BACKEND_AUTOLOAD`` (default on in torch >= 2.5) ``import torch`` itself
imports torch_npu, so its errors arrive wrapped in torch's RuntimeError; the cause is read.
An error that matches none of these is not a reason to skip the backend: it propagates as
BackendLoadError, so a broken installation is never mistaken for a missing one.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from importlib import metadata
from types import ModuleType
from typing import NoReturn

from sagellm_backend.errors import BackendLoadError, BackendUnavailableError

__all__ = [
    "UNAVAILABLE_HINT",
    "cann_missing",
    "cuda_build",
    "diagnose",
    "load_torch_npu",
    "no_device",
    "probe",
    "torch_npu_missing",
    "versions_unpaired",
]

UNAVAILABLE_HINT = (
    "do what the reason says; `sagellm-backend doctor` shows the torch, torch-npu and driver "
    "versions and the devices it found"
)
"""Every reason names its own fix; the hint points at it and at the report that shows why."""

_CANN_MARKERS = ("libhccl", "libascendcl", "libascend_hal", "libacl", "set_env.sh")
_RELEASE = re.compile(r"^(\d+)\.(\d+)\.(\d+)")


def torch_npu_missing(torch_version: str | None) -> str:
    wanted = f"torch-npu=={release(torch_version)}" if torch_version else "torch-npu"
    return f"torch-npu is not installed; pip install '{wanted}' (it must match torch and CANN)"


def cann_missing(detail: str) -> str:
    home = os.environ.get("ASCEND_HOME_PATH")
    where = f"ASCEND_HOME_PATH={home}" if home else "ASCEND_HOME_PATH is unset"
    return (
        f"the CANN toolkit is missing or not sourced ({where}): {_first_line(detail)}; run "
        "'source /usr/local/Ascend/ascend-toolkit/set_env.sh' (or set_env.sh of your CANN "
        "install path) before starting Python; to import torch without torch_npu meanwhile, "
        "set TORCH_DEVICE_BACKEND_AUTOLOAD=0"
    )


def versions_unpaired(torch_version: str, torch_npu_version: str | None, detail: str = "") -> str:
    npu = f"torch-npu {torch_npu_version}" if torch_npu_version else "torch-npu"
    why = f" ({_first_line(detail)})" if detail else ""
    return (
        f"torch {torch_version} and {npu} do not pair{why}; install the torch-npu release built "
        f"for torch {release(torch_version)} (torch-npu=={release(torch_version)}[.postN]) or "
        "the torch its torch-npu was built for"
    )


def cuda_build(detail: str) -> str:
    return (
        f"torch is a CUDA build ({_first_line(detail)}); torch_npu refuses a second accelerator "
        "in one environment; install the CPU build of torch "
        "(pip install torch --index-url https://download.pytorch.org/whl/cpu) next to torch-npu"
    )


def no_device() -> str:
    visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
    shown = (
        f"ASCEND_RT_VISIBLE_DEVICES={visible!r}"
        if visible is not None
        else ("ASCEND_RT_VISIBLE_DEVICES is unset")
    )
    return (
        f"no NPU is visible ({shown}); check 'npu-smi info', the container's /dev/davinci* "
        "mounts and ASCEND_RT_VISIBLE_DEVICES"
    )


def release(version: str | None) -> str:
    """``major.minor.micro`` of a version string ("2.5.1.post1" and "2.5.1+cpu" give "2.5.1")."""
    match = _RELEASE.match(version or "")
    return ".".join(match.groups()) if match else (version or "")


def probe() -> str | None:
    """Why the backend cannot run here, from installed metadata only; imports nothing."""
    if importlib.util.find_spec("torch") is None:
        return (
            "torch is not installed; install torch and the torch-npu release built for it and "
            "your CANN: pip install 'torch==X.Y.Z' 'torch-npu==X.Y.Z' (torch-npu's releases "
            "name the torch and CANN versions each needs)"
        )
    torch_version = _dist_version("torch")
    if importlib.util.find_spec("torch_npu") is None:
        return torch_npu_missing(torch_version)
    npu_version = _dist_version("torch-npu")
    if torch_version and npu_version and release(torch_version) != release(npu_version):
        return versions_unpaired(torch_version, npu_version)
    if torch_version and "+cu" in torch_version:
        return cuda_build(f"torch {torch_version}")
    return None


def diagnose(exc: BaseException, torch_version: str = "") -> str | None:
    """The reason an import of torch or torch_npu failed, or None if it is no known reason."""
    for error in _chain(exc):
        text = str(error)
        if isinstance(error, ModuleNotFoundError) and error.name == "torch_npu":
            return torch_npu_missing(torch_version)
        if "Cannot have both" in text:
            return cuda_build(text)
        if "undefined symbol" in text and "torch_npu" in text:
            return versions_unpaired(torch_version, _dist_version("torch-npu"), text)
        if any(marker in text for marker in _CANN_MARKERS):
            return cann_missing(text)
    return None


def load_torch_npu() -> ModuleType:
    """torch_npu, imported; BackendUnavailableError with the reason when it cannot run here."""
    reason = probe()
    if reason is not None:
        raise _unavailable(reason)
    try:
        torch = importlib.import_module("torch")
    except Exception as exc:
        _raise_for(exc, _dist_version("torch") or "")
    torch_version: str = torch.__version__
    cuda: str | None = torch.version.cuda
    if cuda:
        raise _unavailable(cuda_build(f"CUDA {cuda}"))
    try:
        torch_npu = importlib.import_module("torch_npu")
    except Exception as exc:
        _raise_for(exc, torch_version)
    npu_version: str = getattr(torch_npu, "__version__", "")
    if npu_version and release(npu_version) != release(torch_version):
        raise _unavailable(versions_unpaired(torch_version, npu_version))
    if torch.npu.device_count() == 0:
        raise _unavailable(no_device())
    return torch_npu


def _raise_for(exc: Exception, torch_version: str) -> NoReturn:
    reason = diagnose(exc, torch_version)
    if reason is None:
        raise BackendLoadError(
            f"importing torch_npu failed: {type(exc).__name__}: {_first_line(str(exc))}",
            hint="reinstall torch-npu for your torch and CANN; run python -c 'import torch_npu' "
            "to see the full error",
        ) from exc
    raise _unavailable(reason) from exc


def _unavailable(reason: str) -> BackendUnavailableError:
    return BackendUnavailableError(
        f"backend 'ascend' is unavailable: {reason}", hint=UNAVAILABLE_HINT
    )


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text
