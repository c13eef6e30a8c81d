"""Start-up cost of the core, as ratios to a bare interpreter start measured in the same run.

Reports ``import sagellm_backend``, ``get_backend("mock")`` with several plugin distributions
installed (written as ``*.dist-info`` directories into a temporary directory on the path), and
``python -m sagellm_backend --version``. Each figure is the median of repeated fresh
subprocesses; the ratio to ``python -c pass`` is the result, the milliseconds are context.

    python benchmarks/import_cost.py [--repeats N] [--plugins N] [--installed]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "packages" / "isagellm-backend" / "src"

PLUGIN = """
from sagellm_backend.factory import BackendFactory

factory = BackendFactory(
    "bench_{i}", "bench_plugin_{i}_impl:create", probe=lambda: "no bench device", priority={i}
)
"""

CASES = (
    ("python -c pass", ["-c", "pass"]),
    ("import sagellm_backend", ["-c", "import sagellm_backend"]),
    (
        "get_backend('mock'), {plugins} plugins installed",
        ["-c", "import sagellm_backend; sagellm_backend.get_backend('mock').close()"],
    ),
    ("python -m sagellm_backend --version", ["-m", "sagellm_backend", "--version"]),
)


def install_plugins(root: Path, count: int) -> None:
    """Write ``count`` plugin distributions, each with one entry point and its module."""
    for i in range(count):
        info = root / f"bench_plugin_{i}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: bench-plugin-{i}\nVersion: 1.0\n"
            "Requires-Dist: isagellm-backend\n"
        )
        (info / "entry_points.txt").write_text(
            f"[sagellm.backends]\nbench_{i} = bench_plugin_{i}:factory\n"
        )
        (root / f"bench_plugin_{i}.py").write_text(PLUGIN.format(i=i))


def median_ms(args: list[str], env: dict[str, str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, *args], env=env, check=True, capture_output=True)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="runs per case (median taken)")
    parser.add_argument("--plugins", type=int, default=8, help="fake plugin distributions")
    parser.add_argument(
        "--installed", action="store_true", help="use the installed core, not the source tree"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp)
        install_plugins(site, args.plugins)
        paths = [str(site)] + ([] if args.installed else [str(SRC)])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        env.pop("SAGELLM_BACKEND", None)
        subprocess.run([sys.executable, "-c", "import sagellm_backend"], env=env, check=True)
        results = [
            (label.format(plugins=args.plugins), median_ms(case, env, args.repeats))
            for label, case in CASES
        ]
    bare = results[0][1]
    width = max(len(label) for label, _ in results)
    print(f"{'case':<{width}}  {'x bare start':>12}  {'median ms':>9}")
    for label, ms in results:
        print(f"{label:<{width}}  {ms / bare:>12.2f}  {ms:>9.1f}")
    print(f"(median of {args.repeats} fresh processes each; Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
