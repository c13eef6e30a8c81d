"""The documentation keeps up with the code."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagellm_backend import ErrorCode
from sagellm_backend.ops import STANDARD_OPS, StandardOp

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_is_in_the_catalogue(code: ErrorCode) -> None:
    assert f"`{code.value}`" in (DOCS / "errors.md").read_text()


@pytest.mark.parametrize("op", list(STANDARD_OPS.values()), ids=lambda op: op.name)
def test_every_standard_op_is_in_the_kernel_catalogue(op: StandardOp) -> None:
    kind = op.kind.value if op.kind is not None else "provider"
    row = f"| `{op.name}` | {kind} | `{op.signature}` | {op.summary} |"
    assert row in (DOCS / "data-path.md").read_text()
