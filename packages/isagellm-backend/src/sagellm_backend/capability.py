"""CapabilityDescriptor: what a backend can do, as an immutable value.

Field names and JSON form match the sageLLM protocol package's descriptor, so a descriptor passes
between the two unchanged. A capability claim is a promise: the conformance kit checks that what
is claimed works and that what is not claimed is refused with CapabilityError.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sagellm_backend.dtypes import CollectiveOp, DType, KernelKind, ReduceOp, coerce
from sagellm_backend.errors import CapabilityError, InvalidArgumentError
from sagellm_backend.ops import op_names

__all__ = ["CapabilityDescriptor"]

_ENUM_FIELDS: dict[str, type[DType] | type[KernelKind] | type[CollectiveOp] | type[ReduceOp]] = {
    "supported_dtypes": DType,
    "supported_kernels": KernelKind,
    "supported_collectives": CollectiveOp,
    "supported_reduce_ops": ReduceOp,
}
_OPTIONAL_INT_FIELDS = (
    "total_memory_bytes",
    "available_memory_bytes",
    "max_memory_mb",
    "max_batch_size",
    "max_sequence_length",
)


@dataclass(frozen=True, init=False)
class CapabilityDescriptor:
    """Immutable capability matrix of one backend instance.

    Sequences may hold enum members or their string values; they are stored as tuples of members.
    """

    supported_dtypes: tuple[DType, ...]
    supported_kernels: tuple[KernelKind, ...]
    has_stream: bool
    has_event: bool
    has_collective: bool
    has_graph_exec: bool
    max_memory_mb: int | None
    device_name: str | None
    device_type: str
    compute_capability: str | None
    total_memory_bytes: int | None
    available_memory_bytes: int | None
    supported_collectives: tuple[CollectiveOp, ...]
    supported_reduce_ops: tuple[ReduceOp, ...]
    has_kv_block_copy: bool
    has_kv_block_migrate: bool
    max_batch_size: int | None
    max_sequence_length: int | None
    supported_ops: tuple[str, ...]
    extra: Mapping[str, str]

    def __init__(
        self,
        supported_dtypes: Iterable[DType | str] = (DType.FP32,),
        supported_kernels: Iterable[KernelKind | str] = (),
        has_stream: bool = True,
        has_event: bool = True,
        has_collective: bool = False,
        has_graph_exec: bool = False,
        max_memory_mb: int | None = None,
        *,
        device_name: str | None = None,
        device_type: str = "unknown",
        compute_capability: str | None = None,
        total_memory_bytes: int | None = None,
        available_memory_bytes: int | None = None,
        supported_collectives: Iterable[CollectiveOp | str] = (),
        supported_reduce_ops: Iterable[ReduceOp | str] = (),
        has_kv_block_copy: bool = True,
        has_kv_block_migrate: bool = True,
        max_batch_size: int | None = None,
        max_sequence_length: int | None = None,
        supported_ops: Iterable[str] = (),
        extra: Mapping[str, str] | None = None,
    ) -> None:
        values = dict(locals())
        del values["self"]
        for name, enum in _ENUM_FIELDS.items():
            raw = values[name]
            if isinstance(raw, (str, bytes)) or not isinstance(raw, Iterable):
                raise InvalidArgumentError(
                    f"{name} must be a sequence, got {type(raw).__name__}",
                    hint=f"pass a list of {enum.__name__} members or their string values",
                )
            values[name] = tuple(dict.fromkeys(coerce(enum, v, name[:-1]) for v in raw))
        for name in _OPTIONAL_INT_FIELDS:
            value = values[name]
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise InvalidArgumentError(
                    f"{name} must be a non-negative int or None, got {value!r}"
                )
        values["supported_ops"] = op_names(supported_ops)
        values["extra"] = dict(extra or {})
        if has_collective and not values["supported_collectives"]:
            values["supported_collectives"] = tuple(CollectiveOp)
        if values["supported_collectives"] and not values["supported_reduce_ops"]:
            values["supported_reduce_ops"] = tuple(ReduceOp)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    # Queries, as the protocol package's descriptor offers them.

    def supports_dtype(self, dtype: DType | str) -> bool:
        return coerce(DType, dtype, "dtype") in self.supported_dtypes

    def require_dtype(self, dtype: DType | str, operation: str = "operation") -> DType:
        """Return ``dtype`` as a DType, or raise CapabilityError if the backend lacks it."""
        member = coerce(DType, dtype, "dtype")
        if member not in self.supported_dtypes:
            raise CapabilityError(
                f"{operation} needs dtype {member.value}, which {self._who} does not support",
                hint=f"use one of {_values(self.supported_dtypes)}",
            )
        return member

    def supports_kernel(self, kind: KernelKind | str) -> bool:
        return coerce(KernelKind, kind, "kernel kind") in self.supported_kernels

    def require_kernel(self, kind: KernelKind | str) -> KernelKind:
        member = coerce(KernelKind, kind, "kernel kind")
        if member not in self.supported_kernels:
            raise CapabilityError(
                f"{self._who} does not support kernels of kind {member.value}",
                hint=f"supported kinds: {_values(self.supported_kernels)}",
            )
        return member

    def supports_op(self, name: str) -> bool:
        """True if the standard op ``name`` (see :mod:`sagellm_backend.ops`) is claimed."""
        return name in self.supported_ops

    def require_op(self, name: str) -> str:
        """Return ``name`` if the backend claims the standard op, else CapabilityError."""
        if name not in self.supported_ops:
            raise CapabilityError(
                f"{self._who} does not offer the op {name!r}",
                hint="check capability().supported_ops, or use find_op() and fall back to "
                "your own implementation",
            )
        return name

    def supports_collective(self, op: CollectiveOp | str) -> bool:
        return self.has_collective and coerce(CollectiveOp, op, "collective op") in (
            self.supported_collectives
        )

    def require_collective(self, op: CollectiveOp | str) -> CollectiveOp:
        member = coerce(CollectiveOp, op, "collective op")
        if not self.supports_collective(member):
            raise CapabilityError(
                f"{self._who} does not support the collective {member.value}",
                hint="choose a backend whose capability lists it"
                if self.has_collective
                else "this backend has no collectives (has_collective=False)",
            )
        return member

    def supports_reduce_op(self, op: ReduceOp | str) -> bool:
        return coerce(ReduceOp, op, "reduce op") in self.supported_reduce_ops

    def require_reduce_op(self, op: ReduceOp | str) -> ReduceOp:
        member = coerce(ReduceOp, op, "reduce op")
        if member not in self.supported_reduce_ops:
            raise CapabilityError(
                f"{self._who} cannot reduce with {member.value}",
                hint=f"use one of {_values(self.supported_reduce_ops)}",
            )
        return member

    def require_graph_exec(self) -> None:
        if not self.has_graph_exec:
            raise CapabilityError(
                f"{self._who} cannot capture graphs (has_graph_exec=False)",
                hint="run the operations eagerly instead",
            )

    def require(self, flag: str, operation: str) -> None:
        """Raise CapabilityError unless the boolean capability ``flag`` is set."""
        if not getattr(self, flag):
            raise CapabilityError(
                f"{operation} is not supported by {self._who} ({flag}=False)",
                hint="check capability() before calling it",
            )

    @property
    def _who(self) -> str:
        return f"backend {self.device_name or self.device_type}"

    # Serialisation.

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of JSON types: enum members become their string values."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _ENUM_FIELDS:
                value = [m.value for m in value]
            elif f.name == "supported_ops":
                value = list(value)
            elif f.name == "extra":
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CapabilityDescriptor:
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidArgumentError(
                f"unknown capability fields {unknown}", hint=f"known fields: {sorted(known)}"
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CapabilityDescriptor:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"capability JSON is malformed: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidArgumentError("capability JSON must be an object")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> CapabilityDescriptor:
        """A copy with some fields changed (the descriptor itself is immutable)."""
        return dataclasses.replace(self, **changes)


def _values(members: Iterable[DType | KernelKind | CollectiveOp | ReduceOp]) -> str:
    listed = ", ".join(m.value for m in members)
    return listed or "(none)"
