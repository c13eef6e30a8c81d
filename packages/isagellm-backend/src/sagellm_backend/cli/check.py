"""``sagellm-backend check [SPEC]``: run the conformance kit against an installed backend.

Prints one row per check (passed, failed, skipped with its reason, xfailed) and a summary;
exits 1 if any check failed. The mock's default pool (16 GiB, allocated per block) is more than
the kit fills when it tests exhaustion, so a mock the spec gives no ``max_memory_mb`` is checked
with a small pool, and the summary names it.
"""

from __future__ import annotations

import argparse
import dataclasses

from sagellm_backend.cli.output import print_json
from sagellm_backend.errors import InvalidSpecError
from sagellm_backend.registry import BackendSpec, default_registry
from sagellm_backend.testing.check import Area
from sagellm_backend.testing.runner import run_conformance
from sagellm_backend.testing.spec_target import target_for_spec

__all__ = ["CHECK_MOCK_MEMORY_MB", "add_arguments", "run", "sized_for_check"]

CHECK_MOCK_MEMORY_MB = 64
"""Pool of a mock under check when the spec sets none: small enough to exhaust in a moment."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "spec", nargs="?", help="config string (default: $SAGELLM_BACKEND, else 'mock')"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--only",
        action="append",
        metavar="AREA",
        help=f"run only this area ({', '.join(a.value for a in Area)}) or check id; repeatable",
    )
    parser.add_argument("--seed", type=int, help="seed of the random data, to reproduce a run")


def run(args: argparse.Namespace) -> int:
    target = target_for_spec(sized_for_check(args.spec))
    report = run_conformance(target, select=args.only, seed=args.seed)
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.format_table())
    return 0 if report.ok else 1


def sized_for_check(spec: str | None) -> str | None:
    """``spec`` with ``max_memory_mb`` set on every mock candidate that leaves it unset.

    A spec that does not parse is returned as given, for the registry to report.
    """
    try:
        parsed = default_registry().resolve_spec(spec)
    except InvalidSpecError:
        return spec
    sized = tuple(
        dataclasses.replace(c, options=(*c.options, ("max_memory_mb", str(CHECK_MOCK_MEMORY_MB))))
        if c.kind == "mock" and "max_memory_mb" not in c.option_dict
        else c
        for c in parsed.candidates
    )
    return spec if sized == parsed.candidates else str(BackendSpec(sized))
