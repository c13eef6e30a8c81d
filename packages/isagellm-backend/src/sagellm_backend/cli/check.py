"""``sagellm-backend check [SPEC]``: run the conformance kit against an installed backend.

Prints one row per check (passed, failed, skipped with its reason, xfailed) and a summary;
exits 1 if any check failed.
"""

from __future__ import annotations

import argparse

from sagellm_backend.cli.output import print_json
from sagellm_backend.testing.check import Area
from sagellm_backend.testing.runner import run_conformance
from sagellm_backend.testing.spec_target import target_for_spec

__all__ = ["add_arguments", "run"]


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
    target = target_for_spec(args.spec)
    report = run_conformance(target, select=args.only, seed=args.seed)
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.format_table())
    return 0 if report.ok else 1
