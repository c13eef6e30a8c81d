"""Load records: what the registry knows about every backend candidate, as immutable values."""

from __future__ import annotations

from enum import Enum

from sagellm_backend.frozen import Frozen

__all__ = ["BackendRecord", "RecordSource", "RecordStatus"]


class RecordStatus(str, Enum):
    """Where a candidate stands, from merely known to chosen-able."""

    NOT_INSTALLED = "not_installed"
    """A kind of this project whose wheel is not installed."""
    FOUND = "found"
    """Discovered from metadata; its module has not been imported yet."""
    AVAILABLE = "available"
    """Loaded, and its probe says it can run here."""
    UNAVAILABLE = "unavailable"
    """Loaded, but it cannot run here (no device, no driver); ``reason`` says why."""
    BROKEN = "broken"
    """Its module failed to import or hung, or its factory or probe raised or hung; ``reason``
    has the error."""
    INCOMPATIBLE = "incompatible"
    """Built for another version of the core API; none of its code was run."""
    SHADOWED = "shadowed"
    """Another distribution (or an in-process registration) provides this kind instead."""
    INVALID_NAME = "invalid_name"
    """Its entry-point name is no kind a spec can name (upper case, 'auto'); never loaded."""

    def __str__(self) -> str:
        return self.value


class RecordSource(str, Enum):
    """Where a candidate comes from."""

    ENTRY_POINT = "entry_point"
    """An entry point of an installed distribution."""
    BUILTIN = "builtin"
    """A kind of the core found without installed metadata (the core runs from a source tree)."""
    REGISTERED = "registered"
    """register_backend() in this process."""
    KNOWN = "known"
    """A kind of this project that nothing installed provides."""

    def __str__(self) -> str:
        return self.value


class BackendRecord(Frozen):
    """One candidate backend: where it comes from, whether it loaded and can run, and why not.

    ``kind`` is the name it is looked up by (an entry-point name); ``alias_of`` names the kind
    it stands for when it is an alias. ``reason`` explains any status other than AVAILABLE.
    ``output`` is what the plugin wrote to stdout or stderr while it was imported or probed.
    """

    kind: str
    status: RecordStatus
    source: RecordSource
    distribution: str | None = None
    version: str | None = None
    target: str | None = None
    aliases: tuple[str, ...] = ()
    alias_of: str | None = None
    priority: int | None = None
    api_version: str | None = None
    loaded: bool = False
    reason: str | None = None
    install: str | None = None
    chosen: bool = False
    output: str | None = None

    @property
    def available(self) -> bool | None:
        """True or False once probed; None while that is not known yet."""
        if self.status is RecordStatus.AVAILABLE:
            return True
        if self.status is RecordStatus.FOUND:
            return None
        return False

    def to_dict(self) -> dict[str, object]:
        """Plain dict of JSON types."""
        out: dict[str, object] = {}
        for name in self._fields:
            value = getattr(self, name)
            if isinstance(value, Enum):
                value = value.value
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        out["available"] = self.available
        return out
