"""Without isagellm-protocol the bridge imports, and every conversion says how to install it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sagellm_backend import (
    BlockNotFoundError,
    CapabilityDescriptor,
    CapabilityError,
    DType,
    ErrorCode,
    InvalidArgumentError,
    ReduceOp,
)
from sagellm_backend.interop import (
    CLASS_FOR_CODE,
    NEAREST_CODES,
    NEAREST_PROTOCOL_CODES,
    CapabilityRemainder,
    capability_from_protocol,
    capability_to_protocol,
    enum_from_protocol,
    enum_to_protocol,
    error_code_from_protocol,
    error_code_to_protocol,
    error_from_protocol,
    error_to_protocol,
)

CONVERSIONS: dict[str, Callable[[], object]] = {
    "enum_to_protocol": lambda: enum_to_protocol(DType.FP16),
    "enum_from_protocol": lambda: enum_from_protocol(DType.FP16),
    "error_code_to_protocol": lambda: error_code_to_protocol(ErrorCode.UNAVAILABLE),
    "error_code_from_protocol": lambda: error_code_from_protocol("unavailable"),
    "error_to_protocol": lambda: error_to_protocol(BlockNotFoundError("block 3 was freed")),
    "error_from_protocol": lambda: error_from_protocol(BlockNotFoundError("x")),
    "capability_to_protocol": lambda: capability_to_protocol(CapabilityDescriptor()),
    "capability_from_protocol": lambda: capability_from_protocol(CapabilityDescriptor()),  # type: ignore[arg-type]
}


@pytest.fixture
def protocol_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import sagellm_protocol`` fail as it does where the package is not installed."""
    monkeypatch.setitem(sys.modules, "sagellm_protocol", None)


@pytest.mark.usefixtures("protocol_missing")
@pytest.mark.parametrize("convert", CONVERSIONS.values(), ids=CONVERSIONS.keys())
def test_each_conversion_names_the_install_command(convert: Callable[[], object]) -> None:
    with pytest.raises(CapabilityError) as info:
        convert()
    error = info.value
    assert isinstance(error, NotImplementedError)
    assert error.code is ErrorCode.NOT_IMPLEMENTED
    assert "isagellm-protocol>=0.5.4,<0.6" in error.message
    assert "which is not installed" in error.message
    assert error.hint is not None
    assert "pip install 'isagellm-backend[protocol]'" in error.hint
    assert "Python 3.11" in error.hint
    assert isinstance(error.__cause__, ImportError)


@pytest.mark.usefixtures("protocol_missing")
def test_the_remainder_needs_no_protocol_package() -> None:
    remainder = CapabilityRemainder(
        ["sum", ReduceOp.MAX],
        {"driver": "550"},
        supported_ops=["sample", "kv_cache", "rms_norm", "sample"],
    )
    assert remainder.supported_ops == ("kv_cache", "rms_norm", "sample")
    assert CapabilityRemainder.from_dict(remainder.to_dict()) == remainder
    with pytest.raises(InvalidArgumentError, match="unknown standard ops"):
        CapabilityRemainder(supported_ops=["reshape_and_cache"])


def test_importing_the_bridge_does_not_import_the_protocol_package() -> None:
    code = (
        "import sys\n"
        "import sagellm_backend.interop\n"
        "import sagellm_backend.interop.protocol\n"
        "assert 'sagellm_protocol' not in sys.modules, 'imported eagerly'\n"
        "assert 'pydantic' not in sys.modules, 'imported eagerly'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_nearest_code_tables_are_documented() -> None:
    text = (Path(__file__).resolve().parents[3] / "docs" / "protocol-interop.md").read_text()
    for ours, theirs in NEAREST_PROTOCOL_CODES.items():
        assert f"| `{ours.value}` | `{theirs}` |" in text
    for theirs, ours in NEAREST_CODES.items():
        assert f"| `{theirs}` | `{ours.value}` | `{CLASS_FOR_CODE[ours].__name__}` |" in text
