"""``sagellm-backend bench [SPEC]``: the benchmarks that apply to any backend, as ratios.

Every row compares the backend with a baseline timed in the same run and says what the
baseline is for (see :mod:`sagellm_backend.bench.cases`): the host cost of alloc + free, copies
and migrations against a Python list and plain indexed copies, start-up against a bare
interpreter, ``--against cpu`` the mock's alloc + free against the cpu backend's. Progress goes
to stderr, the table to stdout.

``--device-suite`` runs instead the suite a backend's own wheel declares in the entry-point group
``sagellm.bench`` (name = kind, value = ``suite(spec, *, repeats, seed, quick, progress)``
returning a report with ``to_dict()`` and ``format_table()``), such as the cuda wheel's KV-cache
movement against the GPU's roofline.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata

from sagellm_backend.bench import run_benchmarks
from sagellm_backend.cli.output import print_json
from sagellm_backend.errors import BackendNotFoundError
from sagellm_backend.registry import default_registry, get_backend

__all__ = ["SUITE_GROUP", "add_arguments", "run"]

SUITE_GROUP = "sagellm.bench"


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
    parser.add_argument(
        "--batch-seqs",
        type=int,
        default=64,
        help="sequences of the batch metadata case (default: 64)",
    )
    parser.add_argument(
        "--batch-pages",
        type=int,
        default=128,
        help="pages per sequence of the batch metadata case (default: 128)",
    )
    parser.add_argument(
        "--host-batch",
        type=int,
        default=1024,
        help="blocks per batch of the host-cost cases (default: 1024)",
    )
    parser.add_argument(
        "--startup",
        type=int,
        default=21,
        help="fresh processes of the start-up case, each side (default: 21; 0 skips it)",
    )
    parser.add_argument(
        "--against",
        metavar="SPEC",
        help="also time alloc + free on this backend in the same rounds (such as cpu)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="16 blocks, 8 x 16 pages, 3 repeats, 64-block host batches, 3 start-ups: a smoke run",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random block choice")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--device-suite",
        action="store_true",
        help=f"run the backend wheel's own suite (entry-point group {SUITE_GROUP}) instead",
    )


def run(args: argparse.Namespace) -> int:
    if args.device_suite:
        return _device_suite(args)
    blocks, repeats = (16, 3) if args.quick else (args.blocks, args.repeats)
    batch = (8, 16) if args.quick else (args.batch_seqs, args.batch_pages)
    host_batch, startup = (64, 3) if args.quick else (args.host_batch, args.startup)
    provider = get_backend(args.spec)
    against = None
    try:
        if args.against is not None:
            against = get_backend(args.against)
        report = run_benchmarks(
            provider,
            blocks=blocks,
            repeats=repeats,
            seed=args.seed,
            batch=batch,
            host_batch=host_batch,
            startup=startup,
            against=against,
            progress=lambda step: print(f"bench: {step}", file=sys.stderr, flush=True),
        )
    finally:
        provider.close()
        if against is not None:
            against.close()
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.format_table())
    return 0


def _device_suite(args: argparse.Namespace) -> int:
    spec = default_registry().resolve_spec(args.spec)
    text = str(spec)
    kind = spec.candidates[0].kind
    suites = [e for e in metadata.entry_points(group=SUITE_GROUP) if e.name == kind]
    if not suites:
        raise BackendNotFoundError(
            f"backend {kind!r} declares no device benchmark suite",
            hint="run the generic cases (without --device-suite)",
        )
    report = suites[0].load()(
        text,
        repeats=3 if args.quick else args.repeats,
        seed=args.seed,
        quick=args.quick,
        progress=lambda step: print(f"bench: {step}", file=sys.stderr, flush=True),
    )
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.format_table())
    return 0
