"""``sagellm-backend info [SPEC]``: the capability matrix, KV layout and options of a backend.

``kv_dtypes`` lists the dtypes a KV block may have: the pool's dtype, or, for a backend whose
layout has none (the mock), every supported dtype, chosen per block."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from sagellm_backend.cli.output import format_table, print_json
from sagellm_backend.errors import BackendNotFoundError
from sagellm_backend.protocols import BackendProvider
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
        kv_dtypes = _kv_dtypes(provider)
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
                "kv_dtypes": kv_dtypes,
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
    if layout["dtype"] is None:
        layout["dtype"] = f"per block: {', '.join(kv_dtypes)}"
    print(format_table(("KV LAYOUT", "VALUE"), list(layout.items())))
    print()
    rows = [(o["name"], o["type"], o["default"], o["help"]) for o in options]
    print(format_table(("OPTION", "TYPE", "DEFAULT", "HELP"), rows))
    return 0


def _kv_dtypes(provider: BackendProvider[Any]) -> list[str]:
    """The dtypes a KV block may have: the pool's one, or (no pool dtype) any supported one."""
    dtype = provider.kv_layout.dtype
    if dtype is not None:
        return [dtype.value]
    return [d.value for d in provider.capability().supported_dtypes]
