"""``sagellm-backend list``: every backend found, where it comes from, and whether it can run."""

from __future__ import annotations

import argparse

from sagellm_backend.cli.output import format_table, print_json
from sagellm_backend.registry import BackendRecord, list_backends

__all__ = ["add_arguments", "record_rows", "run"]

HEADERS = ("KIND", "STATUS", "DISTRIBUTION", "VERSION", "ALIASES", "PRIORITY", "DETAIL")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the records as JSON")
    parser.add_argument(
        "--no-probe",
        action="store_true",
        help="read installed metadata only: import no plugin and probe nothing",
    )


def run(args: argparse.Namespace) -> int:
    records = list_backends(probe=not args.no_probe)
    if args.json:
        print_json([r.to_dict() for r in records])
    else:
        print(format_table(HEADERS, record_rows(records)))
    return 0


def record_rows(records: list[BackendRecord]) -> list[tuple[object, ...]]:
    """Table rows for load records, shared by ``list`` and ``doctor``."""
    rows: list[tuple[object, ...]] = []
    for r in records:
        detail = r.reason or ""
        if r.alias_of:
            detail = f"alias of {r.alias_of}" + (f"; {detail}" if detail else "")
        if r.chosen:
            detail = "chosen in this process" + (f"; {detail}" if detail else "")
        rows.append(
            (r.kind, r.status.value, r.distribution, r.version, r.aliases, r.priority, detail)
        )
    return rows
