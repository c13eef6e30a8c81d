"""Conversions between this package's values and those of ``isagellm-protocol``.

The protocol package (import name ``sagellm_protocol``) is what other sageLLM components speak.
It is optional: it ships for Python 3.11 only, as bytecode without type information, so it is
installed with ``pip install 'isagellm-backend[protocol]'`` and imported on the first
conversion, never by ``import sagellm_backend``.

Descriptors. The protocol descriptor has no place for ``supported_reduce_ops``, ``kv_dtypes``,
``supported_ops`` and ``extra``.
:func:`capability_to_protocol` returns them beside it as a :class:`CapabilityRemainder`, and
:func:`capability_from_protocol` takes that back, so ours -> theirs -> ours loses nothing.

Error codes. A code with no counterpart on the other side travels as its nearest code
(:data:`NEAREST_PROTOCOL_CODES`, :data:`NEAREST_CODES`) with ``[original_code] `` put in front of
the message. The bridge reads that prefix back, so a round trip in either direction restores the
original code, and with it the exception class.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from importlib import metadata
from types import MappingProxyType, ModuleType
from typing import Any, NamedTuple, Protocol, cast

from sagellm_backend.capability import CapabilityDescriptor
from sagellm_backend.dtypes import CollectiveOp, DType, KernelKind, ReduceOp, coerce
from sagellm_backend.errors import (
    BackendError,
    BackendLoadError,
    BackendNotFoundError,
    BackendNotInstalledError,
    BackendUnavailableError,
    BlockNotFoundError,
    CapabilityError,
    CommBackendNotSupportedError,
    CommError,
    CommGroupBrokenError,
    CommRankMismatchError,
    CommTimeoutError,
    DeadlineExceededError,
    ErrorCode,
    EventStateError,
    GraphCaptureError,
    IncompatiblePluginError,
    InvalidArgumentError,
    InvalidBlockError,
    InvalidSpecError,
    KernelExistsError,
    KernelNotFoundError,
    ResourceExhaustedError,
    UnknownOptionError,
)
from sagellm_backend.ops import op_names

__all__ = [
    "CLASS_FOR_CODE",
    "NEAREST_CODES",
    "NEAREST_PROTOCOL_CODES",
    "PROTOCOL_REQUIREMENT",
    "CapabilityRemainder",
    "ProtocolCapability",
    "ProtocolCapabilityDescriptor",
    "ProtocolError",
    "capability_from_protocol",
    "capability_to_protocol",
    "enum_from_protocol",
    "enum_to_protocol",
    "error_code_from_protocol",
    "error_code_to_protocol",
    "error_from_protocol",
    "error_to_protocol",
]

PROTOCOL_REQUIREMENT = "isagellm-protocol>=0.5.4,<0.6"
"""The releases of the protocol package this bridge is written against."""

_MODULE = "sagellm_protocol"
_DISTRIBUTION = "isagellm-protocol"
_SUPPORTED = ((0, 5, 4), (0, 6))
_INSTALL_HINT = "pip install 'isagellm-backend[protocol]' (the protocol package needs Python 3.11)"

NEAREST_PROTOCOL_CODES: Mapping[ErrorCode, str] = MappingProxyType(
    {
        ErrorCode.BLOCK_NOT_FOUND: "invalid_argument",
        ErrorCode.FOREIGN_BLOCK: "invalid_argument",
        ErrorCode.KV_BLOCK_MISMATCH: "invalid_argument",
        ErrorCode.INVALID_EVENT_STATE: "invalid_argument",
        ErrorCode.GRAPH_CAPTURE_VIOLATION: "invalid_argument",
        ErrorCode.INVALID_SPEC: "invalid_argument",
        ErrorCode.UNKNOWN_OPTION: "invalid_argument",
        ErrorCode.BACKEND_NOT_FOUND: "invalid_argument",
        ErrorCode.BACKEND_NOT_INSTALLED: "unavailable",
        ErrorCode.BACKEND_LOAD_FAILED: "unavailable",
        ErrorCode.PLUGIN_INCOMPATIBLE: "unavailable",
    }
)
"""Our codes that the protocol package lacks -> the protocol code each travels as."""

NEAREST_CODES: Mapping[str, ErrorCode] = MappingProxyType(
    {
        "distributed_runtime_error": ErrorCode.COMM_COLLECTIVE_FAILED,
        "comm_group_not_found": ErrorCode.COMM_GROUP_INVALID,
        "invalid_operator_mapping": ErrorCode.INVALID_ARGUMENT,
        "kv_prefetch_failed": ErrorCode.KV_TRANSFER_FAILED,
        "kv_qos_constraint_violated": ErrorCode.INVALID_ARGUMENT,
        "kv_priority_queue_full": ErrorCode.RESOURCE_EXHAUSTED,
        "compression_not_supported": ErrorCode.NOT_IMPLEMENTED,
        "quantization_calibration_failed": ErrorCode.INVALID_ARGUMENT,
        "speculative_decoding_failed": ErrorCode.INVALID_ARGUMENT,
    }
)
"""Protocol codes that we lack -> our code each becomes."""

CLASS_FOR_CODE: Mapping[ErrorCode, type[BackendError]] = MappingProxyType(
    {
        ErrorCode.INVALID_ARGUMENT: InvalidArgumentError,
        ErrorCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
        ErrorCode.UNAVAILABLE: BackendUnavailableError,
        ErrorCode.DEADLINE_EXCEEDED: DeadlineExceededError,
        ErrorCode.NOT_IMPLEMENTED: CapabilityError,
        ErrorCode.COMM_TIMEOUT: CommTimeoutError,
        ErrorCode.COMM_GROUP_INVALID: CommGroupBrokenError,
        ErrorCode.COMM_BACKEND_NOT_SUPPORTED: CommBackendNotSupportedError,
        ErrorCode.COMM_RANK_MISMATCH: CommRankMismatchError,
        ErrorCode.COMM_COLLECTIVE_FAILED: CommError,
        ErrorCode.COMM_P2P_FAILED: CommError,
        ErrorCode.OPERATOR_NOT_FOUND: KernelNotFoundError,
        ErrorCode.OPERATOR_REGISTRATION_FAILED: KernelExistsError,
        ErrorCode.KV_TRANSFER_FAILED: BackendError,
        ErrorCode.BLOCK_NOT_FOUND: BlockNotFoundError,
        ErrorCode.FOREIGN_BLOCK: InvalidBlockError,
        ErrorCode.KV_BLOCK_MISMATCH: InvalidBlockError,
        ErrorCode.INVALID_EVENT_STATE: EventStateError,
        ErrorCode.GRAPH_CAPTURE_VIOLATION: GraphCaptureError,
        ErrorCode.INVALID_SPEC: InvalidSpecError,
        ErrorCode.UNKNOWN_OPTION: UnknownOptionError,
        ErrorCode.BACKEND_NOT_FOUND: BackendNotFoundError,
        ErrorCode.BACKEND_NOT_INSTALLED: BackendNotInstalledError,
        ErrorCode.BACKEND_LOAD_FAILED: BackendLoadError,
        ErrorCode.PLUGIN_INCOMPATIBLE: IncompatiblePluginError,
    }
)
"""The exception class an error of each code is rebuilt as (see docs/errors.md)."""

_CODE_PREFIX = re.compile(r"^\[(?P<code>[a-z0-9_]+)\] ")

_SHARED_FIELDS = (
    "device_name",
    "device_type",
    "compute_capability",
    "total_memory_bytes",
    "available_memory_bytes",
    "supported_dtypes",
    "supported_kernels",
    "has_stream",
    "has_event",
    "has_collective",
    "has_graph_exec",
    "supported_collectives",
    "has_kv_block_copy",
    "has_kv_block_migrate",
    "max_memory_mb",
    "max_batch_size",
    "max_sequence_length",
)
"""Descriptor fields both packages have, under the same names."""

_FLAGS = tuple(name for name in _SHARED_FIELDS if name.startswith("has_"))
_LISTS: Mapping[str, type[DType] | type[KernelKind] | type[CollectiveOp]] = {
    "supported_dtypes": DType,
    "supported_kernels": KernelKind,
    "supported_collectives": CollectiveOp,
}

OurEnum = DType | KernelKind | ReduceOp | CollectiveOp
_OUR_ENUMS: tuple[type[DType], type[KernelKind], type[ReduceOp], type[CollectiveOp]] = (
    DType,
    KernelKind,
    ReduceOp,
    CollectiveOp,
)


class ProtocolCapabilityDescriptor(Protocol):
    """What the bridge reads of ``sagellm_protocol.CapabilityDescriptor`` (a mutable dataclass).

    Its enum members are ``str`` subclasses, so its sequences are typed as sequences of ``str``;
    its queries take a member or the member's string value.
    """

    @property
    def device_name(self) -> str | None: ...
    @property
    def device_type(self) -> str: ...
    @property
    def compute_capability(self) -> str | None: ...
    @property
    def total_memory_bytes(self) -> int | None: ...
    @property
    def available_memory_bytes(self) -> int | None: ...
    @property
    def supported_dtypes(self) -> Sequence[str]: ...
    @property
    def supported_kernels(self) -> Sequence[str]: ...
    @property
    def has_stream(self) -> bool: ...
    @property
    def has_event(self) -> bool: ...
    @property
    def has_collective(self) -> bool: ...
    @property
    def has_graph_exec(self) -> bool: ...
    @property
    def supported_collectives(self) -> Sequence[str]: ...
    @property
    def has_kv_block_copy(self) -> bool: ...
    @property
    def has_kv_block_migrate(self) -> bool: ...
    @property
    def max_memory_mb(self) -> int | None: ...
    @property
    def max_batch_size(self) -> int | None: ...
    @property
    def max_sequence_length(self) -> int | None: ...

    def supports_dtype(self, dtype: Enum | str) -> bool: ...
    def require_dtype(self, dtype: Enum | str, operation: str = "operation") -> None: ...
    def supports_kernel(self, kernel: Enum | str) -> bool: ...
    def supports_collective(self, op: Enum | str) -> bool: ...
    def require_collective(self, op: Enum | str) -> None: ...
    def require_graph_exec(self) -> None: ...


class ProtocolError(Protocol):
    """What the bridge reads of ``sagellm_protocol.Error`` (a pydantic model, not an exception)."""

    @property
    def code(self) -> Enum: ...
    @property
    def message(self) -> str: ...
    @property
    def retryable(self) -> bool | None: ...


@dataclass(frozen=True, init=False)
class CapabilityRemainder:
    """The fields of our descriptor that the protocol descriptor has no place for.

    ``kv_dtypes`` None means "the same as supported_dtypes" (our descriptor's default).
    """

    supported_reduce_ops: tuple[ReduceOp, ...]
    extra: Mapping[str, str]
    kv_dtypes: tuple[DType, ...] | None
    supported_ops: tuple[str, ...]

    def __init__(
        self,
        supported_reduce_ops: Sequence[ReduceOp | str] = (),
        extra: Mapping[str, str] | None = None,
        kv_dtypes: Sequence[DType | str] | None = None,
        supported_ops: Sequence[str] = (),
    ) -> None:
        ops = tuple(
            coerce(ReduceOp, op, "reduce op")
            for op in _sequence(supported_reduce_ops, "supported_reduce_ops", "ReduceOp")
        )
        kv = (
            None
            if kv_dtypes is None
            else tuple(
                coerce(DType, d, "kv dtype") for d in _sequence(kv_dtypes, "kv_dtypes", "DType")
            )
        )
        if extra is not None and (
            not isinstance(extra, Mapping)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items())
        ):
            raise InvalidArgumentError(
                f"extra must be a mapping of str to str, got {extra!r}",
                hint="encode other values as strings",
            )
        object.__setattr__(self, "supported_reduce_ops", tuple(dict.fromkeys(ops)))
        object.__setattr__(self, "extra", dict(extra or {}))
        object.__setattr__(self, "kv_dtypes", None if kv is None else tuple(dict.fromkeys(kv)))
        object.__setattr__(self, "supported_ops", op_names(supported_ops))

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict[str, list[str] | dict[str, str] | None]:
        """Plain dict of JSON types, to send beside the protocol descriptor."""
        return {
            "supported_reduce_ops": [op.value for op in self.supported_reduce_ops],
            "extra": dict(self.extra),
            "kv_dtypes": None if self.kv_dtypes is None else [d.value for d in self.kv_dtypes],
            "supported_ops": list(self.supported_ops),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CapabilityRemainder:
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidArgumentError(
                f"unknown capability remainder fields {unknown}", hint=f"known: {sorted(known)}"
            )
        return cls(**data)


class ProtocolCapability(NamedTuple):
    """A descriptor in protocol form plus the fields it cannot hold."""

    descriptor: ProtocolCapabilityDescriptor
    remainder: CapabilityRemainder


# Enums.


def enum_to_protocol(member: OurEnum) -> Enum:
    """The protocol package's member for one of our DType, KernelKind, ReduceOp, CollectiveOp."""
    if not isinstance(member, _OUR_ENUMS):
        raise InvalidArgumentError(
            f"expected a DType, KernelKind, ReduceOp or CollectiveOp member, got {member!r}",
            hint="convert error codes with error_code_to_protocol()",
        )
    return _their_member(_protocol(), type(member).__name__, member.value)


def enum_from_protocol(member: Enum) -> OurEnum:
    """Our member for the protocol package's DType, KernelKind, ReduceOp or CollectiveOp.

    Every API of ours takes their members directly; ``coerce(DType, member)`` gives the narrow type.
    """
    proto = _protocol()
    for ours in _OUR_ENUMS:
        if isinstance(member, getattr(proto, ours.__name__)):
            result: OurEnum = coerce(ours, member)
            return result
    raise InvalidArgumentError(
        f"expected a DType, KernelKind, ReduceOp or CollectiveOp of {_MODULE}, got {member!r}",
        hint="convert error codes with error_code_from_protocol()",
    )


# Error codes.


def error_code_to_protocol(code: ErrorCode | str) -> Enum:
    """The protocol ErrorCode for ours: the same value, or the nearest code where it has none."""
    ours = coerce(ErrorCode, code, "error code")
    proto = _protocol()
    value = ours.value
    if value not in _values(proto.ErrorCode):
        value = NEAREST_PROTOCOL_CODES.get(ours, value)
    return _their_member(proto, "ErrorCode", value)


def error_code_from_protocol(code: Enum | str) -> ErrorCode:
    """Our ErrorCode for a protocol one: the same value, or the nearest code where we have none."""
    value = _their_member(_protocol(), "ErrorCode", code.value if isinstance(code, Enum) else code)
    return _our_code(str(value.value))


# Errors.


def error_to_protocol(error: BackendError) -> ProtocolError:
    """The protocol ``Error`` model for one of our errors.

    The message is ours with the hint appended (``"message; hint"``); a code the protocol lacks
    travels as its nearest code with ``[our_code] `` in front of the message. A message that
    already starts with a bracketed code gets its own code in front, so that it is not read as
    carrying one. ``retryable`` is the error class's.
    """
    if not isinstance(error, BackendError):
        raise InvalidArgumentError(
            f"expected a BackendError, got {type(error).__name__}",
            hint="wrap foreign exceptions in the BackendError subclass that fits first",
        )
    proto = _protocol()
    theirs = _values(proto.ErrorCode)
    text = error.message if error.hint is None else f"{error.message}; {error.hint}"
    value = error.code.value
    carried = _carried_code(text)
    if value not in theirs:
        text = f"[{value}] {text}"
        value = NEAREST_PROTOCOL_CODES.get(error.code, value)
    elif carried == value:  # the escape error_from_protocol adds
        text = _strip_code(text)
    elif carried in theirs and NEAREST_CODES.get(carried) is error.code:
        value, text = carried, _strip_code(text)
    elif carried in theirs | _values(ErrorCode):
        text = f"[{value}] {text}"
    return cast(
        ProtocolError,
        proto.Error(
            code=_their_member(proto, "ErrorCode", value), message=text, retryable=error.retryable
        ),
    )


def error_from_protocol(error: ProtocolError) -> BackendError:
    """Our exception for a protocol ``Error`` model, of the class its code stands for.

    The error is returned, not raised. A protocol code we lack becomes our nearest code with
    ``[their_code] `` in front of the message; a message that already starts with a bracketed
    code gets its own code in front, as :func:`error_to_protocol` does.
    """
    proto = _protocol()
    if not isinstance(error, proto.Error):
        raise InvalidArgumentError(
            f"expected a {_MODULE}.Error, got {type(error).__name__}",
            hint=f"build one with {_MODULE}.Error(code=..., message=...)",
        )
    value = str(error.code.value)
    text = str(error.message)
    carried = _carried_code(text)
    ours = _values(ErrorCode)
    if value not in ours:
        code = _our_code(value)
        text = f"[{value}] {text}"
    elif carried == value:  # the escape error_to_protocol adds
        code, text = ErrorCode(value), _strip_code(text)
    elif carried in ours and NEAREST_PROTOCOL_CODES.get(ErrorCode(carried)) == value:
        code, text = ErrorCode(carried), _strip_code(text)
    else:
        code = ErrorCode(value)
        if carried in ours | _values(proto.ErrorCode):
            text = f"[{value}] {text}"
    return CLASS_FOR_CODE[code](text, code=code)


# Capability descriptors.


def capability_to_protocol(capability: CapabilityDescriptor) -> ProtocolCapability:
    """The protocol descriptor for ours, plus the fields it has no place for.

    Pass both to :func:`capability_from_protocol` to get ``capability`` back unchanged.
    Note that the protocol's ``supports_collective`` reads only ``supported_collectives``,
    while ours also requires ``has_collective``.
    """
    if not isinstance(capability, CapabilityDescriptor):
        raise InvalidArgumentError(
            f"expected a CapabilityDescriptor, got {type(capability).__name__}",
            hint="build one with sagellm_backend.CapabilityDescriptor(...)",
        )
    proto = _protocol()
    _check_descriptor_fields(proto)
    descriptor = proto.CapabilityDescriptor(
        device_name=capability.device_name,
        device_type=capability.device_type,
        compute_capability=capability.compute_capability,
        total_memory_bytes=capability.total_memory_bytes,
        available_memory_bytes=capability.available_memory_bytes,
        supported_dtypes=[enum_to_protocol(d) for d in capability.supported_dtypes],
        supported_kernels=[enum_to_protocol(k) for k in capability.supported_kernels],
        has_stream=capability.has_stream,
        has_event=capability.has_event,
        has_collective=capability.has_collective,
        has_graph_exec=capability.has_graph_exec,
        supported_collectives=[enum_to_protocol(c) for c in capability.supported_collectives],
        has_kv_block_copy=capability.has_kv_block_copy,
        has_kv_block_migrate=capability.has_kv_block_migrate,
        max_memory_mb=capability.max_memory_mb,
        max_batch_size=capability.max_batch_size,
        max_sequence_length=capability.max_sequence_length,
    )
    kv_dtypes = (
        None if capability.kv_dtypes == capability.supported_dtypes else capability.kv_dtypes
    )
    remainder = CapabilityRemainder(
        capability.supported_reduce_ops, capability.extra, kv_dtypes, capability.supported_ops
    )
    return ProtocolCapability(cast(ProtocolCapabilityDescriptor, descriptor), remainder)


def capability_from_protocol(
    descriptor: ProtocolCapabilityDescriptor, remainder: CapabilityRemainder | None = None
) -> CapabilityDescriptor:
    """Our descriptor for a protocol one (and the remainder :func:`capability_to_protocol` gave).

    Without a remainder, ``extra`` and ``supported_ops`` are empty and ``supported_reduce_ops``
    takes our default (every op where collectives are listed). Duplicates in the protocol's
    lists are dropped. A descriptor with ``has_collective=True`` and no
    ``supported_collectives`` is refused: the protocol package reads it as "no collective",
    ours as "every collective".
    """
    proto = _protocol()
    _check_descriptor_fields(proto)
    if not isinstance(descriptor, proto.CapabilityDescriptor):
        raise InvalidArgumentError(
            f"expected a {_MODULE}.CapabilityDescriptor, got {type(descriptor).__name__}",
            hint="build ours directly with sagellm_backend.CapabilityDescriptor(...)",
        )
    if remainder is not None and not isinstance(remainder, CapabilityRemainder):
        raise InvalidArgumentError(
            f"remainder must be a CapabilityRemainder or None, got {type(remainder).__name__}",
            hint="pass the remainder capability_to_protocol() returned",
        )
    for name in _FLAGS:
        value = getattr(descriptor, name)
        if not isinstance(value, bool):
            raise InvalidArgumentError(
                f"protocol descriptor {name} must be a bool, got {value!r}",
                hint=f"set {name} to True or False",
            )
    for name in _LISTS:
        value = getattr(descriptor, name)
        if not isinstance(value, (list, tuple)):
            raise InvalidArgumentError(
                f"protocol descriptor {name} must be a list, got {type(value).__name__}",
                hint=f"set {name} to a list of names (empty for none)",
            )
    if descriptor.has_collective and not descriptor.supported_collectives:
        raise InvalidArgumentError(
            "protocol descriptor has has_collective=True but lists no supported_collectives; "
            f"{_MODULE} reads that as no collective at all, sagellm_backend as every collective",
            hint="list the supported collectives, or set has_collective=False",
        )
    rest = remainder if remainder is not None else CapabilityRemainder()
    return CapabilityDescriptor(
        device_name=descriptor.device_name,
        device_type=descriptor.device_type,
        compute_capability=descriptor.compute_capability,
        total_memory_bytes=descriptor.total_memory_bytes,
        available_memory_bytes=descriptor.available_memory_bytes,
        supported_dtypes=descriptor.supported_dtypes,
        supported_kernels=descriptor.supported_kernels,
        has_stream=descriptor.has_stream,
        has_event=descriptor.has_event,
        has_collective=descriptor.has_collective,
        has_graph_exec=descriptor.has_graph_exec,
        supported_collectives=descriptor.supported_collectives,
        has_kv_block_copy=descriptor.has_kv_block_copy,
        has_kv_block_migrate=descriptor.has_kv_block_migrate,
        max_memory_mb=descriptor.max_memory_mb,
        max_batch_size=descriptor.max_batch_size,
        max_sequence_length=descriptor.max_sequence_length,
        supported_reduce_ops=rest.supported_reduce_ops,
        extra=rest.extra,
        kv_dtypes=rest.kv_dtypes,
        supported_ops=rest.supported_ops,
    )


# Internals.


def _sequence(value: object, name: str, enum_name: str) -> Sequence[object]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidArgumentError(
            f"{name} must be a sequence, got {type(value).__name__}",
            hint=f"pass a list of {enum_name} members or their string values",
        )
    return value


def _protocol() -> ModuleType:
    """The protocol package, imported now; CapabilityError if it is missing or unsupported."""
    try:
        module = importlib.import_module(_MODULE)
    except ImportError as exc:
        raise CapabilityError(
            f"converting to or from sageLLM protocol values needs {PROTOCOL_REQUIREMENT}, "
            f"which is not installed ({exc})",
            hint=_INSTALL_HINT,
        ) from exc
    problem = _version_problem()
    if problem is not None:
        raise CapabilityError(problem, hint=f"pip install '{PROTOCOL_REQUIREMENT}'")
    return module


@functools.cache
def _version_problem() -> str | None:
    """Why the installed protocol release is unsupported, or None (also when it has no metadata)."""
    try:
        installed = metadata.version(_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    parts = tuple(int(p) for p in re.findall(r"\d+", installed.split("+")[0])[:4])
    low, high = _SUPPORTED
    if low <= parts < high:
        return None
    return f"{_DISTRIBUTION} {installed} is installed; this bridge supports {PROTOCOL_REQUIREMENT}"


def _their_member(proto: ModuleType, enum_name: str, value: object) -> Enum:
    enum = getattr(proto, enum_name)
    try:
        return cast(Enum, enum(value))
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum)
        raise InvalidArgumentError(
            f"{_MODULE}.{enum_name} has no value {value!r}",
            hint=f"use one of {choices}, or install {PROTOCOL_REQUIREMENT}",
        ) from None


def _our_code(value: str) -> ErrorCode:
    if value in _values(ErrorCode):
        return ErrorCode(value)
    nearest = NEAREST_CODES.get(value)
    if nearest is None:
        raise InvalidArgumentError(
            f"protocol error code {value!r} has no counterpart in sagellm_backend",
            hint=f"install {PROTOCOL_REQUIREMENT}, the releases this bridge maps",
        )
    return nearest


def _values(enum: type[Enum]) -> frozenset[str]:
    return frozenset(str(m.value) for m in enum)


def _carried_code(text: str) -> str | None:
    match = _CODE_PREFIX.match(text)
    return match["code"] if match else None


def _strip_code(text: str) -> str:
    return _CODE_PREFIX.sub("", text, count=1)


def _check_descriptor_fields(proto: ModuleType) -> None:
    theirs = {f.name for f in dataclasses.fields(proto.CapabilityDescriptor)}
    missing = sorted(set(_SHARED_FIELDS) - theirs)
    if missing:
        raise CapabilityError(
            f"{_MODULE}.CapabilityDescriptor lacks the fields {missing}",
            hint=f"install {PROTOCOL_REQUIREMENT}",
        )
