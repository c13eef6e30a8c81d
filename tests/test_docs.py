"""The documentation keeps up with the code."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagellm_backend import ErrorCode

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_is_in_the_catalogue(code: ErrorCode) -> None:
    assert f"`{code.value}`" in (DOCS / "errors.md").read_text()
