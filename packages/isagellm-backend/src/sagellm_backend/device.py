"""Device references ("cuda:1", "host") and memory statistics."""

from __future__ import annotations

import re

from sagellm_backend.errors import InvalidArgumentError
from sagellm_backend.frozen import Frozen

__all__ = ["HOST", "DeviceRef", "MemoryStats"]

_DEVICE_RE = re.compile(r"(?P<kind>[a-z][a-z0-9_]*)(?::(?P<index>[0-9]+))?")
"""ASCII only, matched in full: no other script's digits, no trailing newline."""

HOST = "host"
"""Device name of host memory, a valid migration target for every backend."""


class DeviceRef(Frozen):
    """A parsed device name: ``kind`` with an optional ``index``."""

    kind: str
    index: int | None = None

    @classmethod
    def parse(cls, text: object) -> DeviceRef:
        """Parse ``"kind"`` or ``"kind:N"``; anything else raises InvalidArgumentError."""
        match = _DEVICE_RE.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise InvalidArgumentError(
                f"malformed device {text!r}",
                hint="write a device as 'kind' or 'kind:N', for example 'cuda:0' or 'host'",
            )
        index = match.group("index")
        return cls(match.group("kind"), int(index) if index is not None else None)

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


class MemoryStats(Frozen):
    """Memory of one backend device, in bytes, with the KV pool's page accounting."""

    total_bytes: int
    used_bytes: int
    peak_used_bytes: int
    kv_blocks_in_use: int
    kv_pages_in_use: int
    kv_pages_total: int | None = None

    @property
    def free_bytes(self) -> int:
        return self.total_bytes - self.used_bytes
