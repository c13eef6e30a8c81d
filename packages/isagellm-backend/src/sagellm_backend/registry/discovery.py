"""Entry-point discovery: reads installed metadata only, never imports a plugin module.

``importlib.metadata`` itself is imported on the first discovery, not with the package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib import metadata

from sagellm_backend._version import __version__
from sagellm_backend.registry.known import (
    CORE_DISTRIBUTION,
    CORE_ENTRY_POINTS,
    normalize_dist_name,
)

__all__ = ["GROUP", "DiscoveredEntryPoint", "builtin_entry_points", "discover"]

GROUP = "sagellm.backends"
"""Entry-point group of backend factories; an entry point's name is the kind it provides."""

_REQUIREMENT_RE = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*"
    r"\(?(?P<spec>[^;()]*)\)?\s*(?:;(?P<marker>.*))?$"
)


@dataclass(frozen=True)
class DiscoveredEntryPoint:
    """An entry point of the group with the distribution that declares it."""

    entry_point: metadata.EntryPoint
    distribution: str | None
    version: str | None
    requires_core: str | None
    """The distribution's version specifier on the core (such as "==0.6.0"), if it pins one."""

    @property
    def kind(self) -> str:
        return self.entry_point.name

    @property
    def target(self) -> str:
        return self.entry_point.value


def discover(group: str = GROUP) -> list[DiscoveredEntryPoint]:
    """Every entry point of ``group`` on sys.path, sorted by kind then distribution."""
    from importlib import metadata

    found: list[DiscoveredEntryPoint] = []
    for ep in metadata.entry_points(group=group):
        dist = ep.dist
        name = dist.metadata["Name"] if dist is not None else None
        found.append(
            DiscoveredEntryPoint(
                entry_point=ep,
                distribution=name,
                version=dist.version if dist is not None else None,
                requires_core=_core_requirement(dist) if dist is not None else None,
            )
        )
    found.sort(key=lambda d: (d.kind, d.distribution or ""))
    return found


def builtin_entry_points(group: str = GROUP) -> list[DiscoveredEntryPoint]:
    """The core's own entry points, for when its metadata is not installed."""
    from importlib import metadata

    return [
        DiscoveredEntryPoint(
            entry_point=metadata.EntryPoint(kind, target, group),
            distribution=CORE_DISTRIBUTION,
            version=__version__,
            requires_core=None,
        )
        for kind, target in sorted(CORE_ENTRY_POINTS.items())
    ]


def _core_requirement(dist: metadata.Distribution) -> str | None:
    """The unconditional Requires-Dist specifier on the core, read from metadata."""
    for line in dist.requires or ():
        match = _REQUIREMENT_RE.match(line)
        if match is None or normalize_dist_name(match["name"]) != CORE_DISTRIBUTION:
            continue
        marker = match["marker"] or ""
        if "extra" in marker:
            continue
        spec = match["spec"].strip()
        return spec or None
    return None
