"""``sagellm-backend doctor``: the environment and every plugin's load record.

Nothing heavy is imported and no device is touched: library versions come from installed
metadata, driver versions from the files the drivers publish, devices from their device nodes.
Exits with EXIT_BACKEND_FAILURE when a plugin is broken (its import or probe failed or hung),
incompatible, or declares an entry point whose name no spec can select.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

import sagellm_backend
from sagellm_backend.cli import EXIT_BACKEND_FAILURE, EXIT_OK
from sagellm_backend.cli.listing import HEADERS, record_rows
from sagellm_backend.cli.output import format_table, print_json
from sagellm_backend.factory import API_VERSION
from sagellm_backend.registry import ENV_VAR, RecordStatus, list_backends

__all__ = ["add_arguments", "environment", "run"]

LIBRARIES = {"torch": "torch", "torch_npu": "torch-npu", "triton": "triton"}
"""Import name -> distribution name of the libraries backends build on."""

_DRIVER_FILES = {
    "nvidia": (
        "/proc/driver/nvidia/version",
        re.compile(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)*)\s"),
    ),
    "ascend": ("/usr/local/Ascend/driver/version.info", re.compile(r"Version=(\S+)")),
}
_DEVICE_NODES = {"nvidia": "/dev/nvidia[0-9]*", "ascend": "/dev/davinci[0-9]*"}
_PROBLEMS = (RecordStatus.BROKEN, RecordStatus.INCOMPATIBLE, RecordStatus.INVALID_NAME)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    env = environment()
    records = list_backends(probe=True)
    problems = [r for r in records if r.status in _PROBLEMS]
    if args.json:
        print_json({**env, "backends": [r.to_dict() for r in records]})
    else:
        for section, values in env.items():
            assert isinstance(values, dict)
            print(format_table((section.upper(), ""), list(values.items())))
            print()
        print(format_table(HEADERS, record_rows(records)))
        if problems:
            print()
            print(f"{len(problems)} problem(s):")
            for r in problems:
                print(f"  {r.kind} ({r.distribution or 'unknown distribution'}): {r.reason}")
    return EXIT_BACKEND_FAILURE if problems else EXIT_OK


def environment() -> dict[str, dict[str, object]]:
    """What the report shows besides the plugins, as plain data."""
    return {
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "platform": {"system": platform.platform(), "machine": platform.machine()},
        "core": {
            "version": sagellm_backend.__version__,
            "api_version": API_VERSION,
            "location": str(Path(sagellm_backend.__file__).parent),
            ENV_VAR: os.environ.get(ENV_VAR),
        },
        "libraries": {name: _library_version(name, dist) for name, dist in LIBRARIES.items()},
        "drivers": {name: _driver_version(*source) for name, source in _DRIVER_FILES.items()},
        "devices": {name: sorted(glob.glob(pattern)) for name, pattern in _DEVICE_NODES.items()},
    }


def _library_version(module: str, distribution: str) -> str | None:
    """Installed version, read from metadata; the library itself is not imported."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "present (version unknown)"


def _driver_version(path: str, pattern: re.Pattern[str]) -> str | None:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    match = pattern.search(text)
    if match is not None:
        return match.group(1)
    lines = text.strip().splitlines()
    return lines[0] if lines else None
