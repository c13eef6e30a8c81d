"""Targets for installed backends named by config string, as ``sagellm-backend check`` uses.

A plugin ships its own target by an entry point in the ``sagellm.conformance`` group: name =
kind, value = a callable taking the config string and returning a ConformanceTarget. Without
one, the kit runs against providers from :func:`get_backend`, and collectives run on the
provider's own world; the core's own kinds get their tensor adapters (the mock's, and the torch
layer's for cpu, which carries the oracles of the standard ops), any other kind none.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from sagellm_backend.errors import BackendLoadError
from sagellm_backend.mock import MockBackendProvider
from sagellm_backend.protocols import BackendProvider
from sagellm_backend.registry import default_registry, get_backend
from sagellm_backend.testing.mock_target import MockTarget
from sagellm_backend.testing.target import ConformanceTarget, TensorAdapter

__all__ = ["TARGET_GROUP", "SpecTarget", "target_for_spec"]

TARGET_GROUP = "sagellm.conformance"


class SpecTarget(ConformanceTarget[Any]):
    """Providers made by ``get_backend(spec)``, whose tensors ``tensors`` adapts (if given)."""

    def __init__(
        self, spec: str | None, kind: str, tensors: TensorAdapter[Any] | None = None
    ) -> None:
        self.spec = spec
        self.name = spec or kind
        self.tensors = tensors

    def make_provider(self) -> BackendProvider[Any]:
        return get_backend(self.spec)


def target_for_spec(spec: str | None) -> ConformanceTarget[Any]:
    """The conformance target for the backend ``spec`` selects (resolved once, then closed);
    None: ``$SAGELLM_BACKEND``, else the mock, as ``get_backend`` reads it."""
    spec = str(default_registry().resolve_spec(spec))
    provider = get_backend(spec)
    kind = provider.kind
    provider.close()
    for entry in metadata.entry_points(group=TARGET_GROUP):
        if entry.name == kind:
            try:
                target = entry.load()(spec)
            except Exception as exc:
                raise BackendLoadError(
                    f"the conformance target {entry.value!r} of {kind!r} failed to load",
                    hint="fix or reinstall the plugin that declares it",
                ) from exc
            if not isinstance(target, ConformanceTarget):
                raise BackendLoadError(
                    f"{entry.value!r} returned a {type(target).__name__}, not a ConformanceTarget",
                    hint="the sagellm.conformance entry point must return a ConformanceTarget",
                )
            return target
    if kind == "mock":
        return MockTarget.from_provider(lambda: _mock(spec), name=spec or kind)
    if kind == "cpu":
        # torch is installed: it has just made a cpu provider.
        from sagellm_backend.torch_backend.conformance import TorchTensors

        return SpecTarget(spec, kind, TorchTensors())
    return SpecTarget(spec, kind)


def _mock(spec: str | None) -> MockBackendProvider:
    provider = get_backend(spec)
    if not isinstance(provider, MockBackendProvider):
        raise BackendLoadError(
            f"{spec!r} gave a {type(provider).__name__} for kind 'mock'",
            hint="pass a spec that selects the built-in mock, e.g. 'mock'",
        )
    return provider
