"""CapabilityDescriptor: what a backend can do, as an immutable, validated value.

Field names and JSON form match the sageLLM protocol package's descriptor, so a descriptor passes
between the two unchanged. A capability claim is a promise: the conformance kit checks that what
is claimed works and that what is not claimed is refused with CapabilityError.

Every field is checked for its type when a descriptor is built (directly, from a dict or from
JSON): flags must be bools, counts non-negative ints or None, names strings, the enum lists
sequences of members or their values, ``extra`` a mapping of str to str. ``extra`` is stored as a
read-only mapping, so a descriptor, and its hash, never change after it is built.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from sagellm_backend.dtypes import CollectiveOp, DType, KernelKind, ReduceOp, coerce
from sagellm_backend.errors import CapabilityError, InvalidArgumentError
from sagellm_backend.frozen import Frozen
from sagellm_backend.ops import op_names

__all__ = ["CapabilityDescriptor"]

_ENUM_FIELDS: dict[str, type[DType] | type[KernelKind] | type[CollectiveOp] | type[ReduceOp]] = {
    "supported_dtypes": DType,
    "kv_dtypes": DType,
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
_FLAG_FIELDS = (
    "has_stream",
    "has_event",
    "has_collective",
    "has_graph_exec",
    "has_kv_block_copy",
    "has_kv_block_migrate",
)
_OPTIONAL_STR_FIELDS = ("device_name", "compute_capability")


class CapabilityDescriptor(Frozen):
    """Immutable capability matrix of one backend instance.

    Sequences may hold enum members or their string values; they are stored as tuples of members.
    ``supported_dtypes`` are the dtypes the backend computes in (kernels, collectives);
    ``kv_dtypes`` those its KV blocks can hold (by default the same).
    """

    supported_dtypes: tuple[DType, ...]
    kv_dtypes: tuple[DType, ...]
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
        kv_dtypes: Iterable[DType | str] | None = None,
    ) -> None:
        values = dict(locals())
        del values["self"]
        for name, enum in _ENUM_FIELDS.items():
            raw = values[name]
            if name == "kv_dtypes" and raw is None:
                values[name] = values["supported_dtypes"]
                continue
            if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Iterable):
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
                    f"{name} must be a non-negative int or None, got {value!r}",
                    hint=f"pass a count such as 1024 for {name}, or None if unknown",
                )
        for name in _FLAG_FIELDS:
            if not isinstance(values[name], bool):
                raise InvalidArgumentError(
                    f"{name} must be a bool, got {values[name]!r}",
                    hint=f"pass {name}=True or {name}=False (JSON true or false)",
                )
        for name in _OPTIONAL_STR_FIELDS:
            if values[name] is not None and not isinstance(values[name], str):
                raise InvalidArgumentError(
                    f"{name} must be a string or None, got {values[name]!r}",
                    hint=f"pass {name} as text, or None if unknown",
                )
        if not isinstance(device_type, str):
            raise InvalidArgumentError(
                f"device_type must be a string, got {device_type!r}",
                hint="pass the device family as text, such as 'cuda'",
            )
        values["supported_ops"] = op_names(supported_ops)
        values["extra"] = _frozen_extra(extra)
        if has_collective and not values["supported_collectives"]:
            values["supported_collectives"] = tuple(CollectiveOp)
        if values["supported_collectives"] and not values["supported_reduce_ops"]:
            values["supported_reduce_ops"] = tuple(ReduceOp)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __reduce__(self) -> tuple[Any, ...]:
        # The read-only ``extra`` mapping does not pickle; the dict form does.
        return (type(self).from_dict, (self.to_dict(),))

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

    def require_dtypes(
        self, dtypes: Iterable[DType | str] | DType | str, operation: str = "operation"
    ) -> tuple[DType, ...]:
        """``dtypes`` (one or several) as DTypes, each checked with :meth:`require_dtype`."""
        if isinstance(dtypes, (str, DType)):
            dtypes = (dtypes,)
        if isinstance(dtypes, (bytes, Mapping)) or not isinstance(dtypes, Iterable):
            raise InvalidArgumentError(
                f"{operation}: dtypes must be a sequence of dtypes, got {type(dtypes).__name__}",
                hint="pass a list of DType members or their string values, such as ['fp16']",
            )
        return tuple(self.require_dtype(d, operation) for d in dtypes)

    def supports_kv_dtype(self, dtype: DType | str) -> bool:
        return coerce(DType, dtype, "dtype") in self.kv_dtypes

    def require_kv_dtype(self, dtype: DType | str, operation: str = "KV operation") -> DType:
        """Return ``dtype`` as a DType, or raise CapabilityError if KV blocks cannot hold it."""
        member = coerce(DType, dtype, "dtype")
        if member not in self.kv_dtypes:
            raise CapabilityError(
                f"{operation} needs KV blocks of {member.value}, which {self._who} cannot hold",
                hint=f"use one of its kv_dtypes: {_values(self.kv_dtypes)}",
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
        for name in self._fields:
            value = getattr(self, name)
            if name in _ENUM_FIELDS:
                value = [m.value for m in value]
            elif name == "supported_ops":
                value = list(value)
            elif name == "extra":
                value = dict(value)
            out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CapabilityDescriptor:
        """Inverse of :meth:`to_dict`; unknown keys and values of the wrong type are refused."""
        if not isinstance(data, Mapping) or not all(isinstance(k, str) for k in data):
            raise InvalidArgumentError(
                f"a capability must be a mapping of field names, got {type(data).__name__}",
                hint="pass the dict that CapabilityDescriptor.to_dict() returns",
            )
        known = set(cls._fields)
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidArgumentError(
                f"unknown capability fields {unknown}", hint=f"known fields: {sorted(known)}"
            )
        return cls(**data)

    def to_json(self) -> str:
        import json  # deferred: a start-up that never serialises a capability skips it

        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CapabilityDescriptor:
        import json

        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(
                f"capability JSON is malformed: {exc}",
                hint="pass the text that CapabilityDescriptor.to_json() returns",
            ) from exc
        if not isinstance(data, dict):
            raise InvalidArgumentError(
                f"capability JSON must be an object, got {type(data).__name__}",
                hint="pass the text that CapabilityDescriptor.to_json() returns",
            )
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> CapabilityDescriptor:
        """A copy with some fields changed (the descriptor itself is immutable)."""
        return type(self)(**{**{name: getattr(self, name) for name in self._fields}, **changes})


def _frozen_extra(extra: object) -> Mapping[str, str]:
    """A read-only copy of ``extra``, which must map strings to strings."""
    if extra is None:
        return MappingProxyType({})
    if not isinstance(extra, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in extra.items()
    ):
        raise InvalidArgumentError(
            f"extra must be a mapping of str to str, got {extra!r}",
            hint="encode other values as strings, such as {'cores': '8'}",
        )
    return MappingProxyType(dict(extra))


def _values(members: Iterable[DType | KernelKind | CollectiveOp | ReduceOp]) -> str:
    listed = ", ".join(m.value for m in members)
    return listed or "(none)"
