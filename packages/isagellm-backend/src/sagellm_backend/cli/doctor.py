"""``sagellm-backend doctor``: the environment and every plugin's load record.

Nothing heavy is imported and no device is touched: library versions come from installed
metadata, driver versions from the files the drivers publish, devices from their device nodes.
The report ends with the one next step for this machine (:func:`next_step`). Exits with
EXIT_BACKEND_FAILURE when a plugin is broken (its import or probe failed or hung),
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
from sagellm_backend.registry import (
    ENV_VAR,
    KNOWN_KINDS,
    SIMULATED_KINDS,
    BackendRecord,
    RecordStatus,
    list_backends,
)

__all__ = ["add_arguments", "environment", "next_step", "run"]

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
_DEVICE_KINDS = {"nvidia": "cuda", "ascend": "ascend"}
"""The backend kind that drives each vendor's devices."""
_HOST_KIND = "cpu"
_PROBLEMS = (RecordStatus.BROKEN, RecordStatus.INCOMPATIBLE, RecordStatus.INVALID_NAME)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    env = environment()
    records = list_backends(probe=True)
    problems = [r for r in records if r.status in _PROBLEMS]
    step = next_step(env, records)
    if args.json:
        print_json({**env, "backends": [r.to_dict() for r in records], "next_step": step})
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
        print()
        print(f"next step: {step}")
    return EXIT_BACKEND_FAILURE if problems else EXIT_OK


def next_step(env: dict[str, dict[str, object]], records: list[BackendRecord]) -> str:
    """The one thing to do next on this machine, first match wins: fix a broken plugin; try the
    best hardware backend that runs; make the backend of devices that are here run, or install
    it; try the cpu backend; install torch for it."""
    by_kind = {r.kind: r for r in records if r.status is not RecordStatus.SHADOWED}
    broken = [r for r in records if r.status in _PROBLEMS]
    if broken:
        first = broken[0]
        return f"repair backend {first.kind!r} ({first.distribution}): {first.reason}"
    hardware = [
        r
        for r in records
        if r.available and not r.alias_of and r.kind not in SIMULATED_KINDS and r.kind != _HOST_KIND
    ]
    if hardware:
        best = max(hardware, key=lambda r: (r.priority or 0, r.kind))
        return f"try it: sagellm-backend demo {best.kind}"
    devices = env["devices"]
    for vendor, kind in _DEVICE_KINDS.items():
        if not devices.get(vendor):
            continue
        record = by_kind.get(kind)
        if record is None or record.status is RecordStatus.NOT_INSTALLED:
            install = KNOWN_KINDS[kind].install
            return f"this machine has {vendor} devices; install the {kind} backend, {install}"
        return (
            f"this machine has {vendor} devices, but backend {kind!r} cannot use them: "
            f"{record.reason}"
        )
    cpu = by_kind.get(_HOST_KIND)
    if cpu is not None and cpu.available:
        return "no accelerator backend runs here; try the cpu backend: sagellm-backend demo cpu"
    if env["libraries"].get("torch") is None:
        return (
            "only the mock runs here, as torch is not installed; for the cpu backend install "
            f"the core's [torch] extra, {KNOWN_KINDS[_HOST_KIND].install}"
        )
    why = cpu.reason if cpu is not None else "it is not installed"
    return f"only the mock runs here; backend 'cpu' cannot run: {why}"


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
