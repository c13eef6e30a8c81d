"""Hatchling metadata hook shared by the plugin wheels: one version for every wheel.

Reads the version from the core package's ``_version.py`` (the one place it is kept), sets it as
the plugin's version, and pins the core to exactly that version in the plugin's dependencies.
Extra requirements come from the hook's ``dependencies`` setting in the plugin's pyproject.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hatchling.metadata.plugin.interface import MetadataHookInterface

VERSION_FILE = (
    Path(__file__).parent / "isagellm-backend" / "src" / "sagellm_backend" / "_version.py"
)


def core_version() -> str:
    match = re.search(r'^__version__ = "([^"]+)"$', VERSION_FILE.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no __version__ in {VERSION_FILE}")
    return match.group(1)


class SiblingVersionHook(MetadataHookInterface):
    PLUGIN_NAME = "custom"

    def update(self, metadata: dict[str, Any]) -> None:
        version = core_version()
        metadata["version"] = version
        extra = list(self.config.get("dependencies", []))
        metadata["dependencies"] = [f"isagellm-backend=={version}", *extra]
