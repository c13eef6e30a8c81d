"""Baselines: the device's own plain operations that the benchmarks compare a backend against.

A backend's batched KV copy is compared with one contiguous copy of the same number of bytes on
its device (the roofline), and its events with the device's raw events. These are device
specific, so each provider type registers how to make them; a provider without registered
baselines gets the rows that need none.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Any, Protocol

from sagellm_backend.protocols import BackendProvider

__all__ = ["Baselines", "baselines_for", "register_baselines"]


class Baselines(Protocol):
    """Plain device operations of one provider."""

    def contiguous_copy(self, nbytes: int) -> Callable[[], None] | None:
        """An operation that copies ``nbytes`` contiguous bytes within the device, once per call;
        None where the device moves no bytes to copy pages (the mock moves references)."""
        ...

    def contiguous_swap(self, nbytes: int) -> Callable[[], None] | None:
        """An operation that copies ``nbytes`` contiguous bytes to host memory and back; None
        where the device moves no bytes to swap pages."""
        ...

    def raw_event_pair(self) -> Callable[[], float] | None:
        """An operation that records two raw device events and returns their elapsed_ms; None
        where the device has no events beside the provider's own."""
        ...

    def paged_copy(self, src_pages: list[int], dst_pages: list[int]) -> Callable[[], None]:
        """An operation that copies page ``src_pages[i]`` of the device's KV pool to
        ``dst_pages[i]``, the plainest way the device can (indices prepared once)."""
        ...

    def paged_swap(self, pages: list[int]) -> Callable[[], None]:
        """An operation that copies ``pages`` of the device's KV pool to as many host pages and
        back, the plainest way the device can (indices prepared once)."""
        ...

    def index_tensor(self, values: list[Any], *, wide: bool) -> object:
        """A new device tensor of int32 (int64 if ``wide``) from a Python list (a list of
        lists: 2-D), built the straightforward way, as ``torch.tensor(values, device=...)``."""
        ...


BaselineFactory = Callable[[BackendProvider[Any]], Baselines]

_lock = threading.Lock()
_registered: dict[str, str | BaselineFactory] = {
    "sagellm_backend.mock.provider.MockBackendProvider": (
        "sagellm_backend.bench.mock_baselines:MockBaselines"
    ),
    "sagellm_backend.torch_backend.provider.TorchBackendProvider": (
        "sagellm_backend.torch_backend.bench_baselines:TorchBaselines"
    ),
}


def register_baselines(provider_type: type | str, factory: str | BaselineFactory) -> None:
    """Use ``factory(provider)`` as the baselines of providers of ``provider_type``.

    Both may be given as import paths (``"module.Class"``, ``"module:callable"``), so that
    registering imports nothing heavy.
    """
    key = provider_type if isinstance(provider_type, str) else _qualname(provider_type)
    with _lock:
        _registered[key] = factory


def baselines_for(provider: BackendProvider[Any]) -> Baselines | None:
    """The baselines registered for ``provider``'s type or a base class of it, else None."""
    for cls in type(provider).__mro__:
        with _lock:
            factory = _registered.get(_qualname(cls))
        if factory is None:
            continue
        if isinstance(factory, str):
            module, _, attr = factory.partition(":")
            factory = getattr(importlib.import_module(module), attr)
        baselines: Baselines = factory(provider)
        return baselines
    return None


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
