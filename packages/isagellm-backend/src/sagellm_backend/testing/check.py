"""A conformance check: a stable id, the promise it checks, when it applies, and its body.

Check bodies are plain functions of a :class:`CheckContext`; they raise
:class:`ConformanceFailure` naming the broken promise, or :class:`CheckSkipped` with a reason.
Whether a check applies is decided by the provider's CapabilityDescriptor: a check of a claimed
capability requires it, and its counterpart checks that the unclaimed operation is refused.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, TypeVar

from sagellm_backend.capability import CapabilityDescriptor
from sagellm_backend.errors import BackendError, ErrorCode
from sagellm_backend.kv import KVBlock
from sagellm_backend.protocols import BackendProvider
from sagellm_backend.testing.target import ConformanceTarget, RankFn, RankOutcome

__all__ = [
    "Area",
    "Check",
    "CheckContext",
    "CheckSkipped",
    "ConformanceFailure",
    "Requirement",
    "block_nbytes",
    "block_pages",
    "call_untyped",
    "claims",
    "claims_op",
    "expect_refusal",
    "lacks",
    "lacks_op",
]

T = TypeVar("T")
E = TypeVar("E", bound=BackendError)

_RANDOM_CHUNK = 1 << 20

Requirement = Callable[[CapabilityDescriptor], "str | None"]
"""Returns None when a check applies to a capability matrix, else the reason to skip it."""


class Area(str, Enum):
    """Group of checks; ``sagellm-backend check --only AREA`` selects one."""

    PROVIDER = "provider"
    STREAMS = "streams"
    KV = "kv"
    COLLECTIVES = "collectives"
    KERNELS = "kernels"
    OPS = "ops"
    GRAPH = "graph"
    THREADS = "threads"
    INPUTS = "inputs"

    def __str__(self) -> str:
        return self.value


class ConformanceFailure(AssertionError):
    """A promise of the protocols or of the capability matrix is broken."""


class CheckSkipped(Exception):
    """The check does not apply to this target; the message says why."""


@dataclass(frozen=True)
class Check:
    """One standard check. ``body`` works for any tensor type (it is generic in it)."""

    id: str
    area: Area
    promise: str
    body: Callable[[CheckContext[Any]], None]
    requires: Requirement | None = None

    def skip_reason(self, capability: CapabilityDescriptor) -> str | None:
        return None if self.requires is None else self.requires(capability)


def claims(*flags: str) -> Requirement:
    """Applies when every boolean capability in ``flags`` is claimed."""

    def requirement(capability: CapabilityDescriptor) -> str | None:
        missing = [f for f in flags if not getattr(capability, f)]
        return f"not claimed: {', '.join(f'{f}=False' for f in missing)}" if missing else None

    return requirement


def lacks(flag: str) -> Requirement:
    """Applies when the boolean capability ``flag`` is not claimed (checks its refusal)."""

    def requirement(capability: CapabilityDescriptor) -> str | None:
        return (
            f"claimed: {flag}=True (the claimed operation is checked instead)"
            if getattr(capability, flag)
            else None
        )

    return requirement


def claims_op(name: str) -> Requirement:
    """Applies when the capability claims the standard op ``name``."""

    def requirement(capability: CapabilityDescriptor) -> str | None:
        return None if capability.supports_op(name) else f"not claimed: op {name}"

    return requirement


def lacks_op(name: str) -> Requirement:
    """Applies when the standard op ``name`` is not claimed (checks its refusal)."""

    def requirement(capability: CapabilityDescriptor) -> str | None:
        return (
            f"claimed: op {name} (the claimed operation is checked instead)"
            if capability.supports_op(name)
            else None
        )

    return requirement


class CheckContext(Generic[T]):
    """What a check body works with: the target, providers it makes, and seeded randomness.

    Providers made through the context are closed when the check ends.
    """

    def __init__(
        self,
        target: ConformanceTarget[T],
        capability: CapabilityDescriptor,
        *,
        seed: int | str,
        world_timeout: float = 30.0,
    ) -> None:
        self.target = target
        self.capability = capability
        self.rng = random.Random(seed)
        self.world_timeout = world_timeout
        self.world_sizes: set[int] = set()
        self.notes: list[str] = []
        self._providers: list[BackendProvider[T]] = []

    @property
    def provider(self) -> BackendProvider[T]:
        """The check's provider, made on first use."""
        if not self._providers:
            self._providers.append(self.target.make_provider())
        return self._providers[0]

    def new_provider(self) -> BackendProvider[T]:
        """Another provider of the same target, independent of :attr:`provider`."""
        provider = self.target.make_provider()
        self._providers.append(provider)
        return provider

    def close(self) -> None:
        providers, self._providers = self._providers, []
        for provider in providers:
            provider.close()

    def note(self, text: str) -> None:
        """Add a line to the check's detail in the report."""
        self.notes.append(text)

    def random_bytes(self, size: int) -> bytes:
        """``size`` seeded random bytes, never all zeros.

        Beyond one MiB they are rotations of one random MiB by random offsets (fast, and no two
        pages of a block alike).
        """
        if size <= _RANDOM_CHUNK:
            data = bytearray(self.rng.randbytes(size))
        else:
            chunk = self.rng.randbytes(_RANDOM_CHUNK)
            data = bytearray(size)
            for start in range(0, size, _RANDOM_CHUNK):
                offset = self.rng.randrange(_RANDOM_CHUNK)
                piece = chunk[offset:] + chunk[:offset]
                data[start : start + _RANDOM_CHUNK] = piece[: size - start]
        if size:
            data[0] = self.rng.randrange(1, 256)
        return bytes(data)

    def fill(self, provider: BackendProvider[T], block: KVBlock) -> bytes:
        """Write fresh random bytes into ``block`` (queued on the current stream); return them."""
        data = self.random_bytes(block_nbytes(provider, block))
        provider.kv_block_write(block, data)
        return data

    def run_world(self, world_size: int, fn: RankFn[T]) -> list[RankOutcome]:
        """Run ``fn`` on every rank of a world of ``world_size``; the report lists the size."""
        outcomes = self.target.run_world(world_size, fn, timeout=self.world_timeout)
        self.world_sizes.add(world_size)
        return outcomes


def block_pages(provider: BackendProvider[Any], block: KVBlock) -> int:
    """Pages a block of ``provider`` occupies, as ``kv_block_info`` says."""
    return provider.kv_block_info(block).num_pages


def block_nbytes(provider: BackendProvider[Any], block: KVBlock) -> int:
    """Bytes a block of ``provider`` holds: its pages times the page size in its dtype."""
    info = provider.kv_block_info(block)
    return provider.kv_layout.page_bytes(info.dtype) * info.num_pages


def call_untyped(fn: Callable[..., object], *args: object) -> Callable[[], object]:
    """``fn(*args)`` as a thunk, for calls whose arguments are deliberately of the wrong type
    (refusing them is the promise under check)."""
    return lambda: fn(*args)


def expect_refusal(
    what: str,
    error: type[E],
    call: Callable[[], object],
    *,
    code: ErrorCode | None = None,
) -> E:
    """Call ``call`` and return the ``error`` it raises; fail if it accepts or raises otherwise.

    ``what`` names the promise in the failure message, e.g. "a double free is refused".
    """
    try:
        call()
    except error as exc:
        if code is not None and exc.code is not code:
            raise ConformanceFailure(
                f"{what}: raised {type(exc).__name__} with code {exc.code.value}, "
                f"expected code {code.value}"
            ) from exc
        return exc
    except Exception as exc:
        raise ConformanceFailure(
            f"{what}: raised {type(exc).__name__}({exc}) instead of {error.__name__}"
        ) from exc
    raise ConformanceFailure(f"{what}: the call was accepted; expected {error.__name__}")
