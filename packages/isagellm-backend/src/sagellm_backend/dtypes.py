"""The string enums every backend speaks: data types, kernel kinds, reduce and collective ops.

Values are the wire strings of the sageLLM shared protocol package, so members of either enum
convert to ours unchanged. Every API that takes one of these also takes its string value.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from sagellm_backend.errors import InvalidArgumentError

__all__ = ["CollectiveOp", "DType", "KernelKind", "ReduceOp", "coerce"]


class DType(str, Enum):
    """Element type of a tensor or of a KV block."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"
    INT8 = "int8"
    INT4 = "int4"

    @property
    def bits(self) -> int:
        """Width of one element in bits."""
        return _BITS[self]

    @property
    def is_floating_point(self) -> bool:
        return self in (DType.FP32, DType.FP16, DType.BF16, DType.FP8)

    def __str__(self) -> str:
        return self.value


_BITS = {
    DType.FP32: 32,
    DType.FP16: 16,
    DType.BF16: 16,
    DType.FP8: 8,
    DType.INT8: 8,
    DType.INT4: 4,
}


class KernelKind(str, Enum):
    """Family a registered kernel belongs to; a capability lists the families it accelerates."""

    MATMUL = "matmul"
    ATTENTION = "attention"
    FUSION = "fusion"
    LAYERNORM = "layernorm"
    SOFTMAX = "softmax"

    def __str__(self) -> str:
        return self.value


class ReduceOp(str, Enum):
    """Reduction applied by all_reduce and reduce_scatter."""

    SUM = "sum"
    MAX = "max"
    MIN = "min"
    PROD = "prod"
    BAND = "band"
    BOR = "bor"
    BXOR = "bxor"
    AVG = "avg"

    @property
    def is_bitwise(self) -> bool:
        return self in (ReduceOp.BAND, ReduceOp.BOR, ReduceOp.BXOR)

    def __str__(self) -> str:
        return self.value


class CollectiveOp(str, Enum):
    """Collective operation names, as listed in ``CapabilityDescriptor.supported_collectives``."""

    ALL_REDUCE = "all_reduce"
    ALL_GATHER = "all_gather"
    REDUCE_SCATTER = "reduce_scatter"
    BROADCAST = "broadcast"
    REDUCE = "reduce"
    ALL_TO_ALL = "all_to_all"
    BARRIER = "barrier"
    SEND = "send"
    RECV = "recv"

    def __str__(self) -> str:
        return self.value


E = TypeVar("E", bound=Enum)


def coerce(enum: type[E], value: object, what: str | None = None) -> E:
    """Return ``value`` as a member of ``enum``.

    Accepts a member, its string value, or a member of another enum with the same value (such as
    the shared protocol package's). Anything else raises InvalidArgumentError naming the choices.
    """
    if isinstance(value, enum):
        return value
    raw = value.value if isinstance(value, Enum) else value
    if isinstance(raw, str):
        try:
            return enum(raw.lower())
        except ValueError:
            pass
    choices = ", ".join(repr(m.value) for m in enum)
    raise InvalidArgumentError(
        f"unknown {what or enum.__name__} {value!r}",
        hint=f"use one of {choices}",
    )
