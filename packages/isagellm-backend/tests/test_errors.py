"""The error hierarchy: codes, builtin bases, messages with hints, pickling."""

from __future__ import annotations

import pickle

import pytest

import sagellm_backend as sb
from sagellm_backend import errors

BUILTIN_BASE = {
    errors.InvalidArgumentError: ValueError,
    errors.BlockNotFoundError: LookupError,
    errors.KernelNotFoundError: LookupError,
    errors.BackendNotFoundError: LookupError,
    errors.CapabilityError: NotImplementedError,
    errors.ResourceExhaustedError: MemoryError,
    errors.DeadlineExceededError: TimeoutError,
    errors.BackendUnavailableError: RuntimeError,
    errors.BackendLoadError: RuntimeError,
    errors.EventStateError: RuntimeError,
    errors.GraphCaptureError: RuntimeError,
    errors.CommError: RuntimeError,
    errors.CommTimeoutError: TimeoutError,
    errors.CommRankMismatchError: ValueError,
    errors.CommBackendNotSupportedError: NotImplementedError,
}

ALL_ERRORS = [getattr(errors, name) for name in errors.__all__ if name.endswith("Error")]


def test_every_error_is_exported_and_has_a_builtin_a_caller_would_catch() -> None:
    for cls in ALL_ERRORS:
        assert getattr(sb, cls.__name__) is cls
        assert issubclass(cls, errors.BackendError)
    for cls, base in BUILTIN_BASE.items():
        assert issubclass(cls, base), cls


def test_codes_shared_with_the_protocol_package_keep_their_strings() -> None:
    shared = {
        "invalid_argument", "resource_exhausted", "unavailable", "deadline_exceeded",
        "not_implemented", "comm_timeout", "comm_backend_not_supported", "comm_rank_mismatch",
        "operator_not_found", "comm_group_invalid",
    }  # fmt: skip
    assert shared <= {code.value for code in errors.ErrorCode}


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_message_names_code_and_hint_and_survives_pickling(cls: type[errors.BackendError]) -> None:
    error = cls("the thing went wrong", hint="do the other thing")
    assert str(error) == f"[{cls.default_code.value}] the thing went wrong; do the other thing"
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is cls
    assert (clone.code, clone.message, clone.hint, str(clone)) == (
        error.code, error.message, error.hint, str(error),
    )  # fmt: skip


def test_code_can_be_overridden_per_instance() -> None:
    error = errors.InvalidBlockError("mismatch", code=errors.ErrorCode.KV_BLOCK_MISMATCH)
    assert error.code is errors.ErrorCode.KV_BLOCK_MISMATCH
    assert str(error) == "[kv_block_mismatch] mismatch"


def test_codes_are_unique_per_class_default() -> None:
    defaults = [cls.default_code for cls in ALL_ERRORS if cls is not errors.BackendError]
    assert len(defaults) == len(set(defaults))
