"""A strict stand-in for torch_npu, for testing where no Ascend NPU can be had.

It is importable as ``torch_npu`` only when the tests put its folder on ``sys.path``; it is
never installed and declares no ``torch.backends`` auto-load entry point. Like the real module,
importing it renames torch's PrivateUse1 backend to "npu", registers ``torch.npu`` and the
"hccl" distributed backend. It defines only names the real module has.

Set in the environment before the import:

- ``FAKE_TORCH_NPU_IMPORT``: ``no_cann`` fails as torch_npu does without a sourced CANN
  toolkit; ``version_mismatch`` fails as a torch_npu built for another torch does.
- ``FAKE_TORCH_NPU_DEVICES``: visible NPUs (default 2; 0 gives a machine without a device).
- ``FAKE_TORCH_NPU_SOC``: the SoC name (default ``Ascend910B3``, an Atlas A2).
- ``FAKE_TORCH_NPU_MEMORY_MB``: memory of each NPU (default 1024).
- ``FAKE_TORCH_NPU_FUSED_OPS``: ``0`` leaves out the fused inference operators (norms,
  SwiGLU, rotary, cache write, attention), as in an older torch_npu.
- ``FAKE_TORCH_NPU_GRAPHS``: ``0`` leaves out ``torch.npu.NPUGraph`` and ``torch.npu.graph``,
  as in a torch_npu older than graph capture.
"""

from __future__ import annotations

import os

import torch.distributed as dist
from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

_mode = os.environ.get("FAKE_TORCH_NPU_IMPORT", "")
if _mode == "no_cann":
    raise ImportError(
        "libhccl.so: cannot open shared object file: No such file or directory. Please check "
        "that the cann package is installed. Please run 'source set_env.sh' in the CANN "
        "installation path.\n[ERROR] (PID:0, Device:-1, RankID:-1) ERR00008 PTA resource not "
        "found"
    )
if _mode == "version_mismatch":
    raise ImportError(
        f"{os.path.dirname(__file__)}/lib/libtorch_npu.so: undefined symbol: "
        "_ZN5torch10ValueErrorC1EPKcz"
    )

from torch_npu import npu  # noqa: E402
from torch_npu._C import _device, _hccl  # noqa: E402
from torch_npu.version import __version__  # noqa: E402

_device.configure(
    int(os.environ.get("FAKE_TORCH_NPU_DEVICES", "2")),
    int(os.environ.get("FAKE_TORCH_NPU_MEMORY_MB", "1024")),
)
_setup_privateuseone_for_python_backend("npu", backend_module=npu)
_device.register_kernels()
dist.Backend.register_backend("hccl", _hccl.create, devices=["npu"])

__all__ = ["__version__", "npu"]

if os.environ.get("FAKE_TORCH_NPU_FUSED_OPS", "1") != "0":
    from torch_npu._C._ops import (
        _npu_reshape_and_cache,
        npu_add_rms_norm,
        npu_fused_infer_attention_score,
        npu_rms_norm,
        npu_rotary_mul,
        npu_swiglu,
    )

    __all__ += [
        "_npu_reshape_and_cache",
        "npu_add_rms_norm",
        "npu_fused_infer_attention_score",
        "npu_rms_norm",
        "npu_rotary_mul",
        "npu_swiglu",
    ]
