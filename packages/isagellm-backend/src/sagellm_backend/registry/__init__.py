"""Finding and choosing backends: entry-point discovery, config strings and load records.

``get_backend("cuda:0")`` parses the spec, finds the plugin that provides the kind (importing
only that plugin), checks it is compatible and available, and calls its factory. Importing
this package discovers nothing; see docs/config-strings.md and docs/selection.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sagellm_backend.protocols import BackendProvider
from sagellm_backend.registry.discovery import GROUP
from sagellm_backend.registry.known import KNOWN_KINDS, KnownKind
from sagellm_backend.registry.records import BackendRecord, RecordSource, RecordStatus
from sagellm_backend.registry.selection import (
    DEFAULT_IMPORT_TIMEOUT,
    DEFAULT_SPEC,
    ENV_VAR,
    IMPORT_TIMEOUT_ENV_VAR,
    SIMULATED_KINDS,
    BackendRegistry,
)
from sagellm_backend.registry.spec import (
    AUTO,
    BackendConfig,
    BackendSpec,
    Candidate,
    parse_spec,
)

__all__ = [
    "AUTO",
    "DEFAULT_IMPORT_TIMEOUT",
    "DEFAULT_SPEC",
    "ENV_VAR",
    "GROUP",
    "IMPORT_TIMEOUT_ENV_VAR",
    "KNOWN_KINDS",
    "SIMULATED_KINDS",
    "BackendConfig",
    "BackendRecord",
    "BackendRegistry",
    "BackendSpec",
    "Candidate",
    "KnownKind",
    "RecordSource",
    "RecordStatus",
    "default_registry",
    "get_backend",
    "list_backends",
    "parse_spec",
    "register_backend",
]

_DEFAULT = BackendRegistry()


def default_registry() -> BackendRegistry:
    """The process-wide registry behind :func:`get_backend` and friends."""
    return _DEFAULT


def get_backend(spec: str | None = None, **options: object) -> BackendProvider[Any]:
    """Create the backend that ``spec`` names (default: ``$SAGELLM_BACKEND``, else ``"mock"``).

    Keyword options override options written in the spec. Whatever a plugin raises while it is
    imported, probed or created, BaseException included, comes back as a BackendLoadError
    (unless it is one of our errors); a Ctrl-C of the user still interrupts. Raises
    InvalidSpecError, BackendNotFoundError, BackendNotInstalledError, UnknownOptionError,
    BackendUnavailableError or BackendLoadError (IncompatiblePluginError), each saying what
    to do.
    """
    return _DEFAULT.get_backend(spec, **options)


def list_backends(*, probe: bool = True) -> list[BackendRecord]:
    """A load record for every candidate backend; ``probe`` loads and probes each one.

    Each import has a deadline (``$SAGELLM_PLUGIN_IMPORT_TIMEOUT``, default 10 s) and each
    probe one of 10 s: a plugin that runs past it is recorded as broken (hung).
    """
    return _DEFAULT.list_backends(probe=probe)


def register_backend(
    kind: str, factory: Callable[..., object], *, replace: bool = False
) -> BackendRecord:
    """Register a factory for ``kind`` in this process (tests, notebooks)."""
    return _DEFAULT.register_backend(kind, factory, replace=replace)
