"""``sagellm-backend info [SPEC]``: the capability matrix, KV layout and options of a backend."""

from __future__ import annotations

import argparse
import dataclasses

from sagellm_backend.cli.output import format_table, print_json
from sagellm_backend.errors import BackendNotFoundError
from sagellm_backend.registry import default_registry, get_backend

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "spec", nargs="?", help="config string (default: $SAGELLM_BACKEND, else 'mock')"
    )
    parser.add_argument("--json", action="store_true", help="print the matrix as JSON")


def run(args: argparse.Namespace) -> int:
    provider = get_backend(args.spec)
    try:
        capability = provider.capability().to_dict()
        layout = dataclasses.asdict(provider.kv_layout)
        kind, device = provider.kind, provider.device
    finally:
        provider.close()
    registry = default_registry()
    try:
        record = registry.record(kind)
        source = {"distribution": record.distribution, "version": record.version}
        options = [option.to_dict() for option in registry.options(kind)]
    except BackendNotFoundError:
        source = {"distribution": None, "version": None}
        options = []
    if args.json:
        print_json(
            {
                "kind": kind,
                "device": device,
                **source,
                "kv_layout": layout,
                "capability": capability,
                "options": options,
            }
        )
        return 0
    origin = f" ({source['distribution']} {source['version']})" if source["distribution"] else ""
    print(f"backend {kind!r} on {device}{origin}")
    print()
    print(format_table(("CAPABILITY", "VALUE"), sorted(capability.items())))
    print()
    print(format_table(("KV LAYOUT", "VALUE"), list(layout.items())))
    print()
    rows = [(o["name"], o["type"], o["default"], o["help"]) for o in options]
    print(format_table(("OPTION", "TYPE", "DEFAULT", "HELP"), rows))
    return 0
