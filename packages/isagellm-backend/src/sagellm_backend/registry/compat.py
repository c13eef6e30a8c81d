"""Plugin compatibility, judged before any plugin code runs.

Two checks: the distribution's Requires-Dist pin on the core (read from metadata, before the
entry point is imported) and the factory's ``api_version`` (read from the loaded factory object,
before its probe or factory runs). Where a version cannot be compared exactly, it is not refused.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable

from sagellm_backend._version import __version__
from sagellm_backend.factory import API_VERSION

__all__ = ["api_mismatch", "requirement_mismatch"]

_RELEASE_RE = re.compile(r"^v?(\d+(?:\.\d+)*)$")
_CLAUSE_RE = re.compile(r"^\s*(===|==|!=|<=|>=|~=|<|>)\s*(\S+?)\s*$")
_OPS: dict[str, Callable[[tuple[int, ...], tuple[int, ...]], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def requirement_mismatch(specifier: str | None, core_version: str = __version__) -> str | None:
    """Why ``core_version`` does not satisfy ``specifier``, or None if it does or cannot tell."""
    if not specifier:
        return None
    release = _release(core_version)
    if release is None:
        return None
    for clause in specifier.split(","):
        match = _CLAUSE_RE.match(clause)
        if match is None:
            return None
        op, text = match.groups()
        if _satisfies(release, op, text) is False:
            return f"it requires isagellm-backend{specifier.replace(' ', '')}"
    return None


def api_mismatch(plugin_api: object, core_api: str = API_VERSION) -> str | None:
    """Why a factory's ``api_version`` is incompatible with the core's, or None."""
    if not isinstance(plugin_api, str) or not plugin_api:
        return f"it declares no usable api_version ({plugin_api!r})"
    if plugin_api.split(".")[0] != core_api.split(".")[0]:
        return f"it was built for backend API {plugin_api}"
    return None


def _satisfies(release: tuple[int, ...], op: str, text: str) -> bool | None:
    wildcard = op in ("==", "!=") and text.endswith(".*")
    other = _release(text[:-2] if wildcard else text)
    if other is None:
        return None
    if wildcard:
        equal = release[: len(other)] == other
        return equal if op == "==" else not equal
    if op in ("==", "===", "!="):
        equal = _pad(release, other) == _pad(other, release)
        return equal if op != "!=" else not equal
    if op == "~=":
        if len(other) < 2:
            return None
        return _pad(release, other) >= _pad(other, release) and (
            release[: len(other) - 1] == other[:-1]
        )
    return _OPS[op](_pad(release, other), _pad(other, release))


def _release(text: str) -> tuple[int, ...] | None:
    match = _RELEASE_RE.match(text.strip())
    return tuple(int(p) for p in match.group(1).split(".")) if match else None


def _pad(version: tuple[int, ...], other: tuple[int, ...]) -> tuple[int, ...]:
    return version + (0,) * max(0, len(other) - len(version))
