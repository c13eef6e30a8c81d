"""One error hierarchy for every backend.

Each error carries a stable ``code`` (an :class:`ErrorCode`), says what went wrong and what fixes
it (``hint``), and subclasses the builtin exception a caller would catch. A call that raises one
of these has changed no state.

    BackendError
    ├── InvalidArgumentError (ValueError) ............ invalid_argument
    │   ├── InvalidBlockError ........................ foreign_block, kv_block_mismatch
    │   ├── KernelExistsError ........................ operator_registration_failed
    │   ├── InvalidSpecError ......................... invalid_spec
    │   └── UnknownOptionError ....................... unknown_option
    ├── BlockNotFoundError (LookupError) ............. block_not_found
    ├── KernelNotFoundError (LookupError) ............ operator_not_found
    ├── BackendNotFoundError (LookupError) ........... backend_not_found
    │   └── BackendNotInstalledError ................. backend_not_installed
    ├── CapabilityError (NotImplementedError) ........ not_implemented
    ├── ResourceExhaustedError (MemoryError) ......... resource_exhausted
    ├── DeadlineExceededError (TimeoutError) ......... deadline_exceeded
    ├── BackendUnavailableError (RuntimeError) ....... unavailable
    ├── BackendLoadError (RuntimeError) .............. backend_load_failed
    │   └── IncompatiblePluginError .................. plugin_incompatible
    ├── EventStateError (RuntimeError) ............... invalid_event_state
    ├── GraphCaptureError (RuntimeError) ............. graph_capture_violation
    └── CommError (RuntimeError) ..................... comm_collective_failed
        ├── CommTimeoutError (TimeoutError) .......... comm_timeout
        ├── CommRankMismatchError (ValueError) ....... comm_rank_mismatch
        ├── CommGroupBrokenError ..................... comm_group_invalid
        └── CommBackendNotSupportedError
            (CapabilityError) ........................ comm_backend_not_supported

Codes shared with the sageLLM protocol package's ``ErrorCode`` keep its string values; the others
are ours (see docs/errors.md for the full catalogue).
"""

from __future__ import annotations

from enum import Enum
from typing import Any, ClassVar

__all__ = [
    "BackendError",
    "BackendLoadError",
    "BackendNotFoundError",
    "BackendNotInstalledError",
    "BackendUnavailableError",
    "BlockNotFoundError",
    "CapabilityError",
    "CommBackendNotSupportedError",
    "CommError",
    "CommGroupBrokenError",
    "CommRankMismatchError",
    "CommTimeoutError",
    "DeadlineExceededError",
    "ErrorCode",
    "EventStateError",
    "GraphCaptureError",
    "IncompatiblePluginError",
    "InvalidArgumentError",
    "InvalidBlockError",
    "InvalidSpecError",
    "KernelExistsError",
    "KernelNotFoundError",
    "ResourceExhaustedError",
    "UnknownOptionError",
]


class ErrorCode(str, Enum):
    """Stable machine-readable error codes."""

    # Shared with the sageLLM protocol package (same string values).
    INVALID_ARGUMENT = "invalid_argument"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    NOT_IMPLEMENTED = "not_implemented"
    COMM_TIMEOUT = "comm_timeout"
    COMM_GROUP_INVALID = "comm_group_invalid"
    COMM_BACKEND_NOT_SUPPORTED = "comm_backend_not_supported"
    COMM_RANK_MISMATCH = "comm_rank_mismatch"
    COMM_COLLECTIVE_FAILED = "comm_collective_failed"
    COMM_P2P_FAILED = "comm_p2p_failed"
    OPERATOR_NOT_FOUND = "operator_not_found"
    OPERATOR_REGISTRATION_FAILED = "operator_registration_failed"
    KV_TRANSFER_FAILED = "kv_transfer_failed"
    # Ours.
    BLOCK_NOT_FOUND = "block_not_found"
    FOREIGN_BLOCK = "foreign_block"
    KV_BLOCK_MISMATCH = "kv_block_mismatch"
    INVALID_EVENT_STATE = "invalid_event_state"
    GRAPH_CAPTURE_VIOLATION = "graph_capture_violation"
    INVALID_SPEC = "invalid_spec"
    UNKNOWN_OPTION = "unknown_option"
    BACKEND_NOT_FOUND = "backend_not_found"
    BACKEND_NOT_INSTALLED = "backend_not_installed"
    BACKEND_LOAD_FAILED = "backend_load_failed"
    PLUGIN_INCOMPATIBLE = "plugin_incompatible"

    def __str__(self) -> str:
        return self.value


class BackendError(Exception):
    """Base of every error raised by sagellm_backend and its plugins."""

    default_code: ClassVar[ErrorCode] = ErrorCode.INVALID_ARGUMENT
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, hint: str | None = None, code: ErrorCode | None = None):
        self.message = message
        self.hint = hint
        self.code: ErrorCode = code if code is not None else self.default_code
        super().__init__(self._render())

    def _render(self) -> str:
        text = f"[{self.code.value}] {self.message}"
        return f"{text}; {self.hint}" if self.hint else text

    def __str__(self) -> str:
        return self._render()

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.message,), {"hint": self.hint, "code": self.code})

    def __setstate__(self, state: dict[str, Any] | None) -> None:
        self.__dict__.update(state or {})
        self.args = (self._render(),)


class InvalidArgumentError(BackendError, ValueError):
    """An argument is malformed or out of range."""

    default_code = ErrorCode.INVALID_ARGUMENT


class InvalidBlockError(InvalidArgumentError):
    """A KV block belongs to another provider, or two blocks do not match for the operation."""

    default_code = ErrorCode.FOREIGN_BLOCK


class KernelExistsError(InvalidArgumentError):
    """A kernel of that name is already registered and no override was asked for."""

    default_code = ErrorCode.OPERATOR_REGISTRATION_FAILED


class InvalidSpecError(InvalidArgumentError):
    """A backend config string is malformed."""

    default_code = ErrorCode.INVALID_SPEC


class UnknownOptionError(InvalidArgumentError):
    """An option the chosen backend does not declare."""

    default_code = ErrorCode.UNKNOWN_OPTION


class BlockNotFoundError(BackendError, LookupError):
    """The KV block is not live: it was freed (use after free, double free) or migrated away."""

    default_code = ErrorCode.BLOCK_NOT_FOUND


class KernelNotFoundError(BackendError, LookupError):
    """No kernel of that name is registered."""

    default_code = ErrorCode.OPERATOR_NOT_FOUND


class BackendNotFoundError(BackendError, LookupError):
    """No backend of that kind is known."""

    default_code = ErrorCode.BACKEND_NOT_FOUND


class BackendNotInstalledError(BackendNotFoundError):
    """The kind is one of ours, but the wheel that provides it is not installed."""

    default_code = ErrorCode.BACKEND_NOT_INSTALLED


class CapabilityError(BackendError, NotImplementedError):
    """The backend does not offer this operation or data type (see its CapabilityDescriptor)."""

    default_code = ErrorCode.NOT_IMPLEMENTED


class ResourceExhaustedError(BackendError, MemoryError):
    """Not enough device memory or KV pages; nothing was allocated."""

    default_code = ErrorCode.RESOURCE_EXHAUSTED
    retryable = True


class DeadlineExceededError(BackendError, TimeoutError):
    """A wait did not finish within its timeout."""

    default_code = ErrorCode.DEADLINE_EXCEEDED
    retryable = True


class BackendUnavailableError(BackendError, RuntimeError):
    """The backend is installed but cannot run here (no device, no driver); says why."""

    default_code = ErrorCode.UNAVAILABLE


class BackendLoadError(BackendError, RuntimeError):
    """A backend plugin failed to import, or its factory raised; the cause is chained."""

    default_code = ErrorCode.BACKEND_LOAD_FAILED


class IncompatiblePluginError(BackendLoadError):
    """A plugin was built for another version of the core API."""

    default_code = ErrorCode.PLUGIN_INCOMPATIBLE


class EventStateError(BackendError, RuntimeError):
    """An event was used in a state that does not allow it (not recorded, timing disabled)."""

    default_code = ErrorCode.INVALID_EVENT_STATE


class GraphCaptureError(BackendError, RuntimeError):
    """A host-side operation was attempted while a graph is being captured, or misuse of a graph."""

    default_code = ErrorCode.GRAPH_CAPTURE_VIOLATION


class CommError(BackendError, RuntimeError):
    """A collective or point-to-point operation failed."""

    default_code = ErrorCode.COMM_COLLECTIVE_FAILED


class CommTimeoutError(CommError, TimeoutError):
    """A collective did not complete within its timeout; its group is unusable afterwards."""

    default_code = ErrorCode.COMM_TIMEOUT


class CommRankMismatchError(CommError, ValueError):
    """Ranks called a collective with different shapes, dtypes or ops."""

    default_code = ErrorCode.COMM_RANK_MISMATCH


class CommGroupBrokenError(CommError):
    """The process group is unusable after an earlier failure; create a new one."""

    default_code = ErrorCode.COMM_GROUP_INVALID


class CommBackendNotSupportedError(CommError, CapabilityError):
    """The communication backend cannot do this op or dtype; refused before anything is sent."""

    default_code = ErrorCode.COMM_BACKEND_NOT_SUPPORTED


def close_match(word: str, choices: list[str]) -> list[str]:
    """The choice closest to ``word``, for a "did you mean" hint (at most one; ``difflib`` is
    imported only when a name is unknown, so a start-up does not pay for it)."""
    import difflib

    return difflib.get_close_matches(word, choices, n=1)
