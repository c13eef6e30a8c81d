"""``sagellm-backend bench [SPEC]``: the benchmarks that apply to any backend, as ratios.

Every row compares the backend with a baseline timed in the same run (see
:mod:`sagellm_backend.bench.cases`). Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import sys

from sagellm_backend.bench import run_benchmarks
from sagellm_backend.cli.output import print_json
from sagellm_backend.registry import get_backend

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "spec", nargs="?", help="config string (default: $SAGELLM_BACKEND, else 'mock')"
    )
    parser.add_argument(
        "--blocks", type=int, default=256, help="KV blocks per batch (default: 256)"
    )
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed repeats per case; the median is reported"
    )
    parser.add_argument("--quick", action="store_true", help="16 blocks and 3 repeats: a smoke run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random block choice")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    blocks, repeats = (16, 3) if args.quick else (args.blocks, args.repeats)
    provider = get_backend(args.spec)
    try:
        report = run_benchmarks(
            provider,
            blocks=blocks,
            repeats=repeats,
            seed=args.seed,
            progress=lambda step: print(f"bench: {step}", file=sys.stderr, flush=True),
        )
    finally:
        provider.close()
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.format_table())
    return 0
