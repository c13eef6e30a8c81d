"""Why the cuda backend cannot run here, found without importing torch or touching the GPU.

The probe backs ``sagellm-backend list``, ``auto`` selection and ``doctor``, which run in
processes that may fork workers afterwards. It therefore never initialises CUDA: the torch build
is read from ``torch/version.py`` (or from ``torch.version`` when torch is already imported), and
the devices are counted through NVML, which needs the driver but creates no CUDA context.
``CUDA_VISIBLE_DEVICES`` is applied to that count as the CUDA runtime applies it.

Every reason ends with the one step that fixes it, for this machine.
"""

from __future__ import annotations

import ast
import ctypes
import importlib.util
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = [
    "Nvml",
    "NvmlError",
    "SystemNvml",
    "TorchBuild",
    "find_torch_build",
    "probe",
    "unavailable_reason",
    "visible_device_count",
]

CUDA_WHEELS = (
    "https://download.pytorch.org/whl/cuXYZ, XYZ being a CUDA version the driver supports "
    "(nvidia-smi shows the highest), such as 128"
)
"""PyTorch's index of CUDA builds of torch, as a reason names it."""


@dataclass(frozen=True)
class TorchBuild:
    """The installed torch: its version and the GPU toolkit it was built for (None: none)."""

    version: str
    cuda: str | None
    hip: str | None


class NvmlError(Exception):
    """NVML could not be used: the reason, in words."""


class Nvml(Protocol):
    """The one NVML query the probe needs."""

    def device_count(self) -> int:
        """Physical NVIDIA devices; raises NvmlError when the driver is missing or failing."""
        ...


class SystemNvml:
    """NVML of the installed NVIDIA driver, through ctypes."""

    def __init__(self, library: str = "libnvidia-ml.so.1") -> None:
        self.library = library

    def device_count(self) -> int:
        try:
            nvml = ctypes.CDLL(self.library)
        except OSError as exc:
            raise NvmlError(
                f"no NVIDIA driver: {self.library} cannot be loaded ({exc}); install the NVIDIA "
                "driver until nvidia-smi lists the GPUs (in a container: start it with the GPUs, "
                "such as docker run --gpus all)"
            ) from None
        status = nvml.nvmlInit_v2()
        if status != 0:
            raise NvmlError(
                f"the NVIDIA driver is not usable: nvmlInit failed ({_nvml_text(nvml, status)}); "
                "run nvidia-smi, which names the cause (a driver and library version mismatch "
                "is fixed by a reboot or by reinstalling the driver)"
            )
        try:
            count = ctypes.c_uint(0)
            status = nvml.nvmlDeviceGetCount_v2(ctypes.byref(count))
            if status != 0:
                raise NvmlError(
                    f"NVML cannot count devices ({_nvml_text(nvml, status)}); run nvidia-smi, "
                    "which names the cause"
                )
            return int(count.value)
        finally:
            nvml.nvmlShutdown()


def _nvml_text(nvml: ctypes.CDLL, status: int) -> str:
    describe = nvml.nvmlErrorString
    describe.restype = ctypes.c_char_p
    text = describe(status)
    return f"NVML error {status}: {text.decode() if text else 'unknown'}"


def find_torch_build() -> TorchBuild | None:
    """The installed torch's build, without importing it; None when torch is not installed."""
    loaded = sys.modules.get("torch")
    version_module = getattr(loaded, "version", None)
    if version_module is not None:
        return TorchBuild(
            str(getattr(version_module, "__version__", "?")),
            getattr(version_module, "cuda", None),
            getattr(version_module, "hip", None),
        )
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "version.py"
        if path.is_file():
            return _parse_version_file(path.read_text(encoding="utf-8"))
    return TorchBuild("?", None, None)


def _parse_version_file(text: str) -> TorchBuild:
    values: dict[str, object] = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name):
            try:
                values[target.id] = ast.literal_eval(value)
            except ValueError:
                continue
    cuda, hip = values.get("cuda"), values.get("hip")
    return TorchBuild(
        str(values.get("__version__", "?")),
        cuda if isinstance(cuda, str) else None,
        hip if isinstance(hip, str) else None,
    )


def visible_device_count(physical: int, environ: Mapping[str, str]) -> int:
    """Devices the CUDA runtime shows, given ``CUDA_VISIBLE_DEVICES``, parsed as CUDA parses it.

    Unset: every device. A list of indices is read up to the first entry that is not a
    non-negative index or is out of range; a list of ``GPU-``/``MIG-`` UUIDs up to the first
    entry without that prefix. A repeated entry hides every device.
    """
    text = environ.get("CUDA_VISIBLE_DEVICES")
    if text is None:
        return physical
    entries = [entry.strip() for entry in text.split(",")]
    prefix = next((p for p in ("GPU-", "MIG-") if text.strip().startswith(p)), None)
    seen: list[str] = []
    for entry in entries:
        if prefix is not None:
            if not entry.startswith(prefix):
                break
            key = entry
        else:
            digits = entry[: len(entry) - len(entry.lstrip("0123456789"))]
            if not digits or int(digits) >= physical:
                break
            key = str(int(digits))
        if key in seen:
            return 0
        seen.append(key)
    return min(len(seen), physical)


def unavailable_reason(
    build: TorchBuild | None, nvml: Nvml, environ: Mapping[str, str]
) -> str | None:
    """None if a CUDA device can be used here, else why not (most basic reason first) and the
    step that fixes it."""
    if build is None:
        return (
            "torch is not installed; install a CUDA build of torch: pip install torch (on Linux "
            f"x86_64 its default build is one), or from {CUDA_WHEELS}"
        )
    if build.hip is not None:
        return (
            f"torch {build.version} is a ROCm build (HIP {build.hip}); its 'cuda' devices are "
            f"AMD GPUs, which this backend does not drive; {_reinstall_for_cuda(build)}"
        )
    if build.cuda is None:
        return (
            f"torch {build.version} is not a CUDA build of torch (torch.version.cuda is None); "
            + _reinstall_for_cuda(build)
        )
    try:
        physical = nvml.device_count()
    except NvmlError as exc:
        return str(exc)
    if physical == 0:
        return (
            "the NVIDIA driver sees no device; check that nvidia-smi lists the GPUs (in a "
            "container: start it with the GPUs, such as docker run --gpus all)"
        )
    if visible_device_count(physical, environ) == 0:
        shown = environ.get("CUDA_VISIBLE_DEVICES", "")
        return (
            f"CUDA_VISIBLE_DEVICES={shown!r} hides all {physical} device(s); unset it, or list "
            "device indices such as 0,1"
        )
    return None


def _reinstall_for_cuda(build: TorchBuild) -> str:
    version = build.version.split("+")[0]
    return (
        f"replace it with a CUDA build of the same version: pip install --force-reinstall "
        f"'torch=={version}' --index-url {CUDA_WHEELS}"
    )


def probe() -> str | None:
    """The factory's probe: this machine, this environment."""
    return unavailable_reason(find_torch_build(), SystemNvml(), os.environ)
