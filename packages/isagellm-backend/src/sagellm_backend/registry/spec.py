"""Config strings: the grammar that names a backend, parsed into typed values.

::

    spec      := "auto" | candidate ("," candidate)*
    candidate := kind [":" index] ["?" option ("&" option)*]
    kind      := letter (letter | digit | "_")*          case-insensitive
    index     := digit+
    option    := name "=" value
    value     := (letter | digit | "_" | "." | "-" | "/" | "+")+

Spaces may surround a whole candidate (``" mock , cpu "``); a space inside one is malformed.

Examples: ``mock``, ``cuda:1``, ``mock?max_memory_mb=1024&num_layers=4``, ``cuda,cpu``,
``cuda?device_ids=0+1``. List-valued options join their items with ``+``
(:data:`sagellm_backend.factory.LIST_SEPARATOR`), so they never collide with the ``,`` of a
fallback list. Parsing is pure text processing: it imports nothing and evaluates nothing.
"""

from __future__ import annotations

import re
from typing import NoReturn

from sagellm_backend.errors import InvalidSpecError
from sagellm_backend.factory import LIST_SEPARATOR
from sagellm_backend.frozen import Frozen

__all__ = ["AUTO", "BackendConfig", "BackendSpec", "Candidate", "is_valid_kind", "parse_spec"]

AUTO = "auto"
"""The spec that picks the highest-priority available real backend."""

MAX_SPEC_LENGTH = 4096

_KIND_RE = re.compile(r"[a-z][a-z0-9_]*\Z")
_KIND_TEXT_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
"""A kind as written: ASCII only, checked before lower-casing (which maps some other letters
to ASCII ones, such as the Kelvin sign to 'k')."""
_INDEX_RE = re.compile(r"[0-9]+\Z")
_NAME_RE = re.compile(r"[a-z_][a-z0-9_]*\Z")
_VALUE_RE = re.compile(r"[A-Za-z0-9_.\-/+]+\Z")
_HINT = (
    "write 'kind', 'kind:N', 'kind?option=value&option=value', a fallback list 'cuda,cpu' "
    f"or 'auto', with no space inside a candidate; join list values with {LIST_SEPARATOR!r}"
)


class Candidate(Frozen):
    """One backend named by a spec: its kind, optional device index and option texts."""

    kind: str
    index: int | None = None
    options: tuple[tuple[str, str], ...] = ()

    @property
    def option_dict(self) -> dict[str, str]:
        return dict(self.options)

    def __str__(self) -> str:
        text = self.kind if self.index is None else f"{self.kind}:{self.index}"
        if self.options:
            text += "?" + "&".join(f"{name}={value}" for name, value in self.options)
        return text


class BackendSpec(Frozen):
    """A parsed config string: candidates tried in order, or ``auto``."""

    candidates: tuple[Candidate, ...]

    @property
    def is_auto(self) -> bool:
        return len(self.candidates) == 1 and self.candidates[0].kind == AUTO

    def __str__(self) -> str:
        return ",".join(str(c) for c in self.candidates)


class BackendConfig(Frozen):
    """The config object a factory receives as its ``config`` argument.

    ``device`` is None or the device index as text ("N"); ``device_ids`` lists the devices of
    a multi-device provider. This is the shape existing sageLLM callers pass.
    """

    kind: str
    device: str | None = None
    device_ids: tuple[int, ...] | None = None


def parse_spec(text: object) -> BackendSpec:
    """Parse a config string; anything malformed raises InvalidSpecError naming the bad part."""
    if not isinstance(text, str):
        raise InvalidSpecError(
            f"a backend spec must be a string, got {type(text).__name__}", hint=_HINT
        )
    if len(text) > MAX_SPEC_LENGTH:
        raise InvalidSpecError(
            f"backend spec is {len(text)} characters long; the limit is {MAX_SPEC_LENGTH}",
            hint=_HINT,
        )
    stripped = text.strip()
    if not stripped:
        raise InvalidSpecError("backend spec is empty", hint=_HINT)
    parts = stripped.split(",")
    candidates = tuple(
        _parse_candidate(part.strip(), position, text) for position, part in enumerate(parts, 1)
    )
    if any(c.kind == AUTO for c in candidates) and len(candidates) > 1:
        _fail(text, "'auto' must stand alone, not in a fallback list")
    return BackendSpec(candidates)


def is_valid_kind(text: object) -> bool:
    """True if ``text`` is a kind as a spec writes it (lower case letters, digits and '_')."""
    return isinstance(text, str) and _KIND_RE.match(text) is not None and text != AUTO


def _parse_candidate(part: str, position: int, text: str) -> Candidate:
    if not part:
        _fail(text, f"entry {position} of the fallback list is empty")
    if any(char.isspace() for char in part):
        _fail(
            text,
            f"entry {part!r} has a space inside it; spaces may only surround a whole entry",
        )
    head, has_query, query = part.partition("?")
    kind_text, has_index, index_text = head.partition(":")
    if not _KIND_TEXT_RE.match(kind_text):
        _fail(text, f"{kind_text!r} is not a backend kind (letters, digits and '_')")
    kind = kind_text.lower()
    index: int | None = None
    if has_index:
        if not _INDEX_RE.match(index_text):
            _fail(text, f"device index {index_text!r} of {kind!r} is not a non-negative integer")
        index = int(index_text)
    options = _parse_options(query, kind, text) if has_query else ()
    if kind == AUTO and (index is not None or options):
        _fail(text, "'auto' takes no device index or options")
    return Candidate(kind, index, options)


def _parse_options(query: str, kind: str, text: str) -> tuple[tuple[str, str], ...]:
    if not query:
        _fail(text, f"{kind!r} has '?' but no options after it")
    options: dict[str, str] = {}
    for item in query.split("&"):
        name, has_value, value = item.partition("=")
        if not _NAME_RE.match(name):
            _fail(text, f"{name!r} in {item!r} is not an option name")
        if not has_value or not value:
            _fail(text, f"option {name!r} of {kind!r} has no value (write {name}=VALUE)")
        if not _VALUE_RE.match(value):
            _fail(
                text,
                f"value {value!r} of option {name!r} has characters other than letters, "
                "digits and _ . - / +",
            )
        if name in options:
            _fail(text, f"option {name!r} of {kind!r} is given twice")
        options[name] = value
    return tuple(options.items())


def _fail(text: str, what: str) -> NoReturn:
    raise InvalidSpecError(f"malformed backend spec {text!r}: {what}", hint=_HINT)
