"""Ascend SoC families and what each offers, from the SoC name torch_npu reports.

Names as CANN reports them (``torch.npu.get_device_name()``): ``Ascend910B1``..``Ascend910B4``
(Atlas A2; ``Ascend910B`` with no digit is a first-generation 910), ``Ascend910_9391`` and its
siblings (Atlas A3), ``Ascend310P1``..``Ascend310P7`` (Atlas 300I/300V inference cards),
``Ascend950PR_9599`` and the rest of the 950 family. Torch-free.
"""

from __future__ import annotations

import re
from enum import Enum

from sagellm_backend.dtypes import DType

__all__ = ["SocFamily"]


class SocFamily(str, Enum):
    """An Ascend SoC family."""

    A2 = "a2"
    A3 = "a3"
    P310 = "310p"
    A950 = "950"
    UNKNOWN = "unknown"

    @classmethod
    def of(cls, soc_name: str) -> SocFamily:
        name = soc_name.strip().lower()
        if re.match(r"ascend910b\d", name):
            return cls.A2
        if name.startswith("ascend910_93"):
            return cls.A3
        if name.startswith("ascend310p"):
            return cls.P310
        if name.startswith("ascend950"):
            return cls.A950
        return cls.UNKNOWN

    @property
    def dtypes(self) -> tuple[DType, ...]:
        """Element types its cube and vector units compute in: 310P has no bf16, fp8 is the
        950 family's alone; an unknown SoC is granted only fp32 and fp16."""
        return _DTYPES[self]

    def __str__(self) -> str:
        return self.value


_DTYPES = {
    SocFamily.A2: (DType.FP32, DType.FP16, DType.BF16, DType.INT8),
    SocFamily.A3: (DType.FP32, DType.FP16, DType.BF16, DType.INT8),
    SocFamily.P310: (DType.FP32, DType.FP16, DType.INT8),
    SocFamily.A950: (DType.FP32, DType.FP16, DType.BF16, DType.FP8, DType.INT8),
    SocFamily.UNKNOWN: (DType.FP32, DType.FP16),
}
