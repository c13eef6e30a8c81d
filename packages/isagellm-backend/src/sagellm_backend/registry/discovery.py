"""Entry-point discovery: reads installed metadata only, never imports a plugin module.

A scan of sys.path's ``*.dist-info`` directories reads ``entry_points.txt`` as text and parses
the metadata of only the distributions that declare the group, as ``importlib.metadata`` would
find them (the first distribution of a name on sys.path wins). Importing
``importlib.metadata`` and parsing every installed distribution costs several times a bare
interpreter's start, so it is left to what the scan cannot read: a zip or egg on sys.path, an
``.egg-info`` declaring the group, or an import finder of its own.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from functools import reduce
from importlib.machinery import PathFinder
from typing import Any, Protocol

from sagellm_backend._version import __version__
from sagellm_backend.frozen import Frozen
from sagellm_backend.registry.known import (
    CORE_DISTRIBUTION,
    CORE_ENTRY_POINTS,
    normalize_dist_name,
)

__all__ = [
    "GROUP",
    "DiscoveredEntryPoint",
    "EntryPointLike",
    "ScannedEntryPoint",
    "builtin_entry_points",
    "discover",
]

GROUP = "sagellm.backends"
"""Entry-point group of backend factories; an entry point's name is the kind it provides."""

_TARGET_RE = re.compile(r"(?P<module>[\w.]+)\s*(:\s*(?P<attr>[\w.]+)\s*)?((?P<extras>\[.*\])\s*)?$")
"""An entry point's ``module:attr`` target, as importlib.metadata reads it."""

_REQUIREMENT_RE = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*"
    r"\(?(?P<spec>[^;()]*)\)?\s*(?:;(?P<marker>.*))?$"
)


class EntryPointLike(Protocol):
    """What discovery keeps of an entry point: ``importlib.metadata.EntryPoint`` or the scan's."""

    @property
    def name(self) -> str: ...

    @property
    def value(self) -> str: ...

    @property
    def group(self) -> str: ...

    def load(self) -> Any: ...


class ScannedEntryPoint(Frozen):
    """An entry point read by the scan; ``load`` imports its target as importlib.metadata's."""

    name: str
    value: str
    group: str

    def load(self) -> Any:
        match = _TARGET_RE.match(self.value)
        if match is None:
            raise ValueError(f"malformed entry point target {self.value!r}")
        module = importlib.import_module(match["module"])
        return reduce(getattr, filter(None, (match["attr"] or "").split(".")), module)


class DiscoveredEntryPoint(Frozen):
    """An entry point of the group with the distribution that declares it."""

    entry_point: EntryPointLike
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
    found = _scan(group)
    if found is None:
        found = _from_metadata(group)
    found.sort(key=lambda d: (d.kind, d.distribution or ""))
    return found


def _from_metadata(group: str) -> list[DiscoveredEntryPoint]:
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
                requires_core=_core_requirement(dist.requires) if dist is not None else None,
            )
        )
    return found


def _scan(group: str) -> list[DiscoveredEntryPoint] | None:
    """The group's entry points read from sys.path's directories; None where the scan cannot
    stand in for importlib.metadata."""
    if any(
        finder is not PathFinder and getattr(finder, "find_distributions", None) is not None
        for finder in sys.meta_path
    ):
        return None
    header = f"[{group}]"
    seen: set[str] = set()
    found: list[DiscoveredEntryPoint] = []
    for entry in sys.path:
        root = entry or "."
        try:
            names = os.listdir(root)
        except NotADirectoryError:
            return None  # a zip or an egg
        except OSError:
            continue
        for name in names:
            stem, dot, suffix = name.rpartition(".")
            if not dot or suffix not in ("dist-info", "egg-info"):
                continue
            key = _normalized(stem.partition("-")[0])
            if key in seen:
                continue
            seen.add(key)
            info = os.path.join(root, name)
            try:
                with open(os.path.join(info, "entry_points.txt"), encoding="utf-8") as fh:
                    text = fh.read()
            except OSError:
                continue
            if header not in text:
                continue
            if suffix == "egg-info":
                return None
            found += _entries(text, group, info)
    return found


def _entries(text: str, group: str, info: str) -> list[DiscoveredEntryPoint]:
    """The group's entry points in ``entry_points.txt`` text of the distribution at ``info``."""
    headers: dict[str, list[str]] = {}
    try:
        with open(os.path.join(info, "METADATA"), encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    break
                key, colon, value = line.partition(":")
                if colon and not line[0].isspace():
                    headers.setdefault(key.strip().lower(), []).append(value.strip())
    except OSError:
        pass
    name = headers.get("name", [None])[0]
    version = headers.get("version", [None])[0]
    requires = _core_requirement(headers.get("requires-dist", []))
    section = None
    entries = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            continue
        kind, equals, target = line.partition("=")
        if section == group and equals:
            entries.append(
                DiscoveredEntryPoint(
                    entry_point=ScannedEntryPoint(kind.strip(), target.strip(), group),
                    distribution=name,
                    version=version,
                    requires_core=requires,
                )
            )
    return entries


def _normalized(name: str) -> str:
    """A distribution name as importlib.metadata tells distributions apart."""
    return re.sub(r"[-_.]+", "_", name).lower()


def builtin_entry_points(group: str = GROUP) -> list[DiscoveredEntryPoint]:
    """The core's own entry points, for when its metadata is not installed."""
    return [
        DiscoveredEntryPoint(
            entry_point=ScannedEntryPoint(kind, target, group),
            distribution=CORE_DISTRIBUTION,
            version=__version__,
            requires_core=None,
        )
        for kind, target in sorted(CORE_ENTRY_POINTS.items())
    ]


def _core_requirement(requires: list[str] | None) -> str | None:
    """The unconditional Requires-Dist specifier on the core, of a distribution's requirements."""
    for line in requires or ():
        match = _REQUIREMENT_RE.match(line)
        if match is None or normalize_dist_name(match["name"]) != CORE_DISTRIBUTION:
            continue
        marker = match["marker"] or ""
        if "extra" in marker:
            continue
        spec = match["spec"].strip()
        return spec or None
    return None
